//! `slipway run`: a one-off command in an app's live release, attached to
//! the caller as if it ran locally. The client opens
//! `POST /api/apps/APP/attach` with `Upgrade: slipway-run`; over the
//! upgraded connection both sides speak frames: one kind byte, a u32
//! length, at most [`MAX_FRAME`] bytes of payload. The client sends the
//! command first, then its stdin, window sizes and signals; the server
//! sends stdout and stderr apart (or the terminal's output with `-t`) and
//! the exit code last.
//!
//! Memory stays bounded both ways: every relay holds at most a few frames
//! and waits for its reader, so a process that prints faster than its
//! client reads is slowed down, not buffered.

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::runtime::pty::{self, WindowSize};
use crate::runtime::ProcessCommand;

/// The `Upgrade:` protocol name.
pub const UPGRADE: &str = "slipway-run";

/// The largest payload of one frame.
pub const MAX_FRAME: usize = 64 * 1024;

/// Frame kinds. Client to server: START (JSON [`Start`], first and once),
/// STDIN, EOF (stdin closed), RESIZE (cols, rows: u16 each), SIGNAL (one
/// byte). Server to client: STDOUT, STDERR, EXIT (i32), ERROR (a message).
pub mod kind {
    pub const START: u8 = b'S';
    pub const STDIN: u8 = b'i';
    pub const EOF: u8 = b'e';
    pub const RESIZE: u8 = b'w';
    pub const SIGNAL: u8 = b'k';
    pub const STDOUT: u8 = b'o';
    pub const STDERR: u8 = b'r';
    pub const EXIT: u8 = b'x';
    pub const ERROR: u8 = b'!';
}

/// What to run, and on what.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub command: String,
    /// Give the command a terminal (`-t`).
    pub tty: bool,
    pub cols: u16,
    pub rows: u16,
    /// The client's `TERM`, for the command's terminal.
    #[serde(default)]
    pub term: Option<String>,
}

/// Signals a client may pass on: the ones a terminal user sends.
const PASSABLE_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds {MAX_FRAME}")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    for chunk in payload.chunks(MAX_FRAME).chain(payload.is_empty().then_some(&[][..])) {
        let mut frame = Vec::with_capacity(5 + chunk.len());
        frame.push(kind);
        frame.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        frame.extend_from_slice(chunk);
        w.write_all(&frame).await?;
    }
    w.flush().await
}

/// How a session ended, for the event log.
pub struct Outcome {
    /// The command as asked (empty when none arrived).
    pub command: String,
    /// `None`: the client went away first, and the command was stopped.
    pub exit_code: Option<i32>,
}

/// The server's half: read the command, start it through `prepare`
/// (which sets its user, release tree, environment and limits), relay
/// until it exits or the client leaves.
pub async fn serve<S>(io: S, prepare: impl FnOnce(&str) -> ProcessCommand) -> Outcome
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let start = match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd)).await {
        Ok(Ok(Some((kind::START, payload)))) => serde_json::from_slice::<Start>(&payload).map_err(|e| format!("invalid start frame: {e}")),
        Ok(Ok(_)) | Ok(Err(_)) => Err("expected the command first".to_string()),
        Err(_) => Err("no command within 30 s".to_string()),
    };
    let start = match start {
        Ok(s) if !s.command.trim().is_empty() && s.command.len() <= MAX_FRAME => s,
        Ok(_) => return refuse(&mut wr, "the command must be 1 byte to 64 KiB").await,
        Err(e) => return refuse(&mut wr, &e).await,
    };
    let command = start.command.clone();
    let mut cmd = prepare(&start.command);
    if start.tty {
        // Only a plausible terminal name: it is the one thing the client
        // adds to the release's environment.
        let term = start.term.filter(|t| !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._+".contains(&b)));
        cmd.env.retain(|(k, _)| k != "TERM");
        cmd.env.push(("TERM".into(), term.unwrap_or_else(|| "xterm".into())));
    }
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(8);
    let writer = tokio::spawn(async move {
        while let Some((k, payload)) = out_rx.recv().await {
            if write_frame(&mut wr, k, &payload).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let exit_code = if start.tty {
        relay_terminal(&mut rd, &cmd, WindowSize { cols: start.cols, rows: start.rows }, out_tx).await
    } else {
        relay_pipes(&mut rd, &cmd, out_tx).await
    };
    let _ = writer.await;
    Outcome { command, exit_code }
}

/// A session that cannot start: the client hears why.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, reason: &str) -> Outcome {
    let _ = write_frame(wr, kind::ERROR, reason.as_bytes()).await;
    Outcome { command: String::new(), exit_code: None }
}

async fn relay_pipes<R: AsyncRead + Unpin>(rd: &mut R, cmd: &ProcessCommand, out: mpsc::Sender<(u8, Vec<u8>)>) -> Option<i32> {
    let mut child = match pty::spawn_piped(cmd) {
        Ok(c) => c,
        Err(e) => {
            let _ = out.send((kind::ERROR, format!("starting the command: {e}").into_bytes())).await;
            return Some(127);
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut pumps = Vec::new();
    if let Some(o) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(o, kind::STDOUT, out.clone())));
    }
    if let Some(e) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(e, kind::STDERR, out.clone())));
    }
    let mut stdin = child.stdin.take();
    let mut client_open = true;
    let status = loop {
        tokio::select! {
            frame = read_frame(rd), if client_open => match frame {
                Ok(Some((kind::STDIN, data))) => {
                    if let Some(i) = stdin.as_mut() {
                        if i.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(Some((kind::EOF, _))) => stdin = None,
                Ok(Some((kind::SIGNAL, sig))) => pass_signal(pgid, &sig),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    client_open = false;
                    hang_up(pgid, &mut child).await;
                }
            },
            status = child.wait() => break status.ok(),
        }
    };
    // Leave nothing of the one-off running, then let the pipes drain.
    crate::runtime::signal_group(pgid, libc::SIGKILL);
    for p in pumps {
        let _ = p.await;
    }
    finish(client_open, status, out).await
}

async fn relay_terminal<R: AsyncRead + Unpin>(rd: &mut R, cmd: &ProcessCommand, size: WindowSize, out: mpsc::Sender<(u8, Vec<u8>)>) -> Option<i32> {
    let (mut child, term) = match pty::spawn_on_terminal(cmd, size) {
        Ok(c) => c,
        Err(e) => {
            let _ = out.send((kind::ERROR, format!("starting the command: {e}").into_bytes())).await;
            return Some(127);
        }
    };
    let term = std::sync::Arc::new(term);
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let pump = {
        let (term, out) = (term.clone(), out.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = term.read(&mut buf).await {
                if n == 0 || out.send((kind::STDOUT, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut client_open = true;
    let status = loop {
        tokio::select! {
            frame = read_frame(rd), if client_open => match frame {
                Ok(Some((kind::STDIN, data))) => {
                    let _ = term.write_all(&data).await;
                }
                Ok(Some((kind::RESIZE, p))) if p.len() == 4 => {
                    let _ = term.resize(WindowSize { cols: u16::from_be_bytes([p[0], p[1]]), rows: u16::from_be_bytes([p[2], p[3]]) });
                }
                Ok(Some((kind::SIGNAL, sig))) => pass_signal(pgid, &sig),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    client_open = false;
                    hang_up(pgid, &mut child).await;
                }
            },
            status = child.wait() => break status.ok(),
        }
    };
    crate::runtime::signal_group(pgid, libc::SIGKILL);
    // The terminal's last output, unless something the command left
    // behind in another job still holds it: then dropping our end hangs
    // the terminal up, which ends that too.
    let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
    drop(term);
    finish(client_open, status, out).await
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, k: u8, out: mpsc::Sender<(u8, Vec<u8>)>) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || out.send((k, buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}

fn pass_signal(pgid: i32, sig: &[u8]) {
    if let [s] = sig {
        let s = i32::from(*s);
        if PASSABLE_SIGNALS.contains(&s) {
            crate::runtime::signal_group(pgid, s);
        }
    }
}

/// The client went away: so does the command, as with a closed terminal.
async fn hang_up(pgid: i32, child: &mut tokio::process::Child) {
    crate::runtime::signal_group(pgid, libc::SIGHUP);
    crate::runtime::signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
        crate::runtime::signal_group(pgid, libc::SIGKILL);
    }
}

async fn finish(client_open: bool, status: Option<std::process::ExitStatus>, out: mpsc::Sender<(u8, Vec<u8>)>) -> Option<i32> {
    if !client_open {
        return None;
    }
    let code = match status {
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        None => 1,
    };
    let _ = out.send((kind::EXIT, code.to_be_bytes().to_vec())).await;
    Some(code)
}

// ---- the client's half ----

/// Attach the caller's stdin, stdout and stderr (or its terminal, with
/// `tty`) to a one-off on the upgraded connection `io`; returns the exit code.
pub async fn attach<S>(io: S, command: String, tty: bool) -> Result<i32>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    use std::io::IsTerminal;
    if tty && !std::io::stdin().is_terminal() {
        bail!("-t needs a terminal on stdin; leave it out to pipe input");
    }
    let size = if tty { terminal_size().unwrap_or(WindowSize::DEFAULT) } else { WindowSize::DEFAULT };
    let (mut rd, mut wr) = tokio::io::split(io);
    let start = Start { command, tty, cols: size.cols, rows: size.rows, term: std::env::var("TERM").ok() };
    write_frame(&mut wr, kind::START, &serde_json::to_vec(&start)?).await.context("sending the command")?;

    // One writer task: the frames to the server never wait on its output.
    let (to_server, mut frames) = mpsc::channel::<(u8, Vec<u8>)>(8);
    tokio::spawn(async move {
        while let Some((k, p)) = frames.recv().await {
            if write_frame(&mut wr, k, &p).await.is_err() {
                return;
            }
        }
    });
    // Raw from here on (restored on every way out): keys go to the remote
    // terminal as typed, Ctrl-C included.
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    forward_stdin(to_server.clone());
    forward_signals(to_server.clone(), tty)?;

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    // integrity track: without `-t`, the command's control sequences are
    // shown, not obeyed (with `-t` the terminal is the command's).
    let (mut out_filter, mut err_filter) = (crate::cli::printable::Printable::new(), crate::cli::printable::Printable::new());
    let shown = |f: &mut crate::cli::printable::Printable, d: &[u8]| if tty { d.to_vec() } else { f.filter(d) };
    loop {
        match read_frame(&mut rd).await.context("reading from the server")? {
            Some((kind::STDOUT, d)) => {
                stdout.write_all(&shown(&mut out_filter, &d))?;
                stdout.flush()?;
            }
            Some((kind::STDERR, d)) => {
                stderr.write_all(&shown(&mut err_filter, &d))?;
                stderr.flush()?;
            }
            Some((kind::EXIT, d)) if d.len() == 4 => return Ok(i32::from_be_bytes([d[0], d[1], d[2], d[3]])),
            Some((kind::ERROR, d)) => bail!("{}", String::from_utf8_lossy(&d)),
            Some(_) => {}
            None => bail!("the server closed the connection before the command finished"),
        }
    }
}

/// A thread, not a task: reading a terminal blocks, and the process exits
/// with the command, whatever this thread is waiting for.
fn forward_stdin(to_server: mpsc::Sender<(u8, Vec<u8>)>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to_server.blocking_send((kind::EOF, Vec::new()));
                    return;
                }
                Ok(n) => {
                    if to_server.blocking_send((kind::STDIN, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Without a terminal, signals the user sends here go to the command;
/// with one, window size changes do.
fn forward_signals(to_server: mpsc::Sender<(u8, Vec<u8>)>, tty: bool) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if tty {
        let mut winch = signal(SignalKind::window_change()).context("watching the window size")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(s) = terminal_size() {
                    let mut p = s.cols.to_be_bytes().to_vec();
                    p.extend_from_slice(&s.rows.to_be_bytes());
                    if to_server.send((kind::RESIZE, p)).await.is_err() {
                        return;
                    }
                }
            }
        });
        return Ok(());
    }
    for sig in PASSABLE_SIGNALS {
        let mut stream = signal(SignalKind::from_raw(sig)).with_context(|| format!("watching signal {sig}"))?;
        let tx = to_server.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send((kind::SIGNAL, vec![sig as u8])).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn terminal_size() -> Option<WindowSize> {
    let mut ws = nix::pty::Winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points at a live, writable value.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws as *mut nix::pty::Winsize) };
    (r == 0 && ws.ws_col > 0).then_some(WindowSize { cols: ws.ws_col, rows: ws.ws_row })
}

/// The local terminal in raw mode while this lives.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(|e| anyhow!("reading the terminal's mode: {e}"))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSADRAIN, &raw).map_err(|e| anyhow!("setting the terminal to raw mode: {e}"))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSADRAIN, &self.saved);
    }
}
