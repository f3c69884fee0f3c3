//! The web dashboard at `GET /` on the API address: server-rendered HTML
//! (maud: templates checked at compile time, escaped by default) and one
//! small hand-written script, [`SCRIPT`], served by the binary. No Node
//! toolchain, no vendored framework: the pages are plain HTML, and the
//! script only streams (logs, operation output) and posts the buttons.
//!
//! Signing in trades an API token for a session cookie (HttpOnly,
//! SameSite=Strict, random, kept only in memory as a hash). The buttons
//! call the JSON API itself, so every action goes through the same
//! handlers and the same checks as the CLI; the API accepts the cookie in
//! place of a bearer token, and for anything but GET only with the
//! session's CSRF token in `X-CSRF-Token` and no foreign `Origin`.
//!
//! Architecture invariant: the dashboard reads through `store` and the
//! supervisor and writes only through `/api/`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};

use crate::auth::{self, Principal};
use crate::names::AppName;
use crate::platform::Platform;
use crate::store::ReleaseStatus;
use crate::supervisor::State as ProcState;

type Shared = std::sync::Arc<Platform>;

/// The dashboard's script, served at `/dashboard.js`.
pub const SCRIPT: &str = include_str!("dashboard.js");

const COOKIE: &str = "slipway_session";
/// A session lasts a working day; signing in again is cheap.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// Sessions live in memory: bounded, so signing in in a loop cannot grow it.
const MAX_SESSIONS: usize = 10_000;

/// The dashboard's routes, for the TCP API listener.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(home))
        .route("/dashboard.js", get(script))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/apps/{app}", get(app_page))
}

struct Session {
    principal: Principal,
    csrf: String,
    expires: Instant,
}

static SESSIONS: LazyLock<Mutex<HashMap<String, Session>>> = LazyLock::new(Mutex::default);

fn sessions() -> std::sync::MutexGuard<'static, HashMap<String, Session>> {
    SESSIONS.lock().unwrap_or_else(|e| e.into_inner())
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_string))
}

/// The session a request's cookie names, if it is live: its principal and
/// CSRF token.
fn session(headers: &HeaderMap) -> Option<(Principal, String)> {
    let id = cookie_value(headers)?;
    if id.is_empty() || id.len() > 200 {
        return None;
    }
    let hash = auth::hash_token(&id);
    let mut all = sessions();
    match all.get(&hash) {
        Some(s) if s.expires > Instant::now() => Some((s.principal.clone(), s.csrf.clone())),
        Some(_) => {
            all.remove(&hash);
            None
        }
        None => None,
    }
}

/// A request from another site, by its `Origin`: refused whatever it carries.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return false };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
    origin_host != host
}

/// The API's second credential: the dashboard's cookie. `Err` carries why
/// a cookie that is there is not enough; `Ok(None)`: no session at all.
pub fn api_principal(headers: &HeaderMap, method: &Method) -> Result<Option<Principal>, &'static str> {
    let Some((principal, csrf)) = session(headers) else { return Ok(None) };
    if method == Method::GET || method == Method::HEAD {
        return Ok(Some(principal));
    }
    if foreign_origin(headers) {
        return Err("cross-site request refused");
    }
    let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    if sent.is_empty() || !constant_time_eq(sent.as_bytes(), csrf.as_bytes()) {
        return Err("missing or wrong X-CSRF-Token for this session");
    }
    Ok(Some(principal))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], SCRIPT).into_response()
}

async fn login(State(p): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if foreign_origin(&headers) || body.len() > 4096 {
        return (StatusCode::FORBIDDEN, page("refused", None, html! { p { "Sign in from the dashboard itself." } })).into_response();
    }
    let token = url::form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.trim().to_string()).unwrap_or_default();
    let principal = match crate::api::principal_for_token(&p, &token).await {
        Some(pr) => pr,
        None => {
            p.event(None, &crate::release::Actor("dashboard".into()), "dashboard:login", "", "refused").await;
            return (StatusCode::UNAUTHORIZED, sign_in_page(Some("That token is not valid (revoked, or mistyped)."))).into_response();
        }
    };
    let id = auth::generate_token();
    let csrf = auth::generate_token();
    {
        let mut all = sessions();
        if all.len() >= MAX_SESSIONS {
            let now = Instant::now();
            all.retain(|_, s| s.expires > now);
        }
        if all.len() >= MAX_SESSIONS {
            // Still full of live sessions: the one nearest its end goes.
            if let Some(k) = all.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                all.remove(&k);
            }
        }
        all.insert(auth::hash_token(&id), Session { principal: principal.clone(), csrf, expires: Instant::now() + SESSION_LIFE });
    }
    p.event(None, &crate::release::Actor(principal.name.clone()), "dashboard:login", "", "ok").await;
    // Not `Secure`: the API address is plain HTTP (loopback by default);
    // behind a TLS terminator the browser keeps it to HTTPS by itself.
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_LIFE.as_secs());
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers) {
        if !foreign_origin(&headers) {
            sessions().remove(&auth::hash_token(&id));
        }
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// What an app's processes add up to, in one word.
pub fn app_state(p: &Platform, app: &AppName) -> &'static str {
    let states: Vec<ProcState> = p.supervisor.instances(app.as_str()).iter().map(|i| i.status().state).collect();
    if states.contains(&ProcState::Crashed) {
        "crashed"
    } else if states.iter().any(|s| matches!(s, ProcState::Running | ProcState::Starting | ProcState::Backoff)) {
        "running"
    } else {
        "stopped"
    }
}

async fn home(State(p): State<Shared>, headers: HeaderMap) -> Response {
    let Some((principal, csrf)) = session(&headers) else { return sign_in_page(None).into_response() };
    let apps = match p.store.call(|s| s.apps()).await {
        Ok(a) => a,
        Err(e) => return failure(e),
    };
    let mut rows = Vec::new();
    for a in apps {
        let Ok(name) = AppName::parse(&a.name) else { continue };
        if !principal.may_access(&name) {
            continue;
        }
        let n = name.clone();
        let live = p.store.call(move |s| s.live_release(&n)).await.ok().flatten();
        rows.push((app_state(&p, &name), p.app_url(&name), live.map(|r| format!("v{}", r.version)), name));
    }
    let body = html! {
        h2 { "Apps" }
        @if rows.is_empty() {
            p { "No apps yet. Push one: " code { "git push slipway main" } }
        } @else {
            table #apps {
                thead { tr { th { "App" } th { "State" } th { "Live release" } th { "URL" } } }
                tbody {
                    @for (state, url, release, name) in &rows {
                        tr data-app=(name.as_str()) {
                            td { a href={ "/dashboard/apps/" (name.as_str()) } { (name.as_str()) } }
                            td class={ "state " (state) } { (state) }
                            td { (release.as_deref().unwrap_or("none")) }
                            td { a href=(url) { (url) } }
                        }
                    }
                }
            }
        }
    };
    page("apps", Some((&principal, &csrf)), body).into_response()
}

async fn app_page(State(p): State<Shared>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let Some((principal, csrf)) = session(&headers) else { return Redirect::to("/").into_response() };
    let Ok(app) = AppName::parse(&name) else { return not_found() };
    if !principal.may_access(&app) {
        return not_found();
    }
    let a = app.clone();
    let loaded = p
        .store
        .call(move |s| Ok((s.app(&a)?, s.releases(&a)?, s.events(Some(&a), 50)?)))
        .await;
    let (releases, events) = match loaded {
        Ok((Some(_), r, e)) => (r, e),
        Ok((None, _, _)) => return not_found(),
        Err(e) => return failure(e),
    };
    let live = releases.iter().find(|r| r.status == ReleaseStatus::Live).map(|r| format!("v{}", r.version));
    let instances = p.supervisor.instances(app.as_str());
    let mut types: Vec<(String, usize)> = Vec::new();
    for i in &instances {
        match types.iter_mut().find(|(t, _)| *t == i.spec.ptype) {
            Some((_, n)) => *n += 1,
            None => types.push((i.spec.ptype.clone(), 1)),
        }
    }
    let url = p.app_url(&app);
    let body = html! {
        p { a href="/" { "← all apps" } }
        h2 { (app.as_str()) }
        dl #summary {
            dt { "State" } dd #state { (app_state(&p, &app)) }
            dt { "Live release" } dd #live { (live.as_deref().unwrap_or("none")) }
            dt { "URL" } dd { a href=(url) { (url) } }
            dt { "Git remote" } dd { code { "http://" (headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("HOST")) "/git/" (app.as_str()) ".git" } }
        }
        section {
            h3 { "Processes" }
            table #processes {
                thead { tr { th { "Process" } th { "Release" } th { "PID" } th { "State" } th { "Restarts" } } }
                tbody {
                    @for i in &instances {
                        @let st = i.status();
                        tr {
                            td { (i.spec.ptype) "." (i.spec.index) }
                            td { "v" (st.release) }
                            td { (st.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())) }
                            td { (format!("{:?}", st.state).to_lowercase()) }
                            td { (st.restarts) }
                        }
                    }
                }
            }
            form #scale data-app=(app.as_str()) {
                @for (t, n) in &types {
                    label { (t) " " input type="number" min="0" max="100" name=(t) value=(n); }
                    " "
                }
                @if types.is_empty() {
                    label { "web " input type="number" min="0" max="100" name="web" value="1"; }
                    " "
                }
                button type="submit" { "Scale" }
                " "
                button type="button" data-action="restart" data-app=(app.as_str()) { "Restart" }
            }
        }
        section {
            h3 { "Output" }
            pre #output aria-live="polite" { }
        }
        section {
            h3 { "Releases" }
            table #releases {
                thead { tr { th { "Release" } th { "Status" } th { "Commit" } th { "By" } th { "When" } th { "Description" } th {} } }
                tbody {
                    @for r in &releases {
                        tr data-version={ "v" (r.version) } {
                            td { "v" (r.version) }
                            td {
                                (format!("{:?}", r.status).to_lowercase())
                                @if r.collected { " (code collected)" }
                            }
                            td { code { (r.commit.get(..8).unwrap_or(&r.commit)) } }
                            td { (r.actor) }
                            td { (r.created_at) }
                            td { (r.description) }
                            td {
                                // A collected release has no tree to roll back to
                                // (--keep-releases): say how to rebuild it, as
                                // `slipway rollback` does.
                                @if r.status == ReleaseStatus::Superseded && r.collected {
                                    span .hint { "rebuild: slipway deploy " (app.as_str()) " --ref " (r.commit) }
                                } @else if r.status == ReleaseStatus::Superseded {
                                    button type="button" data-action="rollback" data-app=(app.as_str()) data-version={ "v" (r.version) } { "Roll back to v" (r.version) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h3 { "Logs" }
            pre #logs data-app=(app.as_str()) { }
        }
        section {
            h3 { "Events" }
            table #events {
                thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Detail" } th { "Outcome" } } }
                tbody {
                    @for e in &events {
                        tr { td { (e.at) } td { (e.actor) } td { (e.action) } td { (e.detail) } td { (e.outcome) } }
                    }
                }
            }
        }
    };
    page(app.as_str(), Some((&principal, &csrf)), body).into_response()
}

fn sign_in_page(error: Option<&str>) -> Html<String> {
    page(
        "sign in",
        None,
        html! {
            h2 { "Sign in" }
            @if let Some(e) = error { p .error role="alert" { (e) } }
            form #login method="post" action="/dashboard/login" {
                label { "API token " input type="password" name="token" autocomplete="current-password" required; }
                " "
                button type="submit" { "Sign in" }
            }
            p { "Create one with " code { "slipway tokens create NAME [--app APP]" } "; a token limited to one app shows that app only." }
        },
    )
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, page("not found", None, html! { p { "No such app here. " a href="/" { "All apps" } } })).into_response()
}

fn failure(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "dashboard page failed");
    (StatusCode::INTERNAL_SERVER_ERROR, page("error", None, html! { p { "The page could not be built; the server log says why." } })).into_response()
}

fn page(title: &str, signed_in: Option<(&Principal, &str)>, body: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some((_, csrf)) = signed_in { meta name="csrf" content=(csrf); }
                title { (title) " · slipway" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { a href="/" { "slipway" } }
                    @if let Some((who, _)) = signed_in {
                        form method="post" action="/dashboard/logout" {
                            span { "signed in as " (who.name) @if let Some(s) = &who.scope { " (" (s) " only)" } }
                            " "
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
                script src="/dashboard.js" defer {}
            }
        }
    };
    Html(markup.into_string())
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}\
header{display:flex;justify-content:space-between;align-items:center;padding:.5rem 1.5rem;background:#1f3a5f;color:#fff}\
header a{color:#fff;text-decoration:none}header h1{font-size:1.3rem;margin:0}\
main{padding:1rem 1.5rem;max-width:70rem}table{border-collapse:collapse;width:100%;background:#fff;margin:.5rem 0}\
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #dde1e6;vertical-align:top}\
pre{background:#111820;color:#d6e2ee;padding:.6rem;max-height:24rem;overflow:auto;white-space:pre-wrap;min-height:2rem}\
.state.running{color:#17753a}.state.crashed{color:#b3261e}.state.stopped{color:#6b7280}.error{color:#b3261e}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}\
input[type=number]{width:4rem}button{cursor:pointer}";
