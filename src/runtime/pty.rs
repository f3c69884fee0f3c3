//! Interactive processes: a one-off with its stdin open (`slipway run`),
//! and one that owns a real terminal (`slipway run -t`, `ssh -t`). The
//! terminal is a pseudo-terminal pair: the process gets the slave side as
//! its controlling terminal in a session of its own, the daemon keeps the
//! master and relays bytes, window sizes and nothing else. Ctrl-C needs no
//! help: the client's terminal is raw, the byte 0x03 reaches the line
//! discipline, which signals the foreground job as a local terminal would.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;

use nix::pty::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use super::ProcessCommand;

/// Columns and rows of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

impl WindowSize {
    /// What a terminal that said nothing gets, as `ssh -t` assumes.
    pub const DEFAULT: WindowSize = WindowSize { cols: 80, rows: 24 };

    fn winsize(self) -> Winsize {
        Winsize { ws_row: self.rows.max(1), ws_col: self.cols.max(1), ws_xpixel: 0, ws_ypixel: 0 }
    }
}

/// The daemon's end of a pseudo-terminal, non-blocking.
pub struct Pty {
    master: AsyncFd<OwnedFd>,
}

impl Pty {
    /// Read what the process wrote. `Ok(0)` once every holder of the
    /// slave side is gone (Linux answers EIO then).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Write all of `data` as the terminal's input.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Tell the terminal (and so, by SIGWINCH, its foreground job) its size.
    pub fn resize(&self, size: WindowSize) -> std::io::Result<()> {
        set_size(self.master.get_ref(), size)
    }
}

/// Start a one-off as `cmd` says (user, directory, environment), its stdin,
/// stdout and stderr each a pipe of their own, in its own process group.
pub fn spawn_piped(cmd: &ProcessCommand) -> std::io::Result<Child> {
    let mut c = cmd.to_command_with_stdin(true)?;
    c.stdin(Stdio::piped());
    c.spawn()
}

/// Start a one-off on a new terminal of `size`: the command as `cmd` says,
/// as session leader with the terminal as its controlling terminal.
pub fn spawn_on_terminal(cmd: &ProcessCommand, size: WindowSize) -> std::io::Result<(Child, Pty)> {
    // Not `to_command`: that puts the child in a process group of its own,
    // and a group leader may not start a session. A session is a group too,
    // so stopping the group still reaches everything it forks.
    let shell = if std::path::Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
    let mut c = Command::new(shell);
    c.arg("-c").arg(&cmd.command).current_dir(&cmd.cwd).env_clear().envs(cmd.env.iter().map(|(k, v)| (k, v)));
    if let Some(u) = cmd.user {
        c.uid(u.uid).gid(u.gid);
    }
    cmd.join_cgroup(&mut c)?;
    spawn_in_terminal(c, size, cmd.user.map(|u| (u.uid, u.gid)))
}

/// Start `cmd` (whose program, arguments and environment the caller set)
/// on a new terminal of `size`. `owner`: who the terminal device belongs
/// to, so that a program reopening it by name (`/dev/pts/N`) may.
pub fn spawn_in_terminal(mut cmd: Command, size: WindowSize, owner: Option<(u32, u32)>) -> std::io::Result<(Child, Pty)> {
    let pair = nix::pty::openpty(Some(&size.winsize()), None).map_err(std::io::Error::from)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(pair.slave.as_fd(), Some(uid), Some(gid))?;
    }
    let slave = std::fs::File::from(pair.slave);
    cmd.stdin(slave.try_clone()?).stdout(slave.try_clone()?).stderr(slave).kill_on_drop(false);
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setsid, ioctl), touching no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The parent's copies of the slave went with `cmd`'s stdio when it was
    // spawned; `cmd` is dropped here, so only the child holds the slave and
    // the master reads EOF once the child's session lets go of it.
    drop(cmd);
    nix::fcntl::fcntl(&pair.master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).map_err(std::io::Error::from)?;
    // SAFETY: the OwnedFd is owned by the AsyncFd from here on, so the
    // descriptor stays open and the same until the AsyncFd drops.
    let master = unsafe { AsyncFd::register(pair.master) }.map_err(std::io::Error::from)?;
    Ok((child, Pty { master }))
}

fn set_size(fd: &OwnedFd, size: WindowSize) -> std::io::Result<()> {
    let ws = size.winsize();
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives
    // across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const Winsize) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
