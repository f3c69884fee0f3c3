//! slipway's own pool of keep-alive HTTP/1.1 connections to app upstreams
//! (issue 13 #4), in place of hyper-util's legacy pooled client.
//!
//! Why its own: under wrk the legacy client cost, per request, an
//! absolute URI carrying the owner uid (how its connector learnt it), a
//! hash of that URI to find the pool key under one pool-wide mutex, a
//! boxed connector future, and, for HTTP/1, a spawned task waiting for the
//! connection to be ready again before it went back to the pool. Here:
//!
//! - An upstream's idle connections hang off its [`super::Target`] (address
//!   and owner uid): found by the pointer the request already holds, and
//!   never reused for another address or owner, since a new address is a
//!   new `Target` with an empty pool (the old one's connections close when
//!   it is dropped).
//! - They sit in a few small LIFO stacks (shards), each behind a
//!   `std::sync::Mutex` held for a push or a pop, never across `.await`.
//!   A worker thread starts at its own shard, so the two workers of a
//!   2-core host rarely meet on one lock. At most [`MAX_IDLE`] per upstream.
//! - A connection goes back when its response body has ended (see
//!   `body::Tracked`), with no task of its own; one left mid-body is
//!   dropped, which closes it.
//!
//! Architecture invariant: a connection is reused only while it has been
//! idle less than [`IDLE_TIMEOUT`], shorter than the keep-alive timeout of
//! any app server we know (gunicorn, uWSGI, nginx: 2 s or more), so a
//! reused connection is never one the app is about to close. The stale one
//! that slips through anyway (an app restarted, a shorter timeout) fails
//! as "not answered", and the proxy retries idempotent bodiless requests
//! on a fresh connection.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{owner, ProxyBody, Target};

/// Longest a connection waits idle in the pool before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often idle connections past [`IDLE_TIMEOUT`] are closed (a
/// checkout also skips them, so this bounds only how long they hold a
/// descriptor).
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Idle connections kept per upstream: enough for a 512-connection load
/// of keep-alive clients, bounded so a burst does not keep thousands of
/// descriptors (the app's and ours) open afterwards.
pub const MAX_IDLE: usize = 512;
const SHARDS: usize = 4;
const PER_SHARD: usize = MAX_IDLE / SHARDS;
/// Time for a new upstream connection (the legacy client's connect timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection goes back to the pool as its response body ends, when its
/// task may not yet have turned to wait for the next request: a checkout
/// waits this long for it to be ready before taking another.
const READY_WAIT: Duration = Duration::from_millis(100);

/// One upstream's idle connections.
#[derive(Debug)]
pub struct Idle {
    shards: [Mutex<Vec<Parked>>; SHARDS],
}

struct Parked {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked").field("since", &self.since).finish_non_exhaustive()
    }
}

impl Default for Idle {
    fn default() -> Self {
        Idle { shards: std::array::from_fn(|_| Mutex::new(Vec::new())) }
    }
}

/// The shard a worker thread starts at: threads are dealt shards in turn.
fn home_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static HOME: Cell<usize> = const { Cell::new(usize::MAX) });
    HOME.with(|h| {
        if h.get() == usize::MAX {
            h.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        h.get()
    })
}

impl Idle {
    /// The most recently parked live connection younger than
    /// `IDLE_TIMEOUT`, if any.
    fn take(&self) -> Option<SendRequest<ProxyBody>> {
        let home = home_shard();
        let now = Instant::now();
        for i in 0..SHARDS {
            let mut stack = self.shards[(home + i) % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
            while let Some(p) = stack.pop() {
                if now.duration_since(p.since) >= IDLE_TIMEOUT {
                    // The stack is in parking order: all below are older.
                    let stale = std::mem::take(&mut *stack);
                    drop(stack);
                    drop((p, stale));
                    break;
                }
                if !p.sender.is_closed() {
                    return Some(p.sender);
                }
            }
        }
        None
    }

    /// Park a connection whose last response has been read in full.
    pub fn put(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let home = home_shard();
        let parked = Parked { sender, since: Instant::now() };
        for i in 0..SHARDS {
            let mut stack = self.shards[(home + i) % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
            if stack.len() < PER_SHARD {
                stack.push(parked);
                return;
            }
        }
        // Every shard full: the connection is dropped, which closes it.
    }

    /// Close the connections idle past `IDLE_TIMEOUT` (the periodic sweep).
    pub fn expire(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut stack = shard.lock().unwrap_or_else(|e| e.into_inner());
            // The live ones keep their order; the others are dropped (which
            // closes them) once the lock is released.
            let (live, stale): (Vec<Parked>, Vec<Parked>) =
                std::mem::take(&mut *stack).into_iter().partition(|p| now.duration_since(p.since) < IDLE_TIMEOUT && !p.sender.is_closed());
            *stack = live;
            drop(stack);
            drop(stale);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|s| s.len()).unwrap_or(0)).sum()
    }
}

/// A connection to an upstream, ready for one request.
pub struct Conn {
    pub sender: SendRequest<ProxyBody>,
    /// It came from the pool: it may be one the app closed meanwhile.
    pub reused: bool,
}

/// A pooled connection if one is ready, else a new one.
pub async fn checkout(target: &Target) -> io::Result<Conn> {
    while let Some(mut sender) = target.idle.take() {
        if sender.is_ready() {
            return Ok(Conn { sender, reused: true });
        }
        if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
            return Ok(Conn { sender, reused: true });
        }
    }
    connect(target).await.map(|sender| Conn { sender, reused: false })
}

/// A new connection to `target`, checked to reach the app's own socket
/// (`owner::verify`) before it carries a byte. An error here
/// means the request reached no app.
pub async fn connect(target: &Target) -> io::Result<SendRequest<ProxyBody>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {} timed out", target.addr)))??;
    // Requests and responses are small and written whole: Nagle would
    // only hold the last segment of each back.
    stream.set_nodelay(true)?;
    if let Some(uid) = target.owner {
        owner::verify(&stream, uid).await?;
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
    // The connection's task: it ends when the connection closes, or when
    // its sender is dropped while it is idle. With upgrades, so a 101
    // answer hands the socket to the WebSocket bridge.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An origin answering every request on a connection with a fixed
    /// body, counting the connections it accepted.
    async fn origin() -> (std::net::SocketAddr, std::sync::Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(target: &Target) -> bool {
        let mut conn = checkout(target).await.expect("connection");
        let req = Request::get("/").header("host", "x").body(Empty::new().map_err(|never| match never {}).boxed()).expect("request");
        let resp = conn.sender.send_request(req).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, Bytes::from_static(b"ok"));
        target.idle.put(conn.sender);
        conn.reused
    }

    #[tokio::test]
    async fn a_connection_is_reused_while_fresh_and_closed_once_idle_too_long() {
        let (addr, accepted) = origin().await;
        let target = Target::new(addr, None);
        assert!(!get(&target).await, "the first request opens a connection");
        for _ in 0..5 {
            assert!(get(&target).await, "later ones reuse it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(target.idle.len(), 1);

        tokio::time::sleep(IDLE_TIMEOUT + Duration::from_millis(50)).await;
        target.idle.expire();
        assert_eq!(target.idle.len(), 0, "the sweep closes it");
        assert!(!get(&target).await, "a request after the timeout opens a new one");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_full_pool_closes_what_it_cannot_keep() {
        let (addr, _) = origin().await;
        let target = Target::new(addr, None);
        let mut senders = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            senders.push(connect(&target).await.expect("connect"));
        }
        for s in senders {
            target.idle.put(s);
        }
        assert_eq!(target.idle.len(), MAX_IDLE);
    }
}
