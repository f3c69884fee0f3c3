//! The HTTP reverse proxy on `--http`: routes by Host to an app's live
//! web processes, and the health probe that gates traffic.
//!
//! Architecture invariant: only this module speaks HTTP to app upstreams.
//! The route table is immutable once built; a deploy builds a new one and
//! stores it in an `ArcSwap` (as pingora does with its backends), so the
//! request path never takes a lock. Each upstream counts its in-flight
//! requests, which is how a deploy knows an old process has drained.

pub mod access;
mod body;
mod forwarded;
pub mod owner;
mod pool;
mod statics;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::listener::{self, Gate};
pub use forwarded::Scheme;
pub use statics::Statics;

type ProxyBody = BoxBody<Bytes, body::BoxError>;

/// Time a client has to send a request's headers, and the longest an idle
/// keep-alive connection is kept (hyper starts the clock when it waits for
/// a request head).
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// Grace for open connections when the daemon stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One running web process the proxy may send requests to. Its address
/// can change under it (a web process restarted by the supervisor comes
/// back on a fresh port, so nothing can squat the old one): the route
/// table keeps the same `Upstream`, and the next request uses the new
/// address.
#[derive(Debug)]
pub struct Upstream {
    target: ArcSwap<Target>,
    /// The uid that must own the socket at `addr` (the app's user); `None`
    /// when apps run as the daemon's own user and there is nothing to tell
    /// them apart by.
    owner: Option<u32>,
    in_flight: AtomicUsize,
    /// Cancelled when a drain times out: upgraded connections (WebSockets)
    /// still open to this upstream are then closed.
    closing: CancellationToken,
}

/// Where an upstream is, who must own its socket, and the idle
/// connections to it: a new address is a new `Target` with an empty pool,
/// so no connection outlives the address or owner it was checked for.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    owner: Option<u32>,
    idle: pool::Idle,
}

impl Target {
    fn new(addr: SocketAddr, owner: Option<u32>) -> Target {
        Target { addr, owner, idle: pool::Idle::default() }
    }
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Arc<Upstream> {
        Upstream::owned(addr, None)
    }
    /// An upstream whose listening socket must belong to `owner`: the
    /// proxy refuses to send it traffic otherwise (ARCHITECTURE.md).
    pub fn owned(addr: SocketAddr, owner: Option<u32>) -> Arc<Upstream> {
        Arc::new(Upstream {
            target: ArcSwap::from_pointee(Target::new(addr, owner)),
            owner,
            in_flight: AtomicUsize::new(0),
            closing: CancellationToken::new(),
        })
    }
    pub fn addr(&self) -> SocketAddr {
        self.target.load().addr
    }
    /// Point it at a new address (its process was restarted elsewhere).
    pub fn set_addr(&self, addr: SocketAddr) {
        self.target.store(Arc::new(Target::new(addr, self.owner)));
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Where one app's traffic goes: its live upstreams, balanced round-robin.
#[derive(Debug)]
struct Backend {
    upstreams: Vec<Arc<Upstream>>,
    next: AtomicUsize,
}

/// Host → what answers there. Built whole, never mutated after it is stored.
#[derive(Default)]
struct RouteTable {
    hosts: HashMap<String, Route>,
}

/// One app's entry: its upstreams and the `[static]` mounts of the same
/// live release, swapped together.
#[derive(Clone)]
struct Route {
    backend: Arc<Backend>,
    statics: Arc<Statics>,
}

/// What one app contributes to the route table.
#[derive(Clone, Default)]
struct AppRoute {
    hosts: Vec<String>,
    backend: Option<Arc<Backend>>,
    statics: Arc<Statics>,
}

/// upgrade track: how long an open connection is still served once the
/// proxy begins closing (a hand-over, a shutdown), before its graceful
/// close (see `serve_connection`).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

pub struct Proxy {
    routes: ArcSwap<RouteTable>,
    /// The source the table is rebuilt from. Writers (deploys, domain
    /// changes) are rare and serialized here; readers never touch it.
    apps: Mutex<HashMap<String, AppRoute>>,
    /// Set once the sweep of idle upstream connections runs (started by
    /// the first connection served, inside the runtime).
    sweeping: std::sync::OnceLock<()>,
    /// Peers whose `X-Forwarded-*` are believed (`--trusted-proxy`).
    trusted: ArcSwap<Vec<IpNet>>,
    /// Flipped once when the daemon stops: every connection, on any
    /// listener, finishes its request and closes.
    closing: watch::Sender<bool>,
    /// The same, read by every response (`closing.borrow()` takes a read
    /// lock that both workers' requests would contend on).
    closing_now: AtomicBool,
    // tls track: set with --https; plain HTTP asks it about ACME challenges and redirects.
    certs: std::sync::OnceLock<Arc<crate::certs::Certs>>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

impl Proxy {
    pub fn new() -> Proxy {
        Proxy {
            routes: ArcSwap::from_pointee(RouteTable::default()),
            apps: Mutex::new(HashMap::new()),
            sweeping: std::sync::OnceLock::new(),
            trusted: ArcSwap::from_pointee(Vec::new()),
            closing: watch::channel(false).0,
            closing_now: AtomicBool::new(false),
            certs: std::sync::OnceLock::new(),
        }
    }

    /// With `--https`: plain HTTP answers ACME challenges and redirects
    /// hosts that have a certificate (tls track).
    pub fn set_certs(&self, certs: Arc<crate::certs::Certs>) {
        let _ = self.certs.set(certs);
    }

    /// Believe `X-Forwarded-*` from peers in these ranges.
    pub fn set_trusted_proxies(&self, nets: Vec<IpNet>) {
        self.trusted.store(Arc::new(nets));
    }

    /// Set the hosts an app answers on (its default host and its domains).
    pub fn set_hosts(&self, app: &str, hosts: Vec<String>) {
        self.update(|apps| apps.entry(app.to_string()).or_default().hosts = hosts);
    }

    /// Swap the app's upstreams in one atomic store. An empty list makes
    /// the app answer 503.
    pub fn set_upstreams(&self, app: &str, upstreams: Vec<Arc<Upstream>>) {
        let backend = Arc::new(Backend { upstreams, next: AtomicUsize::new(0) });
        self.update(|apps| apps.entry(app.to_string()).or_default().backend = Some(backend));
    }

    /// Serve `[static]` from another release's tree (its processes were
    /// reloaded in place, so its upstreams stay).
    pub fn set_statics(&self, app: &str, statics: Statics) {
        self.update(|apps| apps.entry(app.to_string()).or_default().statics = Arc::new(statics));
    }

    /// A release goes live: its upstreams and its static files in one
    /// atomic store, so no request sees one release's page with another's
    /// assets.
    pub fn switch(&self, app: &str, upstreams: Vec<Arc<Upstream>>, statics: Statics) {
        let backend = Arc::new(Backend { upstreams, next: AtomicUsize::new(0) });
        self.update(|apps| {
            let route = apps.entry(app.to_string()).or_default();
            route.backend = Some(backend);
            route.statics = Arc::new(statics);
        });
    }

    pub fn upstreams(&self, app: &str) -> Vec<Arc<Upstream>> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.get(app).and_then(|r| r.backend.as_ref()).map(|b| b.upstreams.clone()).unwrap_or_default()
    }

    pub fn remove_app(&self, app: &str) {
        self.update(|apps| {
            apps.remove(app);
        });
    }

    fn update(&self, f: impl FnOnce(&mut HashMap<String, AppRoute>)) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut apps);
        let empty = Arc::new(Backend { upstreams: Vec::new(), next: AtomicUsize::new(0) });
        let mut table = RouteTable::default();
        for route in apps.values() {
            let entry = Route { backend: route.backend.clone().unwrap_or_else(|| empty.clone()), statics: route.statics.clone() };
            for host in &route.hosts {
                table.hosts.insert(host.clone(), entry.clone());
            }
        }
        self.routes.store(Arc::new(table));
    }

    /// Wait until none of `upstreams` has a request in flight (upgraded
    /// connections included), or `timeout`; then close the upgraded
    /// connections still open. Call after they were swapped out, so no new
    /// request can reach them.
    pub async fn drain(&self, upstreams: &[Arc<Upstream>], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if upstreams.iter().all(|u| u.in_flight() == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                for u in upstreams {
                    u.closing.cancel();
                }
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finish open requests and close every connection (daemon shutdown,
    /// or the old daemon's side of a hand-over).
    pub fn close(&self) {
        self.closing_now.store(true, Ordering::Release);
        self.closing.send_replace(true);
    }

    /// Serve plain HTTP on `listener` until `shutdown` flips, admitting
    /// connections through `gate`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, gate: Arc<Gate>, mut shutdown: watch::Receiver<bool>) {
        let _alive = listener::LISTENERS.up("http");
        loop {
            let (stream, peer, permit) = tokio::select! {
                c = listener::accept(&listener, &gate) => c,
                _ = shutdown.changed() => {
                    self.close();
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                proxy.serve_connection(stream, peer, Scheme::Http).await;
                drop(permit);
            });
        }
    }

    /// Serve one accepted connection (plain TCP, or TLS from the HTTPS
    /// listener) until it closes. HTTP/1.1 for `Scheme::Http`; HTTP/1.1 or
    /// HTTP/2 for `Scheme::Https`, by what the client speaks (ALPN). The
    /// scheme is what the app is told in `X-Forwarded-Proto`.
    pub async fn serve_connection<I>(self: Arc<Self>, io: I, peer: SocketAddr, scheme: Scheme)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.sweeping.get_or_init(|| {
            tokio::spawn(sweep_idle(Arc::downgrade(&self)));
        });
        let mut closing = self.closing.subscribe();
        // upgrade track: once the listener closes (a hand-over, a
        // shutdown), open connections are served CLOSE_LINGER more before
        // their graceful close, and every HTTP/1 response in that time says
        // `Connection: close`. A busy keep-alive client thus learns from a
        // response to reconnect (to the new daemon, which holds the same
        // listening socket) instead of finding its connection closed under
        // a request it has already sent; a connection accepted just before
        // the close gets its first request read and answered. Only a client
        // idle for the whole linger meets the close, as at any keep-alive
        // timeout.
        let closing_now = async move {
            let _ = closing.wait_for(|v| *v).await;
            tokio::time::sleep(CLOSE_LINGER).await;
        };
        tokio::pin!(closing_now);
        let proxy = self.clone();
        let peer = forwarded::Peer::new(peer);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (proxy, peer) = (proxy.clone(), peer.clone());
            async move {
                let http1 = req.version() < hyper::Version::HTTP_2;
                let mut resp = proxy.handle(req, &peer, scheme).await;
                if http1 && proxy.closing_now.load(Ordering::Acquire) && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let io = TokioIo::new(io);
        match scheme {
            Scheme::Http => {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(io, service)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = &mut closing_now => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                    }
                }
            }
            Scheme::Https => {
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20));
                let conn = builder.serve_connection_with_upgrades(io, service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = &mut closing_now => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                    }
                }
            }
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: &forwarded::Peer, scheme: Scheme) -> Response<ProxyBody> {
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            return page(StatusCode::BAD_REQUEST, "bad request", "The request has more than one Host header.");
        }
        let host = match request_host(&req) {
            Some(h) => h,
            None => return page(StatusCode::BAD_REQUEST, "bad request", "The request has no Host header."),
        };
        // tls track: ACME HTTP-01 answers and the redirect to HTTPS.
        if let (Some(certs), Scheme::Http) = (self.certs.get(), scheme) {
            if let Some(answer) = intercept(certs, &host, &req) {
                return answer;
            }
        }
        let Route { backend, statics } = match self.routes.load().hosts.get(&host) {
            Some(r) => r.clone(),
            None => {
                return page(
                    StatusCode::NOT_FOUND,
                    "no such app",
                    &format!("No app answers at {}.", html_escape(&host)),
                )
            }
        };
        if backend.upstreams.is_empty() {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "app not running",
                &format!("The app at {} has no running web process.", html_escape(&host)),
            );
        }
        // `[static]`: answered here, from the live release's tree.
        if let Some(resp) = statics.serve(&req).await {
            return resp;
        }

        // An HTTP/1.1 upgrade (WebSocket): keep the two headers the hop
        // rules would strip, and take the client's side of the upgrade.
        let upgrade = requested_upgrade(&req);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        strip_hop_headers(&mut parts.headers);
        if !parts.headers.contains_key(HOST) {
            // HTTP/2 carries the host in :authority; the app expects Host.
            if let Some(v) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                parts.headers.insert(HOST, v);
            }
        }
        let trusted = forwarded::is_trusted(&self.trusted.load(), peer.ip());
        forwarded::rewrite(&mut parts.headers, peer, scheme, trusted);
        if let Some(u) = &upgrade {
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, u.clone());
        }
        parts.version = Version::HTTP_11;
        // Requests go upstream in origin form (`GET /path HTTP/1.1`): an
        // HTTP/2 request arrives with an absolute URI.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let origin_form = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = origin_form.into();
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();

        // Which failures a retry may follow. A connection that could not be
        // made (refused, timed out, or held by another user) carried no
        // byte of the request: it goes to the next upstream. A request
        // that failed on an open connection before an answer (the app
        // closed it while idle: a keep-alive race) may be sent again on a
        // fresh connection when it is idempotent and bodiless (RFC 9110
        // 9.2.2): the app may have seen it, and seeing it twice changes
        // nothing.
        let replayable = body.is_end_stream();
        let idempotent = replayable && is_idempotent(&parts.method);
        // A request without a body has no rate to hold it to (and no timer
        // or box to pay for).
        let mut body: Option<ProxyBody> = Some(if replayable { empty_body() } else { body::MinRate::new(body).boxed() });
        let n = backend.upstreams.len();
        let start = backend.next.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        // Fresh connections tried after a pooled one failed: two, as an
        // app under heavy load may drop the first fresh one as well.
        let mut fresh_tries = 0u8;
        // The request head, kept only while a retry may still need it: a
        // request that cannot be retried sends the original.
        let mut head = Some(parts);
        loop {
            let upstream = &backend.upstreams[(start + attempt) % n];
            let target = upstream.target.load_full();
            let upstream_addr = target.addr;
            // Counted from before the connection is made: a drain that
            // starts meanwhile waits for this request too.
            let guard = InFlight::new(upstream.clone());
            let conn = if fresh_tries > 0 {
                pool::connect(&target).await.map(|sender| pool::Conn { sender, reused: false })
            } else {
                pool::checkout(&target).await
            };
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) if attempt + 1 < n => {
                    tracing::debug!(upstream = %upstream_addr, error = %e, "upstream refused; trying next");
                    attempt += 1;
                    continue;
                }
                Err(e) => {
                    // A refused connection is what a restarting app looks
                    // like; one line per request would flood the log.
                    tracing::debug!(%host, upstream = %upstream_addr, error = %e, "upstream refused the connection");
                    return bad_gateway();
                }
            };
            let may_retry = idempotent && fresh_tries < 2;
            let Some(sending) = (if may_retry { head.clone() } else { head.take() }) else {
                return bad_gateway();
            };
            let method = sending.method.clone();
            let req = Request::from_parts(sending, body.take().unwrap_or_else(empty_body));
            let sent_at = Instant::now();
            match conn.sender.send_request(req).await {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client_side) = client_upgrade {
                            // The connection is the bridge's now: it never
                            // goes back to the pool.
                            let upstream_side = hyper::upgrade::on(&mut resp);
                            tokio::spawn(bridge(client_side, upstream_side, guard));
                            let (rparts, _) = resp.into_parts();
                            return Response::from_parts(rparts, empty_body());
                        }
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_headers(&mut rparts.headers);
                    // The guard lives as long as the response body streams,
                    // so a draining upstream is not stopped mid-response;
                    // the connection goes back to the pool when the body
                    // has ended.
                    // history track (issue 13 #5): its router line is queued when the body ends.
                    let tracked = body::Tracked::new(rbody, guard, conn.sender, target);
                    let rbody = access::Logged::new(tracked, method, path, host, rparts.status.as_u16(), upstream_addr, sent_at).boxed();
                    return Response::from_parts(rparts, rbody);
                }
                Err(e) if may_retry => {
                    tracing::debug!(upstream = %upstream_addr, error = %e, reused = conn.reused, "upstream connection failed before answering; retrying on a fresh one");
                    fresh_tries += 1;
                }
                Err(e) => {
                    if is_too_slow(&e) {
                        return page(
                            StatusCode::REQUEST_TIMEOUT,
                            "request timeout",
                            "The request body arrived too slowly.",
                        );
                    }
                    tracing::warn!(%host, upstream = %upstream_addr, error = %e, "upstream request failed");
                    return bad_gateway();
                }
            }
        }
    }
}

/// Close the upstream connections idle past `pool::IDLE_TIMEOUT`, every
/// `pool::SWEEP_EVERY`, for as long as the proxy exists. It walks the
/// route table: an upstream swapped out of it is drained and stopped, and
/// its connections close with its process (or when it is dropped).
async fn sweep_idle(proxy: std::sync::Weak<Proxy>) {
    let mut every = tokio::time::interval(pool::SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(proxy) = proxy.upgrade() else { return };
        let routes = proxy.routes.load();
        for route in routes.hosts.values() {
            for u in &route.backend.upstreams {
                u.target.load().idle.expire();
            }
        }
    }
}

fn bad_gateway() -> Response<ProxyBody> {
    page(StatusCode::BAD_GATEWAY, "bad gateway", "The app did not answer the request (upstream error).")
}

/// Bridge an upgraded connection both ways until either side closes or
/// the upstream is drained out.
async fn bridge(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, guard: InFlight) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let closing = guard.0.closing.clone();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = closing.cancelled() => {
            // Drain timed out: close both ends (a TCP FIN each way, which a
            // WebSocket client sees as the connection closing).
            use tokio::io::AsyncWriteExt;
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
    }
    drop(guard);
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

fn is_too_slow(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<body::TooSlow>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
fn requested_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if asks {
        req.headers().get(UPGRADE).cloned()
    } else {
        None
    }
}

/// What one probe of an upstream got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub status: StatusCode,
    /// The `Location` header of a redirect, as sent.
    pub location: Option<String>,
}

/// Probe one upstream the way the proxy will use it: `GET path` with the
/// app's own Host header and the scheme its users reach it by.
pub async fn probe(addr: SocketAddr, host: &str, path: &str, forwarded_proto: &str, timeout: Duration) -> Result<Probe> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.context("connecting")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("http handshake")?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(HOST, host)
            .header("user-agent", "slipway-healthcheck")
            .header("x-forwarded-proto", forwarded_proto)
            .body(Empty::<Bytes>::new())
            .context("building probe request")?;
        let resp = sender.send_request(req).await.context("sending probe")?;
        let location = resp.headers().get(hyper::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(Probe { status: resp.status(), location })
    };
    tokio::time::timeout(timeout, fut).await.context("probe timed out")?
}

/// How a health check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// 2xx, directly or after redirects that stayed on the same scheme and host.
    Healthy,
    /// Anything else, in words: what the app answered and where it pointed.
    Unhealthy(String),
}

/// Redirects a health check follows before giving up.
const MAX_HEALTH_REDIRECTS: usize = 5;

/// The health rule (DESIGN.md `[healthcheck]`): the app must answer 2xx
/// at `path`. A redirect counts only when it stays on the same scheme and
/// host; it is followed (on the same upstream). A redirect elsewhere (to
/// https, say, with Django's `SECURE_SSL_REDIRECT` and nothing telling it
/// the proxy's scheme) means the app serves nothing here.
pub async fn health_check(addr: SocketAddr, host: &str, path: &str, forwarded_proto: &str, timeout: Duration) -> Result<Health> {
    let base = url::Url::parse(&format!("{forwarded_proto}://{host}/")).context("health check base URL")?;
    let mut path = path.to_string();
    for _ in 0..=MAX_HEALTH_REDIRECTS {
        let got = probe(addr, host, &path, forwarded_proto, timeout).await?;
        if got.status.is_success() {
            return Ok(Health::Healthy);
        }
        if !got.status.is_redirection() {
            return Ok(Health::Unhealthy(format!("GET {path} answered {}", got.status)));
        }
        let Some(location) = got.location else {
            return Ok(Health::Unhealthy(format!("GET {path} answered {} without a Location", got.status)));
        };
        let here = base.join(&path).context("health check URL")?;
        let Ok(next) = here.join(&location) else {
            return Ok(Health::Unhealthy(format!("GET {path} answered {} to an unparseable Location {location:?}", got.status)));
        };
        if next.scheme() != base.scheme() || next.host_str() != base.host_str() || next.port() != base.port() {
            return Ok(Health::Unhealthy(format!(
                "GET {path} answered {} to {next} (a redirect to another scheme or host is not health{})",
                got.status,
                if next.scheme() == "https" && forwarded_proto == "http" {
                    "; an app that redirects to https must be served over https, or told by X-Forwarded-Proto that it is"
                } else {
                    ""
                }
            )));
        }
        path = match next.query() {
            Some(q) => format!("{}?{q}", next.path()),
            None => next.path().to_string(),
        };
    }
    Ok(Health::Unhealthy(format!("more than {MAX_HEALTH_REDIRECTS} redirects from the health check path")))
}

/// tls track: what plain HTTP does instead of proxying (see `Certs::intercept`).
fn intercept<B>(certs: &crate::certs::Certs, host: &str, req: &Request<B>) -> Option<Response<ProxyBody>> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Some(match certs.intercept(host, path)? {
        crate::certs::Intercept::Challenge(key_auth) => {
            let mut resp = Response::new(Full::new(Bytes::from(key_auth)).map_err(|never| match never {}).boxed());
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            resp
        }
        crate::certs::Intercept::NotFound => page(StatusCode::NOT_FOUND, "not found", "No such ACME challenge."),
        crate::certs::Intercept::Redirect(to) => {
            let mut resp = page(StatusCode::PERMANENT_REDIRECT, "moved", "This app is served over HTTPS.");
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(hyper::header::LOCATION, v);
            }
            resp
        }
    })
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.headers().get(HOST).and_then(|v| v.to_str().ok()).or_else(|| req.uri().host())?;
    // Strip a port; keep IPv6 literals whole.
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if (!h.ends_with(']') || raw.starts_with('[')) && port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => raw,
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Hop-by-hop headers (RFC 9110 7.6.1), as typed names: removing by a
/// `&str` parses the name again on every call.
const HOP_HEADERS: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::PROXY_AUTHENTICATE,
    hyper::header::PROXY_AUTHORIZATION,
    hyper::header::TE,
    hyper::header::TRAILER,
    UPGRADE,
    hyper::header::TRANSFER_ENCODING,
];

fn strip_hop_headers(headers: &mut hyper::HeaderMap) {
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    // The usual tokens (`keep-alive`, `close`, `upgrade`) name headers
    // removed below or none at all: skipping them spares the common
    // response an allocation.
    if headers.contains_key(CONNECTION) {
        let named: Vec<String> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !["keep-alive", "close", "upgrade"].iter().any(|usual| t.eq_ignore_ascii_case(usual)))
            .map(str::to_ascii_lowercase)
            .collect();
        for h in named {
            headers.remove(h.as_str());
        }
    }
    for h in &HOP_HEADERS {
        headers.remove(h);
    }
}

fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn page(status: StatusCode, title: &str, text: &str) -> Response<ProxyBody> {
    let html = format!(
        "<!doctype html><html><head><title>{code} {title}</title></head>\
         <body><h1>{code} {title}</h1><p>{text}</p><hr><p>slipway</p></body></html>\n",
        code = status.as_u16()
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Counts a request against its upstream until the response body is done
/// (or the upgraded connection closed).
pub(crate) struct InFlight(Arc<Upstream>, AtomicU64);

impl InFlight {
    fn new(u: Arc<Upstream>) -> InFlight {
        u.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(u, AtomicU64::new(0))
    }
    /// Bytes of the response streamed so far.
    pub(crate) fn add_bytes(&self, n: u64) {
        self.1.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers each request by its path: `/to-https`
    /// redirects to https, `/hop` to `/ok` on the same host, `/ok` is 200,
    /// anything else 503.
    async fn upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let head = match path.as_str() {
                        "/ok" => "200 OK\r\n".to_string(),
                        "/hop" => "302 Found\r\nLocation: /ok\r\n".to_string(),
                        "/to-https" => "301 Moved Permanently\r\nLocation: https://app.localhost/\r\n".to_string(),
                        "/to-other" => "302 Found\r\nLocation: http://elsewhere.example/\r\n".to_string(),
                        "/loop" => "302 Found\r\nLocation: /loop\r\n".to_string(),
                        _ => "503 Service Unavailable\r\n".to_string(),
                    };
                    let resp = format!("HTTP/1.1 {head}Content-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn only_2xx_or_same_origin_redirects_are_health() {
        let addr = upstream().await;
        let check = |path: &'static str| health_check(addr, "app.localhost", path, "http", Duration::from_secs(5));
        assert_eq!(check("/ok").await.expect("probe"), Health::Healthy);
        assert_eq!(check("/hop").await.expect("probe"), Health::Healthy, "same-host redirect is followed");
        match check("/to-https").await.expect("probe") {
            Health::Unhealthy(why) => {
                assert!(why.contains("301") && why.contains("https://app.localhost/"), "{why}");
                assert!(why.contains("X-Forwarded-Proto"), "{why}");
            }
            Health::Healthy => panic!("a redirect to https is not health"),
        }
        assert!(matches!(check("/to-other").await.expect("probe"), Health::Unhealthy(w) if w.contains("elsewhere.example")));
        assert!(matches!(check("/loop").await.expect("probe"), Health::Unhealthy(w) if w.contains("redirects")));
        assert!(matches!(check("/down").await.expect("probe"), Health::Unhealthy(w) if w.contains("503")));
    }
}
