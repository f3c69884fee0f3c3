//! Where processes run. Today: the host, each process in a process group
//! of its own so that a stop reaches every grandchild (gunicorn workers
//! under `sh -c`), and in its type's cgroup ([`cgroup`]). Docker comes
//! here later, behind the same two calls: [`spawn`] for supervised
//! processes, [`run_to_end`] for build steps.
//!
//! Architecture invariant: only this module creates OS processes for apps
//! and only it sends them signals.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::manifest::Limits;
use crate::progress::Progress;

pub mod cgroup;
pub mod container;
// people track: interactive one-offs (`run -t`) need a terminal.
pub mod pty;
// swarm track (issue 12): processes as tasks of swarm services.
pub mod swarm;
pub mod uids;

/// A command line to run for an app, with exactly this environment.
#[derive(Debug, Clone)]
pub struct ProcessCommand {
    /// Run by `sh -c`, as Procfile entries are.
    pub command: String,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// The app's own unprivileged user when the daemon runs as root;
    /// `None`: the daemon's own user.
    pub user: Option<AppUser>,
    /// Its `[processes.X]` limits; unset ones take [`DEFAULT_PROCESSES`]
    /// and [`DEFAULT_OPEN_FILES`]. The rlimits apply only to app users;
    /// memory, CPU and pids through [`cgroup`] whenever `cgroup` is set.
    pub limits: Limits,
    /// `Some`: it runs in a container of this placement; `None`: on the
    /// host. Only this module acts on the difference.
    pub container: Option<std::sync::Arc<container::ContainerPlacement>>,
    /// The cgroup a host process joins before exec, with `limits`;
    /// `None` for the daemon's own tool installs. Ignored for containers
    /// (the engine limits them) and where the host has no usable cgroups.
    pub cgroup: Option<cgroup::CgroupName>,
}

/// Processes and threads one app user may have at once, all its types,
/// one-offs and release phases together (`RLIMIT_NPROC` counts per user):
/// a fork bomb stops there, not at the host's pid_max.
pub const DEFAULT_PROCESSES: u32 = 512;
/// Open descriptors per process (`RLIMIT_NOFILE`).
pub const DEFAULT_OPEN_FILES: u32 = 4096;

/// An app's own user and group (numeric; no passwd entry is needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppUser {
    pub uid: u32,
    pub gid: u32,
}

/// The base `PATH` apps get, before their environment's `bin`.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessCommand {
    fn to_command(&self) -> std::io::Result<Command> {
        self.to_command_with_stdin(false)
    }

    /// The command, whose stdin (when `stdin`, the caller makes it a pipe)
    /// reaches the process, in a container too.
    fn to_command_with_stdin(&self, stdin: bool) -> std::io::Result<Command> {
        if let Some(placement) = &self.container {
            let mut cmd = container::shim_command(self, placement, stdin);
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(false);
            return Ok(cmd);
        }
        // bash, as Heroku uses, execs a simple command in place: the app
        // server is then our direct child and the target of its signals.
        let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
        let mut cmd = Command::new(shell);
        cmd.arg("-c")
            .arg(&self.command)
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: signals go to the group, so nothing it forks
            // outlives a stop.
            .process_group(0)
            .kill_on_drop(false);
        // First of the pre-exec steps: nothing of the app runs before it
        // is in its cgroup.
        self.join_cgroup(&mut cmd)?;
        if let Some(u) = self.user {
            // std drops the supplementary groups too when it switches user
            // as root, so nothing of root's access is inherited.
            cmd.uid(u.uid).gid(u.gid);
            let nproc = u64::from(self.limits.processes.unwrap_or(DEFAULT_PROCESSES));
            let nofile = u64::from(self.limits.open_files.unwrap_or(DEFAULT_OPEN_FILES));
            // SAFETY: runs in the forked child (after std's setuid) before
            // exec; setrlimit is async-signal-safe and only lowers limits.
            unsafe {
                cmd.pre_exec(move || {
                    for (resource, value) in [(libc::RLIMIT_NPROC, nproc), (libc::RLIMIT_NOFILE, nofile)] {
                        // Never above the daemon's own hard limit: raising
                        // it is refused (EPERM) and would fail the start.
                        let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                        let value = if libc::getrlimit(resource, &mut cur) == 0 { (value as libc::rlim_t).min(cur.rlim_max) } else { value as libc::rlim_t };
                        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
                        if libc::setrlimit(resource, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    /// Make `cmd`'s child join this process's cgroup (see [`cgroup`]).
    pub(crate) fn join_cgroup(&self, cmd: &mut Command) -> std::io::Result<()> {
        match &self.cgroup {
            Some(name) => cgroup::place(cmd, name, &self.limits),
            None => Ok(()),
        }
    }
}

impl ProcessCommand {
    /// Who must hold the socket the proxy connects to for this process:
    /// the app's user for a host process; nobody to check for a container,
    /// whose port is published on loopback by the engine (root), not by
    /// the app, and which no other app can bind while the engine holds it.
    pub fn listener_owner(&self) -> Option<u32> {
        match &self.container {
            Some(_) => None,
            None => self.user.map(|u| u.uid),
        }
    }
}

/// Start a supervised process. Its pid is also its process group id.
pub fn spawn(cmd: &ProcessCommand) -> std::io::Result<Child> {
    cmd.to_command()?.spawn()
}

/// Signal a whole process group. False when it no longer exists.
pub fn signal_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; any pgid
    // and signal are valid inputs, failure is reported through the result.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// Kill every process running as `user`, however it detached (new
/// session, new group, reparented to init): a helper that becomes the
/// user calls kill(-1, SIGKILL), which the kernel applies to all of the
/// user's processes at once, so a forking loop cannot outrun it. Repeated
/// until none is left. App users are the app's alone (see [`uids`]).
pub async fn kill_user(user: AppUser) {
    if user.uid == 0 {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/true");
    cmd.uid(user.uid).gid(user.gid).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: in the forked child, after setuid, before exec: kill(2) is
    // async-signal-safe; kill(-1) spares the caller itself.
    unsafe {
        cmd.pre_exec(|| {
            for _ in 0..100 {
                if libc::kill(-1, libc::SIGKILL) != 0 {
                    // ESRCH: nothing of the user's is left.
                    break;
                }
            }
            Ok(())
        });
    }
    let result = tokio::task::spawn_blocking(move || cmd.status()).await;
    if let Ok(Err(e)) = result {
        tracing::warn!(uid = user.uid, error = %e, "killing the app user's processes failed");
    }
}

/// Signal the process that does the work: `pid` itself, or, when `pid`
/// is a shell still wrapping a compound command, the shell's children.
pub fn signal_main(pid: i32, signal: i32) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let is_shell = matches!(comm.trim(), "sh" | "bash" | "dash");
    let children: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    let targets = if is_shell && !children.is_empty() { children } else { vec![pid] };
    for t in targets {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(t, signal);
        }
    }
}

/// Is any process of the group still alive? Zombies do not count: after
/// a daemon crash its apps belong to init, which may reap them slowly, and
/// a dead process holds no port and serves no request.
pub fn group_alive(pgid: i32) -> bool {
    if !signal_group(pgid, 0) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return true };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { return false };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
        // After the command name: state, ppid, pgrp, ...
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = rest.next().unwrap_or("Z");
        let pgrp: i32 = rest.nth(1).and_then(|g| g.parse().ok()).unwrap_or(0);
        pgrp == pgid && state != "Z" && state != "X"
    })
}

/// upgrade track: watch `pid`, a process this daemon did not start (a
/// previous daemon's app instance): a pidfd, readable once it has ended.
/// Its start time is checked after the pidfd is taken, so the descriptor
/// cannot name a process that reused the pid.
pub fn watch_process(pid: i32, start: u64) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if start_time(pid) != Some(start) {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the process is gone (its pid was reused)"));
    }
    // SAFETY: an OwnedFd is an open descriptor that stays the same until
    // the AsyncFd that owns it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(std::io::Error::from)
}

/// upgrade track: a new read end of an adopted process's output pipe
/// (`stream` 1 or 2), opened through /proc/PID/fd as for a FIFO. Only a
/// pipe is opened, never whatever file the app may have put there.
pub fn reopen_output(pid: i32, stream: i32) -> Option<tokio::net::unix::pipe::Receiver> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let path = format!("/proc/{pid}/fd/{stream}");
    if !std::fs::metadata(&path).ok()?.file_type().is_fifo() {
        return None;
    }
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).ok()?;
    if !f.metadata().ok()?.file_type().is_fifo() {
        return None;
    }
    tokio::net::unix::pipe::Receiver::from_file_unchecked(f).ok()
}

/// upgrade track: [`kill_user`] but for the process groups in `keep`
/// (adopted app instances): every other process of the user is killed,
/// found in /proc, until none is left. Slower than `kill_user` against a
/// forking loop, so it is used only when something is to be kept.
pub async fn kill_user_except(user: AppUser, keep: &[i32]) {
    kill_user_sparing(user, |pid| process_group(pid).is_some_and(|g| keep.contains(&g))).await
}

/// swarm track: [`kill_user`] but for processes in other pid namespaces
/// than the daemon's: containers, which their engine stops (an app on the
/// swarm runs its tasks as its own uid, and the daemon's start or stop
/// must not kill them; local containers have their shims).
pub async fn kill_user_on_host(user: AppUser) {
    let own = std::fs::read_link("/proc/self/ns/pid").ok();
    kill_user_sparing(user, |pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != own).await
}

/// Kill every process of `user` that `spare` does not name, found in
/// /proc, until none is left.
async fn kill_user_sparing(user: AppUser, spare: impl Fn(i32) -> bool) {
    if user.uid == 0 {
        return;
    }
    for _ in 0..100 {
        let mut found = false;
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next()).and_then(|u| u.parse::<u32>().ok());
            if uid != Some(user.uid) || status.lines().any(|l| l.starts_with("State:") && l.contains('Z')) {
                continue;
            }
            if spare(pid) {
                continue;
            }
            found = true;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if !found {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(uid = user.uid, "processes of the app user survived 100 rounds of killing");
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(2)?.parse().ok()
}

/// upgrade track: is `pid` an instance an app may own: running as `uid`
/// (`None`: the daemon's own user) from a directory under `under`?
pub fn runs_as_under(pid: i32, uid: Option<u32>, under: &Path) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let real = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next()).and_then(|u| u.parse::<u32>().ok());
    // SAFETY: geteuid has no preconditions.
    let want = uid.unwrap_or_else(|| unsafe { libc::geteuid() });
    if real != Some(want) {
        return false;
    }
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else { return false };
    let under = std::fs::canonicalize(under).unwrap_or_else(|_| under.to_path_buf());
    cwd.starts_with(under)
}

/// A process's start time in clock ticks since boot (field 22 of
/// /proc/PID/stat): with the pid, it names one process for good, even
/// after the pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parens: skip past its
    // closing paren, then count the remaining fields.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug, Error)]
pub enum StepError {
    #[error("`{command}` exited with {status}")]
    Failed { command: String, status: String, tail: Vec<String> },
    #[error("`{command}` did not finish within {}s", .timeout.as_secs())]
    TimedOut { command: String, timeout: Duration, tail: Vec<String> },
}

impl StepError {
    /// The last lines the step printed, for the rejection message.
    pub fn tail(&self) -> &[String] {
        match self {
            StepError::Failed { tail, .. } | StepError::TimedOut { tail, .. } => tail,
        }
    }
}

/// Run a build step to its end, streaming each output line to `progress`
/// (indented), and keeping the last lines for the error. On timeout the
/// whole process group is killed.
pub async fn run_to_end(cmd: &ProcessCommand, progress: &Progress, timeout: Duration) -> Result<()> {
    let mut child = spawn(cmd).with_context(|| format!("starting `{}`", cmd.command))?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    // Bounded: a step printing faster than the client reads waits on its
    // pipe instead of growing the daemon.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(LINE_QUEUE);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump_lines(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump_lines(err, tx.clone()));
    }
    drop(tx);

    let mut tail: VecDeque<String> = VecDeque::new();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut lines_open = true;
    let status = loop {
        tokio::select! {
            line = rx.recv(), if lines_open => match line {
                Some(line) => {
                    progress.output(&line);
                    if tail.len() == 20 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                None => lines_open = false,
            },
            status = child.wait(), if !lines_open => break Some(status.context("waiting for step")?),
            _ = &mut deadline => break None,
        }
    };
    // Whatever the outcome, leave nothing of the step running.
    signal_group(pgid, libc::SIGKILL);
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(StepError::Failed {
            command: cmd.command.clone(),
            status: describe_exit(s),
            tail: tail.into(),
        }
        .into()),
        None => {
            let _ = child.wait().await;
            Err(StepError::TimedOut { command: cmd.command.clone(), timeout, tail: tail.into() }.into())
        }
    }
}

/// "code 1" or "signal 9".
pub fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// The longest line kept whole; a longer one arrives in pieces, so an app
/// printing without newlines cannot grow the daemon's memory.
const MAX_LINE: u64 = 64 * 1024;

/// How many lines may wait between a process's pipes and their reader:
/// with 64 KiB lines, at most 2 MiB per process, and then the process
/// waits on its pipe (backpressure) rather than the daemon growing.
pub const LINE_QUEUE: usize = 32;

/// Read lines (lossily, as apps may print anything) until EOF. A full
/// queue holds the reader, and so the process writing the pipe.
pub async fn pump_lines<R: AsyncRead + Unpin>(r: R, tx: tokio::sync::mpsc::Sender<String>) {
    use tokio::io::AsyncReadExt;
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if tx.send(line.trim_end_matches(['\n', '\r']).to_string()).await.is_err() {
                    return;
                }
            }
        }
    }
}
