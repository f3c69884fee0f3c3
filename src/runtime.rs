//! Where processes run. Today: the host, each process in a process group
//! of its own so that a stop reaches every grandchild (gunicorn workers
//! under `sh -c`). Docker comes here later, behind the same two calls:
//! [`spawn`] for supervised processes, [`run_to_end`] for build steps.
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

use crate::progress::Progress;

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
}

/// An app's own user and group (numeric; no passwd entry is needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppUser {
    pub uid: u32,
    pub gid: u32,
}

/// The base `PATH` apps get, before their environment's `bin`.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessCommand {
    fn to_command(&self) -> Command {
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
        if let Some(u) = self.user {
            // std drops the supplementary groups too when it switches user
            // as root, so nothing of root's access is inherited.
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }
}

/// Start a supervised process. Its pid is also its process group id.
pub fn spawn(cmd: &ProcessCommand) -> std::io::Result<Child> {
    cmd.to_command().spawn()
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
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

/// Read lines (lossily, as apps may print anything) until EOF.
pub async fn pump_lines<R: AsyncRead + Unpin>(r: R, tx: tokio::sync::mpsc::UnboundedSender<String>) {
    use tokio::io::AsyncReadExt;
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if tx.send(line.trim_end_matches(['\n', '\r']).to_string()).is_err() {
                    return;
                }
            }
        }
    }
}
