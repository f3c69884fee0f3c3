//! Zero-downtime restart and upgrade of the daemon (issue 14 #1), as
//! nginx and pingora do it: on SIGUSR2 the running daemon re-executes the
//! slipway binary now on disk with its listening sockets and DIR/lock
//! inherited (numbers in `SLIPWAY_LISTEN_FDS`, e.g. `http:3,api:4,lock:5`),
//! waits for the new one's ready byte on a pipe (`ready:N`), then stops
//! accepting, drains its connections and exits without stopping an app.
//! The new daemon adopts the running app instances (see
//! `release::restore_all`) instead of starting new ones.
//!
//! The hand-over itself is plain descriptor inheritance across exec, which
//! no maintained crate wraps beyond a few fcntl calls (listenfd and
//! sd-listen-fds read systemd's fixed-position `LISTEN_FDS`, which cannot
//! name which socket is which).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::names::AppName;
use crate::platform::Platform;
use crate::supervisor::{Instance, Leftover};

/// The environment variable naming the inherited descriptors.
pub const LISTEN_FDS: &str = "SLIPWAY_LISTEN_FDS";

/// The longest a hand-over waits for in-flight operations (each app's
/// lock), and then for the new daemon to say it is ready.
const OPERATIONS_GRACE: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Descriptors a previous daemon handed over, by name.
#[derive(Default)]
pub struct Inherited {
    fds: HashMap<String, RawFd>,
}

impl Inherited {
    /// Read (and clear, so nothing the daemon starts sees it)
    /// `SLIPWAY_LISTEN_FDS`. Absent: a cold start, nothing inherited.
    pub fn from_env() -> Result<Inherited> {
        let Some(value) = std::env::var_os(LISTEN_FDS) else { return Ok(Inherited::default()) };
        std::env::remove_var(LISTEN_FDS);
        let value = value.to_str().context("SLIPWAY_LISTEN_FDS is not UTF-8")?.to_string();
        let mut fds = HashMap::new();
        for item in value.split(',').filter(|s| !s.is_empty()) {
            let (name, fd) = item.split_once(':').with_context(|| format!("SLIPWAY_LISTEN_FDS: `{item}` is not NAME:FD"))?;
            let fd: RawFd = fd.parse().with_context(|| format!("SLIPWAY_LISTEN_FDS: `{item}` has no descriptor number"))?;
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                bail!("SLIPWAY_LISTEN_FDS: descriptor {fd} ({name}) is not open");
            }
            fds.insert(name.to_string(), fd);
        }
        Ok(Inherited { fds })
    }

    pub fn is_handover(&self) -> bool {
        !self.fds.is_empty()
    }

    /// Take the descriptor named `name`, close-on-exec again so no app or
    /// build step inherits it.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let fd = self.fds.remove(name)?;
        // SAFETY: the previous daemon passed this descriptor to us alone
        // (checked open in from_env) and it is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(fd, true);
        Some(owned)
    }

    /// Tell the previous daemon we serve: one byte on the ready pipe.
    pub fn signal_ready(&mut self) {
        if let Some(fd) = self.take("ready") {
            let mut f = std::fs::File::from(fd);
            if let Err(e) = std::io::Write::write_all(&mut f, b"1") {
                tracing::warn!(error = %e, "telling the previous daemon we are ready failed");
            }
        }
    }
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor number; errors are reported through -1
    // and only mean the flag stayed as it was.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

/// The app instances a previous daemon left running that may be adopted:
/// still the process recorded (pid and start time), running as the app's
/// user from a directory of the app's. Anything else is reaped.
pub fn adoptable(p: &Platform) -> Vec<Leftover> {
    p.supervisor
        .leftovers()
        .into_iter()
        .filter(|l| {
            let Ok(app) = AppName::parse(&l.app) else { return false };
            let uid = p.user_of(&app).map(|u| u.uid);
            crate::runtime::runs_as_under(l.pid, uid, &p.layout.app(&app))
        })
        .collect()
}

/// Hand over to a new daemon (the binary at `exe`) the descriptors in
/// `fds`. On success the apps run on, supervised by the new daemon; the
/// returned instances (detached) hold their output pipes open until this
/// process exits. On failure this daemon takes its apps back and serves on.
pub async fn hand_over(p: &Platform, exe: &Path, fds: &[(String, RawFd)]) -> Result<Vec<Arc<Instance>>> {
    p.set_restarting(true);
    tracing::info!("hand-over to a new daemon begins: operations are refused until it is done");
    // Let in-flight operations end, and start no other: hold every app's lock.
    let deadline = tokio::time::Instant::now() + OPERATIONS_GRACE;
    let mut held = Vec::new();
    let apps = p.store.call(|s| s.apps()).await.unwrap_or_default();
    for app in apps {
        let Ok(name) = AppName::parse(&app.name) else { continue };
        match tokio::time::timeout_at(deadline, p.app_lock(&name).lock_owned()).await {
            Ok(g) => held.push(g),
            Err(_) => {
                p.set_restarting(false);
                bail!("an operation on {name} did not end within {}s; hand-over given up", OPERATIONS_GRACE.as_secs());
            }
        }
    }
    let detached = p.supervisor.detach_all().await;
    match spawn_successor(exe, fds).await {
        Ok(pid) => {
            tracing::info!(pid, "the new daemon is ready; this one stops accepting, drains and exits");
            Ok(detached)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "hand-over failed; taking the apps back");
            drop(held);
            p.supervisor.set_adoptable(adoptable(p));
            crate::release::restore_all(p).await;
            drop(detached);
            p.set_restarting(false);
            Err(e)
        }
    }
}

/// Start `exe` with our arguments and the descriptors, and wait for its
/// ready byte. Its pid once ready.
async fn spawn_successor(exe: &Path, fds: &[(String, RawFd)]) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making the ready pipe")?;
    let mut list: Vec<String> = fds.iter().map(|(n, fd)| format!("{n}:{fd}")).collect();
    list.push(format!("ready:{}", write.as_raw_fd()));
    let mut pass: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
    pass.push(write.as_raw_fd());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).env(LISTEN_FDS, list.join(","));
    // SAFETY: in the forked child before exec: fcntl is async-signal-safe;
    // clearing close-on-exec lets exactly these descriptors through.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &pass {
                set_cloexec(*fd, false);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
    drop(write);
    let pid = child.id();
    let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(read).context("reading the ready pipe")?;
    let mut byte = [0u8; 1];
    let outcome = tokio::time::timeout(READY_TIMEOUT, tokio::io::AsyncReadExt::read(&mut ready, &mut byte)).await;
    match outcome {
        Ok(Ok(1)) => Ok(pid),
        other => {
            // It never said ready: kill it hard (a TERM would stop the
            // apps it may have adopted), and reap it.
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            match other {
                Err(_) => bail!("the new daemon was not ready within {}s", READY_TIMEOUT.as_secs()),
                _ => bail!("the new daemon exited before it was ready (see its log lines above)"),
            }
        }
    }
}
