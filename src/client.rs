//! The client half of the API: how the CLI and the git hook reach the
//! daemon, over TCP with a bearer token (`SLIPWAY_URL`, `SLIPWAY_TOKEN`)
//! or over the owner-only socket under the data directory.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub enum Endpoint {
    Tcp { authority: String, token: String },
    Socket(PathBuf),
}

impl Endpoint {
    /// From the environment, as DESIGN.md fixes it.
    pub fn from_env() -> Result<Endpoint> {
        match std::env::var("SLIPWAY_URL").ok().filter(|s| !s.is_empty()) {
            Some(url) => {
                let rest = url
                    .strip_prefix("http://")
                    .ok_or_else(|| anyhow!("SLIPWAY_URL must start with http:// (got {url:?})"))?;
                let authority = rest.trim_end_matches('/').to_string();
                if authority.is_empty() || authority.contains('/') {
                    bail!("SLIPWAY_URL must be http://HOST:PORT (got {url:?})");
                }
                let token = std::env::var("SLIPWAY_TOKEN")
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| anyhow!("SLIPWAY_URL is set but SLIPWAY_TOKEN is not"))?;
                Ok(Endpoint::Tcp { authority, token: token.trim().to_string() })
            }
            None => {
                let data = std::env::var_os("SLIPWAY_DATA")
                    .map(PathBuf::from)
                    .unwrap_or_else(crate::layout::Layout::default_root);
                Ok(Endpoint::Socket(crate::layout::Layout::new(data).socket()))
            }
        }
    }

    /// Send a request; return the status and the still-streaming body.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Incoming)> {
        let payload = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).context("encoding request")?),
            None => Bytes::new(),
        };
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        let resp = match self {
            Endpoint::Tcp { authority, token } => {
                req = req.header("host", authority.as_str()).header("authorization", format!("Bearer {token}"));
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .with_context(|| format!("connecting to the slipway server at {authority}"))?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender.send_request(req.body(Full::new(payload))?).await?
            }
            Endpoint::Socket(path) => {
                req = req.header("host", "localhost");
                let stream = tokio::net::UnixStream::connect(path).await.with_context(|| {
                    format!("connecting to {} (is the server running? set SLIPWAY_DATA, or SLIPWAY_URL and SLIPWAY_TOKEN)", path.display())
                })?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender.send_request(req.body(Full::new(payload))?).await?
            }
        };
        Ok((resp.status(), resp.into_body()))
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
