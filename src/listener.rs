//! Admission for every listener (the proxy, HTTPS, the API, SSH): a
//! global cap on open connections kept below the descriptor limit, a cap
//! per peer address, and an accept loop that outlives `EMFILE` instead of
//! ending the listener. DESIGN.md workflow 10: no client may exhaust the
//! daemon's descriptors, and a refused client costs one accept and one
//! close, nothing more.
//!
//! The caps come from one [`Budget`] made at start from `RLIMIT_NOFILE`
//! (raised to its hard limit first): a reserve is kept out of every
//! listener's share for what the daemon itself needs (deploys, git, app
//! output pipes, log files, the database, the local socket).
//!
//! [`Liveness`] records whether each listener's task still runs, so that
//! `/healthz` can fail when one has stopped rather than answer "ok" for a
//! daemon that no longer takes pushes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The daemon's listeners, for `/healthz`.
pub static LISTENERS: LazyLock<Liveness> = LazyLock::new(Liveness::default);

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the soft
/// limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; failure leaves it zeroed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own; a refusal keeps the old limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// How the descriptor limit is shared out between the listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Connections the app listeners (HTTP and HTTPS together) may hold.
    pub proxy: usize,
    /// Connections the API may hold (git over HTTP included).
    pub api: usize,
    /// Connections the SSH server may hold.
    pub ssh: usize,
    /// Kept for the daemon's own work, never given to a listener.
    pub reserve: usize,
}

impl Budget {
    /// Split `nofile` descriptors: a reserve of a fifth (at least 256),
    /// then 70% of the rest for the apps' traffic (a proxied request holds
    /// two descriptors: client and upstream) and 15% each for the API and
    /// SSH.
    pub fn from_limit(nofile: u64) -> Budget {
        let nofile = nofile.min(1 << 22) as usize;
        let reserve = (nofile / 5).max(256).min(nofile);
        let rest = nofile - reserve;
        Budget { proxy: rest * 7 / 10 / 2, api: rest * 15 / 100, ssh: rest * 15 / 100, reserve }
    }
}

/// The per-peer cap for a listener holding `total`: an eighth of it, so
/// that one address cannot take the listener for everyone, but a busy
/// NAT or office still gets plenty.
pub fn per_peer(total: usize) -> usize {
    (total / 8).clamp(16, 4096)
}

/// Admission for one listener: at most `total` connections open, at most
/// `per_peer` from one address.
pub struct Gate {
    name: &'static str,
    total: Arc<Semaphore>,
    per_peer: usize,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection. Dropping it gives its place back.
pub struct Permit {
    _total: OwnedSemaphorePermit,
    peer: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its whole share.
    Full,
    /// This peer holds its whole share.
    PeerFull,
}

impl Gate {
    pub fn new(name: &'static str, total: usize, per_peer: usize) -> Gate {
        Gate {
            name,
            total: Arc::new(Semaphore::new(total.max(1))),
            per_peer: per_peer.max(1),
            peers: Arc::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Admit a connection from `peer`, or say why not.
    pub fn admit(&self, peer: IpAddr) -> Result<Permit, Refusal> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| Refusal::Full)?;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(peer).or_insert(0);
        if *n >= self.per_peer {
            return Err(Refusal::PeerFull);
        }
        *n += 1;
        Ok(Permit { _total: total, peer, peers: self.peers.clone() })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }
}

/// Accept the next admitted connection. Never returns an error: a failed
/// accept (out of descriptors, a connection reset before it was taken) is
/// logged at most once a second and retried after a pause, and a refused
/// peer is closed at once.
pub async fn accept(listener: &TcpListener, gate: &Gate) -> (TcpStream, SocketAddr, Permit) {
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match gate.admit(peer.ip()) {
                Ok(permit) => return (stream, peer, permit),
                Err(why) => {
                    tracing::debug!(listener = gate.name, %peer, ?why, "connection refused by the admission cap");
                    drop(stream);
                }
            },
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(listener = gate.name, error = %e, "accept failed; retrying");
                    last_warning = Some(std::time::Instant::now());
                }
                // EMFILE leaves the connection in the backlog: without a
                // pause the loop would spin on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// An admitted connection: its stream, its place in the gate, and two
/// clocks. The client must send its first byte within `first_byte` (an
/// idle connection that never speaks is the cheapest flood), and the
/// connection closes once nothing has moved either way for `idle`.
pub struct Guarded<S> {
    inner: S,
    _permit: Permit,
    idle: Duration,
    /// Until the first byte: the handshake deadline; then the idle one.
    deadline: Pin<Box<Sleep>>,
    last_activity: Instant,
    /// Whether the client has sent anything yet.
    spoke: bool,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, permit: Permit, first_byte: Duration, idle: Duration) -> Guarded<S> {
        let now = Instant::now();
        Guarded { inner, _permit: permit, idle, deadline: Box::pin(tokio::time::sleep_until(now + first_byte)), last_activity: now, spoke: false }
    }

    fn moved(&mut self) {
        // Resetting a timer on every read would cost more than the read:
        // note the time, and push the deadline only when it fires.
        self.last_activity = Instant::now();
    }

    /// Err(TimedOut) once the deadline has passed with nothing moving.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.deadline.as_mut().poll(cx).is_ready() {
            if !self.spoke {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "client sent nothing"));
            }
            let next = self.last_activity + self.idle;
            if next <= Instant::now() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long"));
            }
            self.deadline.as_mut().reset(next);
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.spoke = true;
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP listener behind a [`Gate`], for `axum::serve`: refused peers are
/// closed at once, accept errors (EMFILE) never end the listener, and
/// every connection is [`Guarded`].
pub struct GatedListener {
    listener: TcpListener,
    gate: Arc<Gate>,
    first_byte: Duration,
    idle: Duration,
}

impl GatedListener {
    pub fn new(listener: TcpListener, gate: Arc<Gate>, first_byte: Duration, idle: Duration) -> GatedListener {
        GatedListener { listener, gate, first_byte, idle }
    }
}

impl axum::serve::Listener for GatedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, peer, permit) = accept(&self.listener, &self.gate).await;
        let _ = stream.set_nodelay(true);
        (Guarded::new(stream, permit, self.first_byte, self.idle), peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Which listener tasks are running. `/healthz` fails when one is not.
#[derive(Default, Clone)]
pub struct Liveness {
    listeners: Arc<Mutex<Vec<ListenerFlag>>>,
}

/// A listener's name and whether its task still runs.
type ListenerFlag = (&'static str, Arc<AtomicBool>);

/// Marks its listener down when dropped: hold it for the life of the task.
pub struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Liveness {
    /// Register a listener as up; it is down once the returned guard drops.
    pub fn up(&self, name: &'static str) -> Alive {
        let flag = Arc::new(AtomicBool::new(true));
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push((name, flag.clone()));
        Alive(flag)
    }

    /// The names of listeners that have stopped.
    pub fn down(&self) -> Vec<&'static str> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, f)| !f.load(Ordering::Acquire))
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_a_reserve() {
        let b = Budget::from_limit(20_000);
        assert_eq!(b.reserve, 4_000);
        assert!(b.proxy * 2 + b.api + b.ssh + b.reserve <= 20_000);
        let small = Budget::from_limit(1024);
        assert_eq!(small.reserve, 256);
        assert!(small.proxy > 0 && small.api > 0 && small.ssh > 0);
    }

    #[test]
    fn gate_caps_total_and_per_peer() {
        let gate = Gate::new("test", 3, 2);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let p1 = gate.admit(a).expect("first");
        let _p2 = gate.admit(a).expect("second");
        assert_eq!(gate.admit(a).err(), Some(Refusal::PeerFull));
        let _p3 = gate.admit(b).expect("other peer");
        assert_eq!(gate.admit(b).err(), Some(Refusal::Full));
        drop(p1);
        assert_eq!(gate.open(), 2);
        gate.admit(a).expect("a place was given back");
    }

    #[test]
    fn liveness_reports_stopped_listeners() {
        let l = Liveness::default();
        let ssh = l.up("ssh");
        let _api = l.up("api");
        assert!(l.down().is_empty());
        drop(ssh);
        assert_eq!(l.down(), vec!["ssh"]);
    }
}
