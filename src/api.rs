//! The daemon's HTTP API: JSON under `/api/`, git smart HTTP under
//! `/git/`, `/healthz`, and `/internal/pre-receive` for the repo hooks.
//!
//! Served twice: on `--api` (TCP; every route needs a token, every app
//! route checks the token's scope) and on DIR/slipway.sock (owner-only;
//! the socket's file mode is the credential). Long operations answer with
//! a stream of JSON lines, `{"line": …}` as they go and one final
//! `{"ok": true|false, …}`, so the CLI and the git hook print progress as
//! it happens and the operation completes even if the client goes away.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

use crate::auth::{self, Principal};
use crate::git::Quarantine;
use crate::names::{self, AppName};
use crate::progress::Progress;
use crate::release::{self, Actor, RefUpdate};
use crate::platform::{Platform, Push};

mod certs; // tls track: the `certs` routes, in src/api/certs.rs

static READY: AtomicBool = AtomicBool::new(false);

/// The SSH listener's address, for the git remotes `apps info` shows.
static SSH_ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

/// Record where git over SSH listens (once, at start).
pub fn set_ssh_addr(addr: std::net::SocketAddr) {
    let _ = SSH_ADDR.set(addr);
}

/// Mark the daemon ready: `/healthz` answers 200 from now on.
pub fn set_ready() {
    READY.store(true, Ordering::Release);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Local,
    Tcp,
}

type Shared = Arc<Platform>;

pub async fn serve_tcp(p: Shared, listener: TcpListener, gate: Arc<crate::listener::Gate>, shutdown: watch::Receiver<bool>) {
    // proxy track (issue 10 #3): admission caps, a first-byte deadline and an idle timeout; /healthz
    // fails while this task is not running.
    let _alive = crate::listener::LISTENERS.up("api");
    let listener = crate::listener::GatedListener::new(listener, gate, API_FIRST_BYTE, API_IDLE);
    let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
    let app = router(p, Transport::Tcp).into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(wait(shutdown)).await {
        tracing::error!(error = %e, "API server failed");
    }
}

pub async fn serve_unix(p: Shared, listener: UnixListener, shutdown: watch::Receiver<bool>) {
    if let Err(e) = axum::serve(listener, router(p, Transport::Local)).with_graceful_shutdown(wait(shutdown)).await {
        tracing::error!(error = %e, "API socket failed");
    }
}

/// A client must start its request this soon after connecting.
const API_FIRST_BYTE: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection with nothing moved either way for this long is closed
/// (long enough for a quiet `logs -f`; the CLI says the stream ended).
const API_IDLE: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// The API as served over TCP (every route needs a token), for the
/// `--https` listener to serve on the server's own host (tls track).
pub fn tcp_router(p: Shared) -> Router {
    router(p, Transport::Tcp)
}

async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn router(p: Shared, transport: Transport) -> Router {
    let mut r = Router::new();
    // The dashboard is for browsers, which reach the TCP address only.
    if transport == Transport::Tcp {
        r = r.merge(crate::dashboard::routes());
    }
    r
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/apps", get(list_apps).post(create_app))
        .route("/api/apps/{app}", get(app_info).delete(destroy_app))
        .route("/api/apps/{app}/config", get(get_config).post(change_config))
        .route("/api/apps/{app}/releases", get(list_releases))
        .route("/api/apps/{app}/releases/{version}/output", get(deploy_output))
        .route("/api/apps/{app}/rollback", post(rollback))
        .route("/api/apps/{app}/deploy", post(deploy))
        .route("/api/apps/{app}/ps", get(ps))
        .route("/api/apps/{app}/scale", post(scale))
        .route("/api/apps/{app}/scheduler", post(set_scheduler))
        .route("/api/nodes", get(nodes))
        .route("/api/apps/{app}/restart", post(restart))
        .route("/api/apps/{app}/start", post(restart))
        .route("/api/apps/{app}/stop", post(stop))
        .route("/api/apps/{app}/logs", get(logs))
        .route("/api/apps/{app}/run", post(run_one_off))
        .route("/api/apps/{app}/attach", post(attach_one_off))
        .route("/api/apps/{app}/promote", post(promote))
        .route("/api/apps/{app}/webhook", get(get_webhook).put(set_webhook).delete(delete_webhook))
        .route("/api/apps/{app}/webhook/test", post(test_webhook))
        .route("/api/apps/{app}/domains", get(list_domains).post(add_domain))
        .route("/api/apps/{app}/domains/{host}", delete(remove_domain))
        .route("/api/keys", get(list_keys).post(add_key))
        .route("/api/keys/{name}", delete(remove_key))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{name}", delete(revoke_token))
        .route("/api/events", get(events))
        // backup track (issue 14 #6)
        .route("/api/backup", get(backup))
        .route("/git/{*path}", any(git_http))
        .route("/internal/pre-receive", post(pre_receive))
        .merge(certs::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(Extension(transport))
        // upgrade track: nothing changes an app while the daemon hands over.
        .layer(axum::middleware::from_fn_with_state(p.clone(), refuse_while_restarting))
        .with_state(p)
}

/// upgrade track: during a hand-over to the next daemon, requests that
/// would change an app (anything but reads and git fetches) get a clear
/// 503; the next daemon takes them a moment later.
async fn refuse_while_restarting(State(p): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let changes = if path.starts_with("/git/") {
        path.ends_with("/git-receive-pack") || req.uri().query().is_some_and(|q| q.contains("service=git-receive-pack"))
    } else {
        !matches!(*req.method(), Method::GET | Method::HEAD)
    };
    if changes && p.restarting() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server restarting: try again in a few seconds").into_response();
    }
    next.run(req).await
}

// ---- errors and auth ----

/// An error as the client sees it: a status and one line.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        tracing::error!(error = %format!("{e:#}"), "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl From<names::NameError> for ApiError {
    fn from(e: names::NameError) -> ApiError {
        ApiError::bad(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The caller, authenticated by bearer token (TCP) or by the socket; with
/// the token's hash, so that a stream ends when it is revoked.
struct Auth(Principal, Option<String>);

impl FromRequestParts<Shared> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, p: &Shared) -> Result<Auth, ApiError> {
        if parts.extensions.get::<Transport>() == Some(&Transport::Local) {
            return Ok(Auth(Principal::local(), None));
        }
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = bearer else {
            // A browser signed in to the dashboard: its cookie, and for
            // anything but reading, the session's CSRF token.
            return match crate::dashboard::api_principal(&parts.headers, &parts.method) {
                Ok(Some(principal)) => Ok(Auth(principal, None)),
                Ok(None) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing credentials: set SLIPWAY_TOKEN")),
                Err(why) => Err(ApiError::new(StatusCode::FORBIDDEN, why)),
            };
        };
        let hash = auth::hash_token(token);
        lookup_token(p, token)
            .await?
            .map(|principal| Auth(principal, Some(hash)))
            .ok_or_else(|| invalid_token("api"))
    }
}

/// A token that is not (or no longer) valid: refused, and said in the
/// daemon's log (one line per failure, where it came in).
fn invalid_token(via: &'static str) -> ApiError {
    tracing::warn!(via, "auth failure: invalid or revoked token");
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid or revoked token")
}

/// Who an API token acts as, if it is valid (the dashboard's sign-in).
pub async fn principal_for_token(p: &Shared, token: &str) -> Option<Principal> {
    lookup_token(p, token).await.ok().flatten()
}

async fn lookup_token(p: &Shared, token: &str) -> ApiResult<Option<Principal>> {
    if token.is_empty() || token.len() > 200 {
        return Ok(None);
    }
    let hash = auth::hash_token(token);
    if let Some(principal) = p.session_principal(&hash) {
        return Ok(Some(principal));
    }
    let t = p.store.call(move |s| s.token_by_hash(&hash)).await?;
    Ok(t.map(|t| Principal { name: t.name, scope: t.app }))
}

impl Auth {
    /// Resolves when the caller's token is revoked (never for the socket):
    /// long streams (`logs -f`, `run`) end with it (process track).
    fn revoked(&self, p: &Shared) -> impl Future<Output = ()> + Send + 'static {
        let (p, hash) = (p.clone(), self.1.clone());
        async move {
            match hash {
                Some(h) => p.until_revoked(|| p.token_valid(&h)).await,
                None => std::future::pending().await,
            }
        }
    }
    fn actor(&self) -> Actor {
        Actor(self.0.name.clone())
    }
    fn admin(&self) -> ApiResult<()> {
        if self.0.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "this token is limited to one app; this needs an admin token"))
        }
    }
    /// Parse the app name, check the caller may touch it, and that it exists.
    async fn app(&self, p: &Shared, name: &str) -> ApiResult<AppName> {
        let app = AppName::parse(name)?;
        if !self.0.may_access(&app) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, format!("this token may not access app {app}")));
        }
        let a = app.clone();
        if p.store.call(move |s| s.app(&a)).await?.is_none() {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no app named {app}")));
        }
        Ok(app)
    }
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.len() > 1024 * 1024 {
        return Err(ApiError::bad("request body larger than 1 MiB"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Run a long operation in its own task and stream its progress. The
/// progress also goes to the app's `log` as `deploy` lines, whether or
/// not the client still reads: `logs -f` and the dashboard show a deploy,
/// a rollback or a restart as it happens, whoever started it.
fn operation<F, Fut>(log: Arc<crate::logs::AppLog>, f: F) -> Response
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<Value>> + Send + 'static,
{
    // Bounded: the operation's lines go to the app's log always and to the
    // client while it keeps up; a slow client loses lines, not memory.
    let (tx, mut from_op) = tokio::sync::mpsc::channel::<String>(crate::progress::QUEUE);
    let (tee_tx, rx) = tokio::sync::mpsc::channel::<String>(crate::progress::QUEUE);
    tokio::spawn(async move {
        let mut dropped = 0usize;
        while let Some(line) = from_op.recv().await {
            log.write("deploy", &line);
            if dropped > 0 && tee_tx.try_send(format!("-- {dropped} lines dropped (reader too slow) --")).is_ok() {
                dropped = 0;
            }
            if dropped > 0 || tee_tx.try_send(line).is_err() {
                dropped += 1;
            }
        }
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Value>();
    tokio::spawn(async move {
        let result = f(Progress::new(tx)).await;
        let last = match result {
            Ok(v) => json!({ "ok": true, "result": v }),
            Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
        };
        let _ = done_tx.send(last);
    });
    let lines = ReceiverStream::new(rx).map(|l| json!({ "line": l }));
    let last = futures_util::stream::once(async move {
        done_rx.await.unwrap_or_else(|_| json!({ "ok": false, "error": "operation aborted" }))
    });
    let body = lines.chain(last).map(|v| Ok::<_, std::convert::Infallible>(format!("{v}\n")));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

// ---- handlers ----

async fn healthz() -> Response {
    // proxy track (issue 10 #3): a stopped listener makes the daemon unhealthy.
    let down = crate::listener::LISTENERS.down();
    if !down.is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("listener down: {}\n", down.join(", "))).into_response();
    }
    if READY.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// Prometheus metrics: every app's figures, so an admin token only.
async fn metrics(State(p): State<Shared>, auth: Auth) -> ApiResult {
    auth.admin()?;
    let text = crate::metrics::render(&p).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn list_apps(State(p): State<Shared>, auth: Auth) -> ApiResult {
    let apps = p.store.call(|s| s.apps()).await?;
    let mut out = Vec::new();
    for a in apps {
        let Ok(name) = AppName::parse(&a.name) else { continue };
        if !auth.0.may_access(&name) {
            continue;
        }
        let n = name.clone();
        let live = p.store.call(move |s| s.live_release(&n)).await?;
        let running = p.supervisor.instances(name.as_str()).len();
        out.push(json!({
            "name": a.name,
            "url": p.app_url(&name),
            "release": live.map(|r| format!("v{}", r.version)),
            "processes": running,
            "created_at": a.created_at,
        }));
    }
    Ok(Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApp {
    name: String,
}

async fn create_app(State(p): State<Shared>, auth: Auth, body: Bytes) -> ApiResult {
    auth.admin()?;
    let req: CreateApp = parse_body(&body)?;
    let app = AppName::parse(&req.name)?;
    if !create_app_record(&p, &app, &auth.actor()).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("app {app} already exists")));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": app.as_str(),
            "url": p.app_url(&app),
            "api_addr": p.api_addr.to_string(),
            "ssh_port": SSH_ADDR.get().map(|a| a.port()),
        })),
    )
        .into_response())
}

async fn create_app_record(p: &Shared, app: &AppName, actor: &Actor) -> ApiResult<bool> {
    let a = app.clone();
    if !p.store.call(move |s| s.create_app(&a)).await? {
        return Ok(false);
    }
    p.repos.ensure(app).await?;
    p.register_routes(app).await;
    p.proxy.set_upstreams(app.as_str(), Vec::new());
    p.event(Some(app), actor, "create", "", "ok").await;
    Ok(true)
}

async fn app_info(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let a = app.clone();
    let (live, domains, config) =
        p.store.call(move |s| Ok((s.live_release(&a)?, s.domains(&a)?, s.config(&a)?))).await?;
    Ok(Json(json!({
        "name": app.as_str(),
        "url": p.app_url(&app),
        "state": crate::dashboard::app_state(&p, &app),
        "api_addr": p.api_addr.to_string(),
        "ssh_port": SSH_ADDR.get().map(|a| a.port()),
        "git_http": format!("/git/{app}.git"),
        "release": live.as_ref().map(|r| format!("v{}", r.version)),
        "commit": live.as_ref().map(|r| r.commit.clone()),
        "processes": p.supervisor.instances(app.as_str()).len(),
        "scheduler": p.store.call({ let a = app.clone(); move |s| s.scheduler(&a) }).await?.as_str(),
        "domains": domains,
        "config_keys": config.keys().collect::<Vec<_>>(),
        // Containers (docker track): what the app's images take; null for host apps.
        "images": crate::runtime::container::image_usage(&p.layout, &app).await,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct Confirm {
    confirm: Option<String>,
}

async fn destroy_app(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, Query(q): Query<Confirm>) -> ApiResult {
    auth.admin()?;
    let app = auth.app(&p, &name).await?;
    if q.confirm.as_deref() != Some(app.as_str()) {
        return Err(ApiError::bad(format!("destroying {app} needs --confirm {app}")));
    }
    release::destroy(&p, &app, &auth.actor()).await?;
    Ok(Json(json!({ "destroyed": app.as_str() })).into_response())
}

async fn get_config(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let config = p.store.call(move |s| s.config(&app)).await?;
    Ok(Json(config).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigChange {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    unset: Vec<String>,
    /// Store it for the next deploy: no release, no restart.
    #[serde(default)]
    no_restart: bool,
}

async fn change_config(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: ConfigChange = parse_body(&body)?;
    for k in req.set.keys().chain(req.unset.iter()) {
        names::check_config_key(k)?;
    }
    if req.set.is_empty() && req.unset.is_empty() {
        return Err(ApiError::bad("nothing to change"));
    }
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        let outcome = release::change_config_with(&p, &app, &actor, req.set, req.unset, !req.no_restart, &progress).await?;
        Ok(match outcome {
            release::ConfigOutcome::Unchanged => json!({ "release": null, "unchanged": true }),
            release::ConfigOutcome::Stored => json!({ "release": null, "unchanged": false }),
            release::ConfigOutcome::Released(v) => json!({ "release": format!("v{v}"), "unchanged": false }),
        })
    }))
}

async fn list_releases(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let releases = p.store.call(move |s| s.releases(&app)).await?;
    // Config values never leave the server in listings; keys are enough.
    let out: Vec<Value> = releases
        .into_iter()
        .map(|r| {
            json!({
                "version": format!("v{}", r.version),
                "commit": r.commit,
                "ref": r.git_ref,
                "description": r.description,
                "actor": r.actor,
                "status": r.status,
                "live": r.status == crate::store::ReleaseStatus::Live,
                "created_at": r.created_at,
                "collected": r.collected,
                "config_keys": r.config.keys().collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(out).into_response())
}

/// history track: a release's kept deploy output (`logs --deploy [vN]`);
/// `latest` is the newest release that has one.
async fn deploy_output(State(p): State<Shared>, auth: Auth, Path((name, version)): Path<(String, String)>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let a = app.clone();
    let releases = p.store.call(move |s| s.releases(&a)).await?;
    let wanted = if version == "latest" {
        None
    } else {
        Some(version.strip_prefix('v').unwrap_or(&version).parse::<u32>().map_err(|_| ApiError::bad(format!("invalid release {version:?}: use vN")))?)
    };
    for r in releases.iter().filter(|r| wanted.is_none_or(|w| w == r.version)) {
        let path = p.layout.deploy_output(&app, r.version);
        let text = tokio::task::spawn_blocking(move || crate::deploy_output::read(&path)).await.map_err(|e| anyhow!("reading deploy output: {e}"))?;
        if let Some(text) = text.map_err(|e| anyhow!("reading the output of v{}: {e}", r.version))? {
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from(text))
                .map_err(|e| anyhow!("building output response: {e}"))?);
        }
        if wanted.is_some() {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no deploy output kept for v{} of {app} (only the newest {} releases keep theirs)", r.version, crate::deploy_output::KEPT)));
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        match wanted {
            Some(v) => format!("{app} has no release v{v}"),
            None => format!("{app} has no deploy output yet"),
        },
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackReq {
    version: Option<String>,
}

async fn rollback(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: RollbackReq = if body.is_empty() { RollbackReq::default() } else { parse_body(&body)? };
    let to = match req.version.as_deref() {
        None => None,
        Some(v) => Some(
            v.strip_prefix('v')
                .unwrap_or(v)
                .parse::<u32>()
                .map_err(|_| ApiError::bad(format!("invalid release {v:?}: use vN")))?,
        ),
    };
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        let v = release::rollback(&p, &app, &actor, to, &progress).await?;
        Ok(json!({ "release": format!("v{v}") }))
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployReq {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
}

async fn deploy(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: DeployReq = if body.is_empty() { DeployReq::default() } else { parse_body(&body)? };
    let a = app.clone();
    let live = p.store.call(move |s| s.live_release(&a)).await?;
    let repo = p.layout.repo(&app);
    let live_ref = live.map(|l| l.git_ref).unwrap_or_else(|| "refs/heads/main".into());
    let (refname, commit) = match req.git_ref {
        // history track: a commit id (what a collected release says to
        // rebuild from), when no branch has that name. It is recorded on
        // the live release's ref.
        Some(r) if is_commit_id(&r) && crate::git::resolve(&repo, &format!("refs/heads/{r}")).await.is_none() => {
            let commit = crate::git::resolve(&repo, &r).await.ok_or_else(|| ApiError::bad(format!("{app} has no commit {r}; push it first")))?;
            (live_ref, commit)
        }
        other => {
            let refname = match other {
                Some(r) if r.starts_with("refs/") => r,
                Some(r) => format!("refs/heads/{r}"),
                None => live_ref,
            };
            names::check_ref(&refname)?;
            let commit = crate::git::resolve(&repo, &refname)
                .await
                .ok_or_else(|| ApiError::bad(format!("{app} has no ref {refname}; push it first")))?;
            (refname, commit)
        }
    };
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        let v = release::deploy(&p, &app, &actor, &commit, &refname, &Quarantine::default(), &progress).await?;
        Ok(json!({ "release": format!("v{v}") }))
    }))
}

/// 7 to 40 hex digits: an abbreviated or full commit id.
fn is_commit_id(s: &str) -> bool {
    (7..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn ps(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    if p.on_swarm(&app).await {
        // swarm track: tasks, on their nodes.
        let out: Vec<Value> = release::swarm::app_tasks(&p, &app)
            .await?
            .into_iter()
            .map(|t| {
                json!({
                    "type": t.ptype,
                    "instance": t.slot,
                    "release": t.release,
                    "node": t.node,
                    "state": if t.wanted { t.state } else { format!("{} (stopping)", t.state) },
                    "task": t.id.get(..12).unwrap_or(&t.id),
                    "port": t.addr.map(|a| a.port()),
                    "last_exit": t.error,
                })
            })
            .collect();
        return Ok(Json(out).into_response());
    }
    let out: Vec<Value> = p
        .supervisor
        .instances(app.as_str())
        .iter()
        .map(|i| {
            let st = i.status();
            json!({
                "type": i.spec.ptype,
                "instance": i.spec.index,
                "release": format!("v{}", st.release),
                "pid": st.pid,
                "state": st.state,
                "uptime_secs": st.since.filter(|_| st.pid.is_some()).map(|s| s.elapsed().as_secs()),
                "restarts": st.restarts,
                "last_exit": st.last_exit,
                "port": i.spec.port,
                // Why it gave up, without a trip to the logs.
                "last_lines": if st.state == crate::supervisor::State::Crashed { i.tail() } else { Vec::new() },
            })
        })
        .collect();
    Ok(Json(out).into_response())
}

async fn scale(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let counts: BTreeMap<String, u32> = parse_body(&body)?;
    if counts.is_empty() {
        return Err(ApiError::bad("nothing to scale: use TYPE=N"));
    }
    for (t, n) in &counts {
        if *n > release::MAX_SCALE {
            return Err(ApiError::bad(format!("scale {t}={n} is above the limit of {}", release::MAX_SCALE)));
        }
    }
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        release::scale(&p, &app, &actor, counts, &progress).await?;
        Ok(json!({}))
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulerReq {
    scheduler: String,
}

/// swarm track: move the app onto the swarm or back (a long operation).
async fn set_scheduler(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    auth.admin()?;
    let app = auth.app(&p, &name).await?;
    let req: SchedulerReq = parse_body(&body)?;
    let to = crate::store::Scheduler::parse(&req.scheduler)
        .ok_or_else(|| ApiError::bad(format!("unknown scheduler {:?}: use local or swarm", req.scheduler)))?;
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        release::swarm::set_scheduler(&p, &app, &actor, to, &progress).await?;
        Ok(json!({ "scheduler": to.as_str() }))
    }))
}

/// swarm track: the swarm's nodes and this daemon's tasks on each.
async fn nodes(State(p): State<Shared>, auth: Auth) -> ApiResult {
    auth.admin()?;
    let out: Vec<Value> = release::swarm::nodes(&p)
        .await?
        .into_iter()
        .map(|(n, tasks)| {
            json!({
                "node": n.hostname,
                "id": n.id.get(..12).unwrap_or(&n.id),
                "role": n.role,
                "state": n.state,
                "availability": n.availability,
                "addr": n.addr,
                "tasks": tasks,
            })
        })
        .collect();
    Ok(Json(out).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestartReq {
    #[serde(rename = "type")]
    ptype: Option<String>,
}

async fn restart(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: RestartReq = if body.is_empty() { RestartReq::default() } else { parse_body(&body)? };
    let actor = auth.actor();
    Ok(operation(p.logs.app(&app), move |progress| async move {
        release::restart(&p, &app, &actor, req.ptype.as_deref(), &progress).await?;
        Ok(json!({}))
    }))
}

async fn stop(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    release::stop(&p, &app, &auth.actor()).await?;
    Ok(Json(json!({ "stopped": app.as_str() })).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    n: Option<usize>,
    follow: Option<bool>,
    #[serde(rename = "type")]
    ptype: Option<String>,
    /// Only lines of the last this many seconds.
    since: Option<u64>,
    /// Only lines containing this text.
    grep: Option<String>,
}

async fn logs(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, Query(q): Query<LogsQuery>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let log = p.logs.app(&app);
    // Subscribe before reading the tail, so no line falls between them.
    let live = log.subscribe();
    let n = q.n.unwrap_or(100).min(10_000);
    let filter = q.ptype.clone();
    if q.grep.as_ref().is_some_and(|g| g.len() > 1024) {
        return Err(ApiError::bad("--grep takes at most 1024 bytes"));
    }
    let grep = q.grep.clone().filter(|g| !g.is_empty());
    let keep = move |line: &str| -> bool {
        let type_ok = match &filter {
            None => true,
            Some(t) => line
                .split_once(' ')
                .map(|(_, rest)| rest.starts_with(&format!("{t}.")) || rest.starts_with(&format!("{t}:")))
                .unwrap_or(false),
        };
        type_ok && grep.as_ref().is_none_or(|g| line.contains(g.as_str()))
    };
    let keep2 = keep.clone();
    // Lines start with a fixed-width UTC timestamp: as text, they sort as
    // times do.
    let cutoff = q.since.map(|secs| {
        let from = chrono::Utc::now() - chrono::Duration::seconds(secs.min(100 * 365 * 86_400) as i64);
        from.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    });
    let keep_since = move |l: &str| keep(l) && cutoff.as_ref().is_none_or(|c| l.get(..c.len()).is_some_and(|ts| ts >= c.as_str()));
    // Streamed from the files in small chunks: bounded.
    let head = log.tail_stream(n, keep_since);
    let body = if q.follow.unwrap_or(false) {
        let follow = BroadcastStream::new(live).filter_map(move |r| {
            let out = match r {
                Ok(l) if keep2(&l) => Some(Ok(format!("{l}\n"))),
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(k)) => Some(Ok(format!("-- {k} lines dropped (reader too slow) --\n"))),
            };
            async move { out.map(|r| r.map(bytes::Bytes::from)) }
        });
        Body::from_stream(head.chain(follow).take_until(auth.revoked(&p)))
    } else {
        Body::from_stream(head)
    };
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .map_err(|e| anyhow!("building logs response: {e}"))?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunReq {
    command: String,
}

/// The release a one-off runs in (the live one), its app dirs in place.
async fn one_off_release(p: &Shared, app: &AppName) -> ApiResult<crate::store::Release> {
    let a = app.clone();
    let live = p
        .store
        .call(move |s| s.live_release(&a))
        .await?
        .ok_or_else(|| ApiError::bad(format!("{app} has no live release to run in")))?;
    release::ensure_app_dirs(p, app).await?;
    Ok(live)
}

async fn run_one_off(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: RunReq = parse_body(&body)?;
    if req.command.trim().is_empty() || req.command.len() > 64 * 1024 {
        return Err(ApiError::bad("the command must be 1 byte to 64 KiB"));
    }
    let live = one_off_release(&p, &app).await?;
    let cmd = release::one_off_command(&p, &app, &live, &req.command);
    // history track: the event says the command, and its exit code once known.
    let (ev_p, ev_app, ev_actor) = (p.clone(), app.clone(), auth.actor());
    let detail: String = req.command.chars().take(200).collect();
    // Bounded all the way (process track): a client reading slowly holds
    // the command on its pipe; nothing queues up in the daemon.
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(16);
    tokio::spawn(async move {
        let mut child = match crate::runtime::spawn(&cmd) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(json!({ "ok": false, "error": format!("starting the command: {e}") })).await;
                return;
            }
        };
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let (ltx, mut lrx) = tokio::sync::mpsc::channel(crate::runtime::LINE_QUEUE);
        if let Some(o) = child.stdout.take() {
            tokio::spawn(crate::runtime::pump_lines(o, ltx.clone()));
        }
        if let Some(e) = child.stderr.take() {
            tokio::spawn(crate::runtime::pump_lines(e, ltx));
        }
        loop {
            tokio::select! {
                line = lrx.recv() => match line {
                    Some(l) => if tx.send(json!({ "line": l })).await.is_err() { break },
                    None => break,
                },
                _ = tx.closed() => break,
            }
        }
        if tx.is_closed() {
            // The client went away: the one-off goes with it.
            crate::runtime::signal_group(pgid, libc::SIGTERM);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await;
            crate::runtime::signal_group(pgid, libc::SIGKILL);
            ev_p.event(Some(&ev_app), &ev_actor, "run", &detail, "disconnected").await;
            return;
        }
        let code = match child.wait().await {
            Ok(s) => s.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)),
            Err(_) => 1,
        };
        crate::runtime::signal_group(pgid, libc::SIGKILL);
        ev_p.event(Some(&ev_app), &ev_actor, "run", &detail, &format!("exit {code}")).await;
        let _ = tx.send(json!({ "ok": true, "result": { "exit_code": code } })).await;
    });
    let body = ReceiverStream::new(rx).map(|v| Ok::<_, std::convert::Infallible>(format!("{v}\n"))).take_until(auth.revoked(&p));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .map_err(|e| anyhow!("building run response: {e}"))?)
}

/// `slipway run`: the connection upgrades to a one-off session
/// ([`crate::oneoff`]); the command runs as the app's user in its live
/// release, with its env and limits. The event log records the command
/// and its exit code when it ends.
async fn attach_one_off(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, mut req: axum::extract::Request) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let asked = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !asked.eq_ignore_ascii_case(crate::oneoff::UPGRADE) {
        return Err(ApiError::bad(format!("this endpoint needs `Upgrade: {}`", crate::oneoff::UPGRADE)));
    }
    let live = one_off_release(&p, &app).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let actor = auth.actor();
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => hyper_util::rt::TokioIo::new(u),
            Err(e) => {
                tracing::warn!(app = %app, error = %e, "one-off connection did not upgrade");
                return;
            }
        };
        let outcome = crate::oneoff::serve(io, |command| release::one_off_command(&p, &app, &live, command)).await;
        if outcome.command.is_empty() {
            return;
        }
        // The command as typed, cut to what an event line can hold.
        let detail: String = outcome.command.chars().take(200).collect();
        let result = match outcome.exit_code {
            Some(c) => format!("exit {c}"),
            None => "disconnected".to_string(),
        };
        p.event(Some(&app), &actor, "run", &detail, &result).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, crate::oneoff::UPGRADE)
        .body(Body::empty())
        .map_err(|e| anyhow!("building upgrade response: {e}"))?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteReq {
    to: String,
}

async fn promote(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let staging = auth.app(&p, &name).await?;
    let req: PromoteReq = parse_body(&body)?;
    // Promotion writes to the target: the caller must be allowed there too.
    let live = auth.app(&p, &req.to).await?;
    let actor = auth.actor();
    Ok(operation(p.logs.app(&live), move |progress| async move {
        let v = release::promote(&p, &staging, &live, &actor, &progress).await?;
        Ok(json!({ "release": format!("v{v}") }))
    }))
}

async fn get_webhook(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let (url, secret) = p.store.call(move |s| Ok((s.webhook(&app)?, s.webhook_secret(&app)?))).await?;
    Ok(Json(json!({ "url": url, "secret": secret, "signature_header": crate::notify::SIGNATURE_HEADER })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookReq {
    url: String,
}

async fn set_webhook(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: WebhookReq = parse_body(&body)?;
    crate::notify::WebhookUrl::parse(&req.url).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let (a, u) = (app.clone(), req.url.clone());
    // The secret is made once per app and kept when the URL changes, so
    // receivers need not be reconfigured.
    let secret = p
        .store
        .call(move |s| {
            s.set_webhook(&a, Some(&u))?;
            match s.webhook_secret(&a)? {
                Some(secret) => Ok(secret),
                None => {
                    let secret = crate::notify::generate_secret();
                    s.set_webhook_secret(&a, &secret)?;
                    Ok(secret)
                }
            }
        })
        .await?;
    p.event(Some(&app), &auth.actor(), "webhook:set", "", "ok").await;
    Ok(Json(json!({ "url": req.url, "secret": secret, "signature_header": crate::notify::SIGNATURE_HEADER })).into_response())
}

async fn delete_webhook(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let a = app.clone();
    p.store.call(move |s| s.set_webhook(&a, None)).await?;
    p.event(Some(&app), &auth.actor(), "webhook:unset", "", "ok").await;
    Ok(Json(json!({ "url": null })).into_response())
}

/// `slipway webhook test APP`: one signed delivery of a `test` event, now;
/// the receiver's answer comes back and goes to the event log.
async fn test_webhook(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let a = app.clone();
    let (url, secret) = p.store.call(move |s| Ok((s.webhook(&a)?, s.webhook_secret(&a)?))).await?;
    let url = url.ok_or_else(|| ApiError::bad(format!("{app} has no webhook: slipway webhook set {app} URL")))?;
    let target = crate::notify::WebhookUrl::parse(&url).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let payload = json!({
        "app": app.as_str(),
        "action": "test",
        "outcome": "ok",
        "actor": auth.0.name,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "url": p.app_url(&app),
    });
    let result = crate::notify::deliver_once(&target, secret.as_deref(), payload.to_string().as_bytes()).await;
    let (ok, detail) = match &result {
        Ok(status) => (true, format!("{url}: {status}")),
        Err(e) => (false, format!("{url}: {e:#}")),
    };
    p.event(Some(&app), &auth.actor(), "webhook:test", &detail, if ok { "ok" } else { "failed" }).await;
    match result {
        Ok(status) => Ok(Json(json!({ "delivered": true, "status": status, "url": url })).into_response()),
        Err(e) => Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("delivery to {url} failed: {e:#}"))),
    }
}

async fn list_domains(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let a = app.clone();
    let mut hosts = vec![p.app_host(&app)];
    hosts.extend(p.store.call(move |s| s.domains(&a)).await?);
    Ok(Json(hosts).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainReq {
    host: String,
}

async fn add_domain(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: DomainReq = parse_body(&body)?;
    let host = names::parse_host(&req.host)?;
    // A name under the server's domain belongs to the app of that name.
    if let Some(sub) = host.strip_suffix(&format!(".{}", p.domain)) {
        if sub != app.as_str() {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{host} is reserved for app {sub}")));
        }
    }
    let h = host.clone();
    if let Some(owner) = p.store.call(move |s| s.domain_owner(&h)).await? {
        if owner != app.as_str() {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{host} already belongs to another app")));
        }
    }
    let (a, h) = (app.clone(), host.clone());
    p.store.call(move |s| s.add_domain(&a, &h)).await?;
    p.register_routes(&app).await;
    p.event(Some(&app), &auth.actor(), "domains:add", &host, "ok").await;
    Ok(Json(json!({ "added": host })).into_response())
}

async fn remove_domain(State(p): State<Shared>, auth: Auth, Path((name, host)): Path<(String, String)>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let host = names::parse_host(&host)?;
    let (a, h) = (app.clone(), host.clone());
    if !p.store.call(move |s| s.remove_domain(&a, &h)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("{host} is not a domain of {app}")));
    }
    p.register_routes(&app).await;
    p.event(Some(&app), &auth.actor(), "domains:remove", &host, "ok").await;
    Ok(Json(json!({ "removed": host })).into_response())
}

async fn list_keys(State(p): State<Shared>, auth: Auth) -> ApiResult {
    auth.admin()?;
    Ok(Json(p.store.call(|s| s.keys()).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyReq {
    name: String,
    key: String,
    app: Option<String>,
}

async fn add_key(State(p): State<Shared>, auth: Auth, body: Bytes) -> ApiResult {
    auth.admin()?;
    let req: KeyReq = parse_body(&body)?;
    names::check_label(&req.name)?;
    let scope = match &req.app {
        Some(a) => Some(auth.app(&p, a).await?),
        None => None,
    };
    let (public_key, fingerprint) = crate::ssh::parse_public_key(&req.key).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let (n, f, k, s2) = (req.name.clone(), fingerprint.clone(), public_key, scope.clone());
    if !p.store.call(move |s| s.add_key(&n, &f, &k, s2.as_ref())).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("a key named {} or with fingerprint {fingerprint} exists", req.name)));
    }
    p.event(scope.as_ref(), &auth.actor(), "keys:add", &format!("{} {fingerprint}", req.name), "ok").await;
    Ok((StatusCode::CREATED, Json(json!({ "name": req.name, "fingerprint": fingerprint, "app": req.app }))).into_response())
}

async fn remove_key(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    auth.admin()?;
    names::check_label(&name)?;
    let n = name.clone();
    if !p.store.call(move |s| s.remove_key(&n)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no key named {name}")));
    }
    p.credentials_revoked();
    p.event(None, &auth.actor(), "keys:remove", &name, "ok").await;
    Ok(Json(json!({ "removed": name })).into_response())
}

// backup track (issue 14 #6): a snapshot of the whole server, streamed
// as a tar.gz of known length (a cut transfer is seen as one). Admins only:
// it holds every app's data and the server's keys.
async fn backup(State(p): State<Shared>, auth: Auth) -> ApiResult {
    auth.admin()?;
    let (file, len) = crate::backup::snapshot(&p).await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Response::builder()
        .header("content-type", "application/gzip")
        .header("content-length", len)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::from(anyhow::anyhow!("building the backup response: {e}")))
}

async fn list_tokens(State(p): State<Shared>, auth: Auth) -> ApiResult {
    auth.admin()?;
    Ok(Json(p.store.call(|s| s.tokens()).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenReq {
    name: String,
    app: Option<String>,
}

async fn create_token(State(p): State<Shared>, auth: Auth, body: Bytes) -> ApiResult {
    auth.admin()?;
    let req: TokenReq = parse_body(&body)?;
    names::check_label(&req.name)?;
    let scope = match &req.app {
        Some(a) => Some(auth.app(&p, a).await?),
        None => None,
    };
    let token = auth::generate_token();
    let (n, h, s2) = (req.name.clone(), auth::hash_token(&token), scope.clone());
    if !p.store.call(move |s| s.add_token(&n, &h, s2.as_ref())).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("a token named {} exists", req.name)));
    }
    p.event(scope.as_ref(), &auth.actor(), "tokens:create", &req.name, "ok").await;
    Ok((StatusCode::CREATED, Json(json!({ "name": req.name, "app": req.app, "token": token }))).into_response())
}

async fn revoke_token(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    auth.admin()?;
    names::check_label(&name)?;
    let n = name.clone();
    if !p.store.call(move |s| s.revoke_token(&n)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no token named {name}")));
    }
    p.credentials_revoked();
    p.event(None, &auth.actor(), "tokens:revoke", &name, "ok").await;
    Ok(Json(json!({ "revoked": name })).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    app: Option<String>,
    n: Option<u32>,
    /// Only events of the last this many seconds.
    since: Option<u64>,
}

async fn events(State(p): State<Shared>, auth: Auth, Query(q): Query<EventsQuery>) -> ApiResult {
    let app = match (&q.app, &auth.0.scope) {
        (Some(a), _) => Some(auth.app(&p, a).await?),
        (None, Some(scope)) => Some(AppName::parse(scope)?),
        (None, None) => None,
    };
    let n = q.n.unwrap_or(100).min(10_000);
    // Events record whole seconds in UTC, a format that sorts as text.
    let since = q.since.map(|secs| {
        let from = chrono::Utc::now() - chrono::Duration::seconds(secs.min(100 * 365 * 86_400) as i64);
        from.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    });
    Ok(Json(p.store.call(move |s| s.events_since(app.as_ref(), n, since.as_deref())).await?).into_response())
}

// ---- git over HTTP ----

async fn git_http(State(p): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    match git_http_inner(p, method, uri, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_git_response(),
    }
}

impl ApiError {
    /// git shows a plain-text body of an error response to the user.
    fn into_git_response(self) -> Response {
        let mut r = (self.status, format!("slipway: {}\n", self.message)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"slipway\""));
        }
        r
    }
}

async fn git_http_inner(p: Shared, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> ApiResult {
    let path = uri.path().strip_prefix("/git").unwrap_or("");
    let query = uri.query().unwrap_or("");
    let (repo_seg, rest) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let name = repo_seg.strip_suffix(".git").unwrap_or(repo_seg);
    let app = AppName::parse(name).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.to_string()))?;
    let push = match (rest, query) {
        ("info/refs", "service=git-receive-pack") | ("git-receive-pack", _) => true,
        ("info/refs", "service=git-upload-pack") | ("git-upload-pack", _) => false,
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "only the smart HTTP protocol is served")),
    };

    let principal = git_principal(&p, &headers).await?;
    if !principal.may_access(&app) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, format!("this token may not access app {app}")));
    }
    let a = app.clone();
    let exists = p.store.call(move |s| s.app(&a)).await?.is_some();
    if !exists {
        if push && principal.is_admin() {
            create_app_record(&p, &app, &Actor(principal.name.clone())).await?;
        } else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no app named {app}")));
        }
    }
    p.repos.ensure(&app).await?;

    let mut env = vec![("REMOTE_USER".to_string(), principal.name.clone())];
    let mut push_id = None;
    if push && rest == "git-receive-pack" {
        let id = p.register_push(Push { app: app.clone(), actor: principal.name.clone() });
        env.push(("SLIPWAY_PUSH".into(), id.clone()));
        env.push(("SLIPWAY_SOCKET".into(), p.layout.socket().display().to_string()));
        push_id = Some(id);
    }
    let path_info = format!("/{app}.git/{rest}");
    let (resp, exited) = match p.repos.http_backend(&method, &path_info, query, &headers, body, env).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(id) = &push_id {
                p.end_push(id);
            }
            return Err(e.into());
        }
    };
    // The push ends when git does, whether or not its client is still
    // there: only then are its ref updates settled.
    if let Some(id) = push_id {
        tokio::spawn(async move {
            let _ = exited.await;
            p.end_push(&id);
        });
    }
    Ok(resp)
}

/// HTTP basic auth for git: any user name, password = an API token.
async fn git_principal(p: &Shared, headers: &HeaderMap) -> ApiResult<Principal> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m.to_string());
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Err(unauthorized("authentication required: use an API token as the password"));
    };
    let encoded = value.strip_prefix("Basic ").ok_or_else(|| unauthorized("use HTTP basic auth"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| unauthorized("malformed basic auth"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| unauthorized("malformed basic auth"))?;
    let (_, password) = decoded.split_once(':').ok_or_else(|| unauthorized("malformed basic auth"))?;
    lookup_token(p, password).await?.ok_or_else(|| invalid_token("git"))
}

// ---- the pre-receive hook ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRequest {
    pub push: String,
    pub refs: Vec<RefUpdate>,
    pub env: BTreeMap<String, String>,
}

async fn pre_receive(State(p): State<Shared>, Extension(t): Extension<Transport>, body: Bytes) -> ApiResult {
    if t != Transport::Local {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such endpoint"));
    }
    let req: HookRequest = parse_body(&body)?;
    let push = p.push(&req.push).ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "unknown push; pushes go through slipway's git endpoints"))?;
    let q = Quarantine(
        req.env
            .into_iter()
            .filter(|(k, _)| crate::git::QUARANTINE_VARS.contains(&k.as_str()))
            .collect(),
    );
    let id = req.push;
    Ok(operation(p.logs.app(&push.app), move |progress| async move {
        let outcome = release::receive_push(&p, &push.app, &Actor(push.actor.clone()), req.refs, q, &progress).await?;
        p.hold_until_push_ends(&id, outcome);
        Ok(json!({}))
    }))
}
