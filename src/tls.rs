//! The `--https` listener: TLS (rustls, ring) with the certificate picked
//! by SNI from [`crate::certs`], then the connection is the proxy's
//! ([`Proxy::serve_connection`] with `Scheme::Https`: HTTP/2 or HTTP/1.1
//! by ALPN, `X-Forwarded-Proto: https` to the app).
//!
//! This module only terminates TLS. A connection negotiating `acme-tls/1`
//! is a CA validating TLS-ALPN-01: the handshake was the whole answer, so
//! it is closed right after. Connections are admitted through the same
//! gate as `--http` (one budget for app traffic).
//!
//! The server's own host (`--domain`, e.g. `localhost`) is not an app:
//! over HTTPS it serves the API (tokens required, as on `--api`), so
//! remote clients can use `SLIPWAY_URL=https://DOMAIN:PORT` and never send
//! a token in clear.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::certs::{Certs, ACME_TLS_ALPN};
use crate::listener::Gate;
use crate::proxy::{Proxy, Scheme};

/// A client has this long to finish its handshake: a slow or silent peer
/// must not hold a task and a descriptor forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The API on the server's own host name.
pub struct ApiHost {
    pub host: String,
    pub router: axum::Router,
}

async fn serve_api(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, router: axum::Router) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    if let Err(e) = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service).await {
        tracing::debug!(error = %e, "API connection over HTTPS ended");
    }
}

/// Serve HTTPS on `listener` until `shutdown` flips.
pub async fn serve(
    proxy: Arc<Proxy>,
    certs: Arc<Certs>,
    listener: TcpListener,
    gate: Arc<Gate>,
    api: ApiHost,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let api = Arc::new(api);
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()?));
    loop {
        let (stream, peer, permit) = tokio::select! {
            c = crate::listener::accept(&listener, &gate) => c,
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, proxy, api) = (acceptor.clone(), proxy.clone(), api.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let session = tls.get_ref().1;
            if session.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the handshake was the answer.
            } else if session.server_name() == Some(api.host.as_str()) {
                serve_api(tls, api.router.clone()).await;
            } else {
                proxy.serve_connection(tls, peer, Scheme::Https).await;
            }
            drop(permit);
        });
    }
}
