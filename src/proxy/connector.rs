//! The upstream connector: a plain TCP connect, then the owner check of
//! [`super::owner`] when the upstream belongs to an app user.
//!
//! The expected uid travels in the request URI's userinfo
//! (`http://200001@127.0.0.1:PORT/`): the legacy client hands the
//! connector nothing but the URI, and keys its pool by the authority, so a
//! pooled connection verified for one owner is never reused for another.
//! The userinfo never reaches the app: requests go out in origin form
//! with the client's own Host header.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The authority requests to `addr` go to, naming the uid that must own
/// the listening socket there. Built when an upstream's address is set,
/// so a request only clones it (a reference count).
pub fn upstream_authority(addr: SocketAddr, owner: Option<u32>) -> Result<Authority, hyper::http::uri::InvalidUri> {
    let text = match owner {
        Some(uid) => format!("{uid}@{addr}"),
        None => addr.to_string(),
    };
    Authority::from_maybe_shared(Bytes::from(text))
}

/// The URI of one request to the upstream at `authority`.
pub fn upstream_uri(authority: &Authority, path: &PathAndQuery) -> Result<Uri, hyper::http::Error> {
    Uri::builder().scheme(hyper::http::uri::Scheme::HTTP).authority(authority.clone()).path_and_query(path.clone()).build()
}

#[derive(Clone)]
pub struct OwnerChecked {
    inner: HttpConnector,
}

impl OwnerChecked {
    pub fn new(inner: HttpConnector) -> OwnerChecked {
        OwnerChecked { inner }
    }
}

impl tower_service::Service<Uri> for OwnerChecked {
    type Response = TokioIo<TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let owner: Option<u32> = uri
            .authority()
            .and_then(|a| a.as_str().split_once('@'))
            .and_then(|(user, _)| user.parse().ok());
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            if let Some(uid) = owner {
                verify_owner(io.inner(), uid).await?;
            }
            Ok(io)
        })
    }
}

/// Fail unless the server end of `stream` belongs to `uid`.
async fn verify_owner(stream: &TcpStream, uid: u32) -> io::Result<()> {
    let (theirs, ours) = (stream.peer_addr()?, stream.local_addr()?);
    // connect() returns on the SYN-ACK; the server end is listed once the
    // kernel has processed our ACK, which on loopback is at once, or
    // nearly: look a few times before calling it missing.
    for attempt in 0..20u32 {
        match super::owner::server_end_owner(theirs, ours)? {
            Some(found) if found == uid => return Ok(()),
            Some(found) => {
                tracing::warn!(upstream = %theirs, expected = uid, found, "upstream port is held by another user; refusing to send it the app's traffic");
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{theirs} is owned by uid {found}, not the app's uid {uid}"),
                ));
            }
            None if attempt < 3 => tokio::task::yield_now().await,
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("the server end of the connection to {theirs} is not listed")))
}
