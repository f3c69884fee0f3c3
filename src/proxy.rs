//! The HTTP reverse proxy on `--http`: routes by Host to an app's live
//! web processes, and the health probe that gates traffic.
//!
//! Architecture invariant: only this module speaks HTTP to app upstreams.
//! The route table is immutable once built; a deploy builds a new one and
//! stores it in an `ArcSwap` (as pingora does with its backends), so the
//! request path never takes a lock. Each upstream counts its in-flight
//! requests, which is how a deploy knows an old process has drained.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// One running web process the proxy may send requests to. Its address
/// can change under it (a web process restarted by the supervisor comes
/// back on a fresh port, so nothing can squat the old one): the route
/// table keeps the same `Upstream`, and the next request uses the new
/// address.
#[derive(Debug)]
pub struct Upstream {
    addr: ArcSwap<SocketAddr>,
    in_flight: AtomicUsize,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream { addr: ArcSwap::from_pointee(addr), in_flight: AtomicUsize::new(0) })
    }
    pub fn addr(&self) -> SocketAddr {
        **self.addr.load()
    }
    /// Point it at a new address (its process was restarted elsewhere).
    pub fn set_addr(&self, addr: SocketAddr) {
        self.addr.store(Arc::new(addr));
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

/// Host → backend. Built whole, never mutated after it is stored.
#[derive(Default)]
struct RouteTable {
    hosts: HashMap<String, Arc<Backend>>,
}

/// What one app contributes to the route table.
#[derive(Clone, Default)]
struct AppRoute {
    hosts: Vec<String>,
    backend: Option<Arc<Backend>>,
}

pub struct Proxy {
    routes: ArcSwap<RouteTable>,
    /// The source the table is rebuilt from. Writers (deploys, domain
    /// changes) are rare and serialized here; readers never touch it.
    apps: Mutex<HashMap<String, AppRoute>>,
    client: Client<HttpConnector, ProxyBody>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

impl Proxy {
    pub fn new() -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Proxy { routes: ArcSwap::from_pointee(RouteTable::default()), apps: Mutex::new(HashMap::new()), client }
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
            let backend = route.backend.clone().unwrap_or_else(|| empty.clone());
            for host in &route.hosts {
                table.hosts.insert(host.clone(), backend.clone());
            }
        }
        self.routes.store(Arc::new(table));
    }

    /// Wait until none of `upstreams` has a request in flight, or `timeout`.
    /// Call after they were swapped out, so no new request can reach them.
    pub async fn drain(&self, upstreams: &[Arc<Upstream>], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if upstreams.iter().all(|u| u.in_flight() == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serve the proxy on `listener` until `shutdown` flips.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let mut conn_shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = conn_shutdown.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                    }
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let host = match request_host(&req) {
            Some(h) => h,
            None => return page(StatusCode::BAD_REQUEST, "bad request", "The request has no Host header."),
        };
        let backend = match self.routes.load().hosts.get(&host) {
            Some(b) => b.clone(),
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

        let (mut parts, body) = req.into_parts();
        strip_hop_headers(&mut parts.headers);
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        let forwarded_for = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        let original_host = parts.headers.get(HOST).cloned();
        set_header(&mut parts.headers, "x-forwarded-for", &forwarded_for);
        set_header(&mut parts.headers, "x-forwarded-proto", "http");
        if let Some(h) = original_host {
            parts.headers.insert(HeaderName::from_static("x-forwarded-host"), h);
        }

        // A bodiless request can be retried on another upstream when the
        // first refuses the connection: nothing reached the app, so the
        // retry is safe. One with a body cannot be replayed.
        let replayable = body.is_end_stream();
        let mut body: Option<ProxyBody> = Some(body.boxed());
        let n = backend.upstreams.len();
        let start = backend.next.fetch_add(1, Ordering::Relaxed);
        for attempt in 0..n {
            let upstream = backend.upstreams[(start + attempt) % n].clone();
            let upstream_addr = upstream.addr();
            let uri: Uri = match format!("http://{upstream_addr}{path}").parse() {
                Ok(u) => u,
                Err(_) => return page(StatusCode::BAD_REQUEST, "bad request", "Unparseable request path."),
            };
            let mut req = Request::from_parts(parts.clone(), body.take().unwrap_or_else(empty_body));
            *req.uri_mut() = uri;
            let guard = InFlight::new(upstream.clone());
            match self.client.request(req).await {
                Ok(resp) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_headers(&mut rparts.headers);
                    // The guard lives as long as the response body streams,
                    // so a draining upstream is not stopped mid-response.
                    let rbody = Tracked { inner: rbody, _guard: guard }.boxed();
                    return Response::from_parts(rparts, rbody);
                }
                Err(e) if e.is_connect() && replayable && attempt + 1 < n => {
                    tracing::debug!(upstream = %upstream_addr, error = %e, "upstream refused; trying next");
                    continue;
                }
                Err(e) => {
                    // A refused connection is what a restarting app looks
                    // like; one line per request would flood the log.
                    if e.is_connect() {
                        tracing::debug!(%host, upstream = %upstream_addr, error = %e, "upstream refused the connection");
                    } else {
                        tracing::warn!(%host, upstream = %upstream_addr, error = %e, "upstream request failed");
                    }
                    return page(
                        StatusCode::BAD_GATEWAY,
                        "bad gateway",
                        "The app did not answer the request (upstream error).",
                    );
                }
            }
        }
        page(StatusCode::BAD_GATEWAY, "bad gateway", "No upstream accepted the request.")
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

fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().host().map(str::to_string))?;
    // Strip a port; keep IPv6 literals whole.
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || raw.starts_with('[') => {
            if port.bytes().all(|c| c.is_ascii_digit()) {
                h.to_string()
            } else {
                raw.clone()
            }
        }
        _ => raw.clone(),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

const HOP_HEADERS: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_headers(headers: &mut hyper::HeaderMap) {
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    let named: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for h in HOP_HEADERS.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(h.as_str());
    }
    headers.remove("transfer-encoding");
}

fn set_header(headers: &mut hyper::HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
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

/// Counts a request against its upstream until the response body is done.
struct InFlight(Arc<Upstream>);

impl InFlight {
    fn new(u: Arc<Upstream>) -> InFlight {
        u.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(u)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Tracked {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
