//! Deploy notifications: a JSON POST to an app's webhook on every deploy
//! success and failure. Delivery runs in its own task with retries and a
//! timeout per attempt, so a slow or dead receiver never holds up a deploy.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Attempts after the first, and the pause before each.
const RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(3), Duration::from_secs(9)];
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A webhook address: `http://HOST[:PORT]/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<WebhookUrl> {
        if url.starts_with("https://") {
            bail!("https webhooks are not supported yet; use an http:// address (e.g. a local relay)");
        }
        let rest = url.strip_prefix("http://").context("a webhook URL must start with http://")?;
        if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("invalid webhook URL");
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            bail!("a webhook URL must not carry credentials");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().context("invalid port in webhook URL")?),
            None => (authority, 80),
        };
        if host.is_empty() {
            bail!("a webhook URL needs a host");
        }
        Ok(WebhookUrl { host: host.to_string(), port, path: path.to_string() })
    }
}

/// Deliver `payload` in the background.
pub fn deliver(url: String, payload: serde_json::Value) {
    tokio::spawn(async move {
        let target = match WebhookUrl::parse(&url) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(url, error = %e, "stored webhook URL is invalid");
                return;
            }
        };
        let body = Bytes::from(payload.to_string());
        let mut delays = RETRY_DELAYS.iter();
        loop {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, post(&target, body.clone())).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => tracing::info!(url, error = %format!("{e:#}"), "webhook delivery failed"),
                Err(_) => tracing::info!(url, "webhook delivery timed out"),
            }
            match delays.next() {
                Some(d) => tokio::time::sleep(*d).await,
                None => {
                    tracing::warn!(url, "webhook given up after {} attempts", RETRY_DELAYS.len() + 1);
                    return;
                }
            }
        }
    });
}

async fn post(target: &WebhookUrl, body: Bytes) -> Result<()> {
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await.context("connecting")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = if target.port == 80 { target.host.clone() } else { format!("{}:{}", target.host, target.port) };
    let req = Request::post(target.path.as_str())
        .header("host", host)
        .header("content-type", "application/json")
        .header("user-agent", "slipway-webhook")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("receiver answered {}", resp.status());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = WebhookUrl::parse("http://127.0.0.1:9000/hooks/deploy").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 9000, "/hooks/deploy"));
        assert_eq!(WebhookUrl::parse("http://example.com").expect("valid").path, "/");
        for bad in ["ftp://x", "https://x", "http://", "http://a:99999/", "http://u:p@h/", "http://a b/"] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
