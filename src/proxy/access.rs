//! Router access lines (issue 13 #5): one line per proxied request in the
//! app's log, as Heroku's router writes them:
//!
//! `at=info method=GET path="/" host=app.example.com status=200 bytes=12 service=3ms upstream=web.1`
//!
//! The request path only fills an [`Entry`] (the strings it already owns
//! are moved into it, nothing is formatted) and offers it to a bounded
//! queue with `try_send`: it never waits and never takes a lock. A line
//! that finds the queue full is counted and said later as dropped. One
//! thread of the daemon ([`serve`]) formats the lines and writes them
//! through the app logs (src/logs.rs), so the proxy's threads do no file
//! I/O for them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::Method;
use tokio::sync::mpsc;

use crate::tally::{Histogram, REQUEST_BUCKETS};

/// Requests whose lines may wait for the writer before some are dropped.
pub const QUEUE: usize = 8192;

static TX: OnceLock<mpsc::Sender<Entry>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One proxied request, its line not yet formatted.
#[derive(Debug)]
pub struct Entry {
    pub method: Method,
    pub path: String,
    pub host: String,
    pub status: u16,
    pub upstream: SocketAddr,
    pub bytes: u64,
    /// From the request sent upstream to the response's last byte.
    pub service_ms: u128,
}

/// Open the queue; the receiver goes to [`serve`]. Before this (and in
/// unit tests) requests are served without lines. Once per process.
pub fn open() -> Option<mpsc::Receiver<Entry>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    TX.set(tx).ok().map(|()| rx)
}

/// Lines dropped since the last call (the queue was full).
pub fn take_dropped() -> u64 {
    DROPPED.swap(0, Ordering::Relaxed)
}

fn record(e: Entry) {
    if let Some(tx) = TX.get() {
        if tx.try_send(e).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The line, after the timestamp and source (`router:`) the log adds.
pub fn format(e: &Entry, upstream: &str) -> String {
    // The path is the client's: quoted, its quotes and controls escaped,
    // so one request is always one line.
    let mut path = String::with_capacity(e.path.len());
    for c in e.path.chars().take(2048) {
        match c {
            '"' | '\\' => {
                path.push('\\');
                path.push(c);
            }
            c if c.is_control() => path.push_str(&c.escape_default().to_string()),
            c => path.push(c),
        }
    }
    let host: String = e.host.chars().filter(|c| !c.is_control() && !c.is_whitespace()).take(255).collect();
    format!(
        "at=info method={} path=\"{path}\" host={host} status={} bytes={} service={}ms upstream={upstream}",
        e.method, e.status, e.bytes, e.service_ms
    )
}

/// A response body that records its request's line when it is dropped:
/// after its last byte, or when the client went away mid-body.
pub struct Logged<B> {
    inner: B,
    entry: Option<Entry>,
    started: Instant,
}

impl<B> Logged<B> {
    pub fn new(inner: B, method: Method, path: String, host: String, status: u16, upstream: SocketAddr, started: Instant) -> Logged<B> {
        let entry = Entry { method, path, host, status, upstream, bytes: 0, service_ms: 0 };
        Logged { inner, entry: Some(entry), started }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(e)) = (frame.data_ref(), self.entry.as_mut()) {
                e.bytes += data.len() as u64;
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.service_ms = self.started.elapsed().as_millis();
            record(e);
        }
    }
}

/// How long the writer lets lines gather once one has arrived. While it
/// sleeps the request path offers lines without waking it: woken per line,
/// the writer cost a futex wake and two context switches per request,
/// more than the proxying itself on a 2-core host (issue 13 #4).
const GATHER: Duration = Duration::from_millis(20);

/// The writer: formats each line and hands it to `write(upstream, line)`,
/// which finds the app and instance serving at that address (false when
/// none does any more: the line is dropped); `flush` ends each batch.
/// Runs on its own thread until the queue closes.
pub fn serve(
    mut rx: mpsc::Receiver<Entry>,
    mut write: impl FnMut(SocketAddr, &Entry, &dyn Fn(&str) -> String) -> bool,
    mut flush: impl FnMut(),
) {
    let mut batch = Vec::with_capacity(1024);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        std::thread::sleep(GATHER);
        while batch.len() < QUEUE {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let dropped = take_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "router access lines dropped: the log writer fell behind");
        }
        for (i, e) in batch.drain(..).enumerate() {
            let note = if i == 0 && dropped > 0 { format!(" (before it, {dropped} router lines dropped)") } else { String::new() };
            write(e.upstream, &e, &|instance: &str| format!("{}{note}", format(&e, instance)));
        }
        flush();
    }
}

/// One app's proxied requests, for `GET /metrics`.
struct AppStats {
    /// By status class: 1xx .. 5xx.
    classes: [u64; 5],
    latency: Histogram,
}

/// Written only by the router-lines thread (one lock per line, off the
/// request path) and read by `/metrics`.
static STATS: Mutex<BTreeMap<String, AppStats>> = Mutex::new(BTreeMap::new());

/// Count a request to `app` (called by the router-lines writer once it
/// knows the app an upstream belongs to).
pub fn observe(app: &str, e: &Entry) {
    let mut stats = STATS.lock().unwrap_or_else(|p| p.into_inner());
    if !stats.contains_key(app) {
        stats.insert(app.to_string(), AppStats { classes: [0; 5], latency: Histogram::new(REQUEST_BUCKETS) });
    }
    let Some(s) = stats.get_mut(app) else { return };
    let class = usize::from(e.status / 100).clamp(1, 5) - 1;
    s.classes[class] += 1;
    s.latency.observe(e.service_ms as f64 / 1000.0);
}

/// The proxy's part of the Prometheus exposition (text format 0.0.4).
pub fn render_metrics(out: &mut String, esc: impl Fn(&str) -> String) {
    let stats = STATS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(out, "# HELP slipway_http_requests_total Requests the proxy passed to each app, by status class (lines dropped when the log writer falls behind are not counted; the log says so).");
    let _ = writeln!(out, "# TYPE slipway_http_requests_total counter");
    for (app, s) in stats.iter() {
        for (i, n) in s.classes.iter().enumerate() {
            let _ = writeln!(out, "slipway_http_requests_total{{app=\"{}\",code=\"{}xx\"}} {n}", esc(app), i + 1);
        }
    }
    let _ = writeln!(out, "# HELP slipway_http_request_duration_seconds From the request sent to the app to the response's last byte, per app.");
    let _ = writeln!(out, "# TYPE slipway_http_request_duration_seconds histogram");
    for (app, s) in stats.iter() {
        s.latency.render(out, "slipway_http_request_duration_seconds", &format!("app=\"{}\"", esc(app)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_as_heroku_writes_it_one_line_whatever_the_path() {
        let e = Entry {
            method: Method::GET,
            path: "/a\"b\nc".into(),
            host: "app.example.com".into(),
            status: 200,
            upstream: SocketAddr::from(([127, 0, 0, 1], 8000)),
            bytes: 12,
            service_ms: 3,
        };
        assert_eq!(
            format(&e, "web.1"),
            "at=info method=GET path=\"/a\\\"b\\nc\" host=app.example.com status=200 bytes=12 service=3ms upstream=web.1"
        );
    }

    #[test]
    fn metrics_count_classes_and_fill_cumulative_buckets() {
        let e = |status, service_ms| Entry {
            method: Method::GET,
            path: "/".into(),
            host: "h".into(),
            status,
            upstream: SocketAddr::from(([127, 0, 0, 1], 8000)),
            bytes: 0,
            service_ms,
        };
        observe("metrics-unit", &e(200, 3));
        observe("metrics-unit", &e(503, 700));
        let mut out = String::new();
        render_metrics(&mut out, |s| s.to_string());
        for line in [
            "slipway_http_requests_total{app=\"metrics-unit\",code=\"2xx\"} 1",
            "slipway_http_requests_total{app=\"metrics-unit\",code=\"5xx\"} 1",
            "slipway_http_request_duration_seconds_bucket{app=\"metrics-unit\",le=\"0.005\"} 1",
            "slipway_http_request_duration_seconds_bucket{app=\"metrics-unit\",le=\"0.5\"} 1",
            "slipway_http_request_duration_seconds_bucket{app=\"metrics-unit\",le=\"1\"} 2",
            "slipway_http_request_duration_seconds_bucket{app=\"metrics-unit\",le=\"+Inf\"} 2",
            "slipway_http_request_duration_seconds_count{app=\"metrics-unit\"} 2",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
    }
}
