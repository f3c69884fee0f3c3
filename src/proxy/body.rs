//! Bodies on the request path: a client's request body held to a
//! minimum rate (issue 10 #3: 700 slow bodies once held every descriptor),
//! and an upstream's response body that keeps its upstream counted as in
//! flight until it has been streamed.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use tokio::time::{Instant, Sleep};

use super::{InFlight, ProxyBody, Target};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Time a request body may take before the rate counts.
pub const BODY_GRACE: Duration = Duration::from_secs(15);
/// Slowest request body accepted after the grace, bytes per second
/// (nginx's `client_body_timeout` plays this role, by reads rather than
/// by bytes).
pub const MIN_BODY_RATE: u64 = 512;

/// Said in the 408 page when a body was too slow.
#[derive(Debug)]
pub struct TooSlow;

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body slower than {MIN_BODY_RATE} bytes/s")
    }
}

impl StdError for TooSlow {}

/// A request body that fails once it falls behind `BODY_GRACE` +
/// received / `MIN_BODY_RATE`.
pub struct MinRate {
    inner: Incoming,
    start: Instant,
    received: u64,
    deadline: Pin<Box<Sleep>>,
}

impl MinRate {
    pub fn new(inner: Incoming) -> MinRate {
        let start = Instant::now();
        MinRate { inner, start, received: 0, deadline: Box::pin(tokio::time::sleep_until(start + BODY_GRACE)) }
    }
}

impl Body for MinRate {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let due = this.start + BODY_GRACE + Duration::from_millis(this.received.saturating_mul(1000) / MIN_BODY_RATE);
                    this.deadline.as_mut().reset(due);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(TooSlow)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream's response body, counted in flight until it ends. Its
/// connection goes back to the upstream's pool once the body has ended,
/// not before (it is busy until then); a body dropped before its end (the
/// client went away) drops the connection too, which closes it.
pub struct Tracked {
    inner: Incoming,
    guard: InFlight,
    conn: Option<(SendRequest<ProxyBody>, Arc<Target>)>,
    ended: bool,
}

impl Tracked {
    pub fn new(inner: Incoming, guard: InFlight, sender: SendRequest<ProxyBody>, target: Arc<Target>) -> Tracked {
        Tracked { inner, guard, conn: Some((sender, target)), ended: false }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.guard.add_bytes(data.len() as u64);
                }
            }
            // A chunked body ends here (its length stays unknown to
            // `is_end_stream`).
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled.map_err(Into::into)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A body of known length is done once it has all its bytes: hyper
        // stops polling it then, before any end-of-stream frame.
        if self.ended || self.inner.is_end_stream() {
            if let Some((sender, target)) = self.conn.take() {
                target.idle.put(sender);
            }
        }
    }
}
