//! Deploy notifications: a JSON POST to an app's webhook on every deploy
//! success and failure, over HTTP or HTTPS, to a name, an IPv4 or an IPv6
//! address, through reqwest (rustls, the web's roots). Each body is signed
//! with HMAC-SHA256 under the app's own secret, sent as
//! `X-Slipway-Signature-256: sha256=HEX` (GitHub's scheme, so receivers
//! written for it verify ours unchanged). Delivery runs in its own task
//! with retries and a timeout per attempt, so a slow or dead receiver never
//! holds up a deploy; its outcome goes to the caller's `on_done`, which
//! records it in the event log.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Attempts after the first, and the pause before each.
const RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(3), Duration::from_secs(9)];
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Slipway-Signature-256";

/// A webhook address: `http://` or `https://`, a host, no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub url::Url);

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<WebhookUrl> {
        if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("invalid webhook URL");
        }
        let u = url::Url::parse(url).context("a webhook URL must be http://HOST[:PORT]/PATH or https://...")?;
        if !matches!(u.scheme(), "http" | "https") {
            bail!("a webhook URL must start with http:// or https://");
        }
        if u.host_str().is_none_or(str::is_empty) {
            bail!("a webhook URL needs a host");
        }
        if !u.username().is_empty() || u.password().is_some() {
            bail!("a webhook URL must not carry credentials: receivers check the signature instead");
        }
        Ok(WebhookUrl(u))
    }
}

/// A new per-app signing secret.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

/// `sha256=HEX` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One client for every delivery: its connection pool and TLS setup are
/// shared. No redirects: a receiver that moves says so, and the signed body
/// never follows it somewhere else.
static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("slipway-webhook/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "building the webhook client failed; using the defaults");
            reqwest::Client::new()
        })
});

/// How a delivery ended, in words for the event log: `200 after 1
/// attempt`, or the last error.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub ok: bool,
    pub detail: String,
}

/// One attempt: the receiver's status, or why there was none.
pub async fn deliver_once(url: &WebhookUrl, secret: Option<&str>, body: &[u8]) -> Result<u16> {
    let mut req = CLIENT.post(url.0.clone()).header("content-type", "application/json").body(body.to_vec());
    if let Some(s) = secret {
        req = req.header(SIGNATURE_HEADER, signature(s, body));
    }
    let resp = req.send().await.map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("receiver answered {status}");
    }
    Ok(status.as_u16())
}

/// reqwest's errors chain their cause; the event log wants it in one line.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Deliver `payload` in the background, retrying; `on_done` hears how it ended.
pub fn deliver<F, Fut>(url: String, secret: Option<String>, payload: serde_json::Value, on_done: F)
where
    F: FnOnce(Delivery) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let target = match WebhookUrl::parse(&url) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(url, error = %e, "stored webhook URL is invalid");
                on_done(Delivery { ok: false, detail: format!("{url}: {e:#}") }).await;
                return;
            }
        };
        let body = payload.to_string().into_bytes();
        let mut delays = RETRY_DELAYS.iter();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match deliver_once(&target, secret.as_deref(), &body).await {
                Ok(status) => {
                    let s = if attempts == 1 { "" } else { "s" };
                    on_done(Delivery { ok: true, detail: format!("{url}: {status} after {attempts} attempt{s}") }).await;
                    return;
                }
                Err(e) => format!("{e:#}"),
            };
            tracing::info!(url, error = %last, "webhook delivery failed");
            match delays.next() {
                Some(d) => tokio::time::sleep(*d).await,
                None => {
                    tracing::warn!(url, "webhook given up after {attempts} attempts");
                    on_done(Delivery { ok: false, detail: format!("{url}: given up after {attempts} attempts: {last}") }).await;
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = WebhookUrl::parse("http://127.0.0.1:9000/hooks/deploy").expect("valid");
        assert_eq!((u.0.host_str(), u.0.port(), u.0.path()), (Some("127.0.0.1"), Some(9000), "/hooks/deploy"));
        assert_eq!(WebhookUrl::parse("http://example.com").expect("valid").0.path(), "/");
        assert!(WebhookUrl::parse("https://example.com/x").is_ok());
        assert_eq!(WebhookUrl::parse("http://[::1]:8000/h").expect("ipv6").0.host_str(), Some("[::1]"));
        for bad in ["ftp://x", "http://", "http://a:99999/", "http://u:p@h/", "http://a b/"] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signature_is_githubs_scheme() {
        // HMAC-SHA256 test vector (RFC 4231, case 2).
        assert_eq!(signature("Jefe", b"what do ya want for nothing?"), "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
