//! The client half of the API: how the CLI and the git hook reach the
//! daemon, over TCP with a bearer token (`SLIPWAY_URL`, `SLIPWAY_TOKEN`)
//! or over the owner-only socket under the data directory.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub enum Endpoint {
    /// `tls`: for an `https://` server, the TLS setup and the name its
    /// certificate must carry.
    Tcp { authority: String, token: String, tls: Option<Tls> },
    Socket(PathBuf),
}

/// TLS to the server: the web's roots plus, with `--ca-file` or
/// SLIPWAY_CA_FILE, the operator's own (a server behind a TLS terminator
/// with a private CA).
#[derive(Clone)]
pub struct Tls {
    config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
}

static CA_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Trust the CA certificates (PEM) in `path` too, for every https server.
pub fn set_ca_file(path: PathBuf) {
    let _ = CA_FILE.set(path);
}

fn tls_for(host: &str) -> Result<Tls> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = CA_FILE.get() {
        let mut n = 0;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path).with_context(|| format!("reading the CA file {}", path.display()))? {
            let cert = cert.with_context(|| format!("parsing the CA file {}", path.display()))?;
            roots.add(cert).with_context(|| format!("a certificate in {} is not a usable CA", path.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("the CA file {} holds no PEM certificate", path.display());
        }
    }
    // ring, not aws-lc-rs: ring is already built (russh, reqwest), and
    // aws-lc-rs would add a C toolchain build for post-quantum key
    // exchange, which rustls now deprecates ring for lacking.
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls_pki_types::ServerName::try_from(bare.to_string()).map_err(|_| anyhow!("{host:?} is not a host name TLS can check"))?;
    Ok(Tls { config: std::sync::Arc::new(config), name })
}

impl Endpoint {
    /// From the environment, as DESIGN.md fixes it, then the client
    /// config: SLIPWAY_URL (with SLIPWAY_TOKEN, or the token of a context
    /// with that URL); else the context SLIPWAY_CONTEXT names; else, when
    /// SLIPWAY_DATA is set, the socket under it; else the current context
    /// (`slipway login`); else the socket under the default data dir.
    pub fn from_env() -> Result<Endpoint> {
        let config = crate::cli::context::ClientConfig::load()?;
        if let Some(url) = std::env::var("SLIPWAY_URL").ok().filter(|s| !s.is_empty()) {
            let token = std::env::var("SLIPWAY_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .or_else(|| config.contexts.values().find(|c| c.url.trim_end_matches('/') == url.trim_end_matches('/')).map(|c| c.token.clone()))
                .ok_or_else(|| anyhow!("SLIPWAY_URL is set but SLIPWAY_TOKEN is not"))?;
            return Endpoint::tcp(&url, &token);
        }
        let named = std::env::var("SLIPWAY_CONTEXT").ok().filter(|v| !v.is_empty());
        let data = std::env::var_os("SLIPWAY_DATA").map(PathBuf::from);
        if named.is_some() || data.is_none() {
            if let Some((_, ctx)) = config.selected(named.as_deref())? {
                return Endpoint::tcp(&ctx.url, &ctx.token);
            }
        }
        let data = data.unwrap_or_else(crate::layout::Layout::default_root);
        Ok(Endpoint::Socket(crate::layout::Layout::new(data).socket()))
    }

    /// A server at `url` (`http://HOST:PORT` or `https://HOST[:PORT]`), with `token`.
    pub fn tcp(url: &str, token: &str) -> Result<Endpoint> {
        let (rest, https) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => bail!("the server URL must start with http:// or https:// (got {url:?})"),
        };
        let mut authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("the server URL must be http://HOST:PORT or https://HOST[:PORT] (got {url:?})");
        }
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']') => h.to_string(),
            _ => {
                if https {
                    authority.push_str(":443");
                    authority.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default()
                } else {
                    bail!("the server URL needs a port: http://HOST:PORT (got {url:?})");
                }
            }
        };
        let tls = if https { Some(tls_for(&host)?) } else { None };
        Ok(Endpoint::Tcp { authority, token: token.trim().to_string(), tls })
    }

    /// `http` or `https`: how this endpoint is reached, for URLs shown to people.
    pub fn scheme(&self) -> &'static str {
        match self {
            Endpoint::Tcp { tls: Some(_), .. } => "https",
            _ => "http",
        }
    }

    /// Send a request; return the status and the still-streaming body.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Incoming)> {
        let payload = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).context("encoding request")?),
            None => Bytes::new(),
        };
        let req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        let (mut sender, req) = self.connect(req).await?;
        let resp = sender.send_request(req.body(Full::new(payload))?).await?;
        Ok((resp.status(), resp.into_body()))
    }

    /// Open a connection with this endpoint's credentials on `req`. The
    /// connection allows an upgrade (a one-off's session), which costs a
    /// plain request nothing.
    async fn connect(&self, mut req: hyper::http::request::Builder) -> Result<(SendRequest<Full<Bytes>>, hyper::http::request::Builder)> {
        let sender = match self {
            Endpoint::Tcp { authority, token, tls } => {
                req = req.header("host", authority.as_str()).header("authorization", format!("Bearer {token}"));
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .with_context(|| format!("connecting to the slipway server at {authority}"))?;
                match tls {
                    Some(t) => {
                        let stream = tokio_rustls::TlsConnector::from(t.config.clone())
                            .connect(t.name.clone(), stream)
                            .await
                            .with_context(|| format!("TLS with {authority} (a private CA? pass --ca-file or set SLIPWAY_CA_FILE)"))?;
                        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                        tokio::spawn(conn.with_upgrades());
                        sender
                    }
                    None => {
                        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                        tokio::spawn(conn.with_upgrades());
                        sender
                    }
                }
            }
            Endpoint::Socket(path) => {
                req = req.header("host", "localhost");
                let stream = tokio::net::UnixStream::connect(path).await.with_context(|| {
                    format!("connecting to {} (is the server running? set SLIPWAY_DATA, or SLIPWAY_URL and SLIPWAY_TOKEN)", path.display())
                })?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn.with_upgrades());
                sender
            }
        };
        Ok((sender, req))
    }

    /// `POST path` asking to switch to `protocol`; the upgraded connection.
    pub async fn upgrade(&self, path: &str, protocol: &str) -> Result<TokioIo<Upgraded>> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, protocol);
        let (mut sender, req) = self.connect(req).await?;
        let resp = sender.send_request(req.body(Full::new(Bytes::new()))?).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp.into_body().collect().await.context("reading response")?.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!("{}", error_text(&v, status));
        }
        let upgraded = hyper::upgrade::on(resp).await.context("switching to the session protocol")?;
        Ok(TokioIo::new(upgraded))
    }

    /// A request whose whole answer is one JSON document.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, body) = self.send(method, path, body).await?;
        let bytes = body.collect().await.context("reading response")?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if !status.is_success() {
            bail!("{}", error_text(&v, status));
        }
        Ok(v)
    }

    /// A long operation: print each progress line through `print`, return
    /// the final result or its error.
    pub async fn operation(&self, method: Method, path: &str, body: Option<&Value>, mut print: impl FnMut(&str)) -> Result<Value> {
        let (status, mut body) = self.send(method, path, body).await?;
        if !status.is_success() {
            let bytes = body.collect().await.context("reading response")?.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!("{}", error_text(&v, status));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading progress")?;
            let Some(data) = frame.data_ref() else { continue };
            buf.extend_from_slice(data);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line).context("malformed progress line")?;
                if let Some(l) = v.get("line").and_then(Value::as_str) {
                    print(l);
                    continue;
                }
                if v.get("ok") == Some(&Value::Bool(true)) {
                    return Ok(v.get("result").cloned().unwrap_or(Value::Null));
                }
                bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("operation failed"));
            }
        }
        bail!("the server closed the connection before the operation finished")
    }
}

fn error_text(v: &Value, status: StatusCode) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
        .unwrap_or_else(|| format!("server answered {status}"))
}
