//! `certs` routes: the certificate state of an app's hosts, bring-your-own
//! certificates (hot-swapped), the HTTP → HTTPS redirect opt-out, and the
//! internal CA's root for operators to trust. A submodule of `api` for its
//! auth and errors; the logic lives in `crate::certs`.

use axum::routing::{get, put};
use axum::Router;

use super::*;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/apps/{app}/certs", get(list_certs).post(add_cert))
        .route("/api/apps/{app}/certs/redirect", put(set_redirect))
        .route("/api/certs/ca", get(ca_root))
}

fn certs(p: &Shared) -> ApiResult<Arc<crate::certs::Certs>> {
    p.certs
        .get()
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "HTTPS is off on this server: start it with --https ADDR"))
}

async fn list_certs(State(p): State<Shared>, auth: Auth, Path(name): Path<String>) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let certs = certs(&p)?;
    Ok(Json(json!({ "redirect": certs.redirects(app.as_str()), "hosts": certs.status(app.as_str()) })).into_response())
}

#[derive(Deserialize)]
struct AddCert {
    cert: String,
    key: String,
}

async fn add_cert(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: AddCert = parse_body(&body)?;
    let certs = certs(&p)?;
    match certs.add_custom(app.as_str(), &req.cert, &req.key).await {
        Ok(hosts) => Ok(Json(json!({ "hosts": hosts })).into_response()),
        Err(e) => Err(ApiError::bad(format!("{e:#}"))),
    }
}

#[derive(Deserialize)]
struct Redirect {
    redirect: bool,
}

async fn set_redirect(State(p): State<Shared>, auth: Auth, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let app = auth.app(&p, &name).await?;
    let req: Redirect = parse_body(&body)?;
    certs(&p)?.set_redirect(app.as_str(), req.redirect)?;
    let detail = if req.redirect { "plain HTTP redirects to HTTPS" } else { "plain HTTP is served, not redirected" };
    p.event(Some(&app), &auth.actor(), "certs:redirect", detail, "ok").await;
    Ok(Json(json!({ "redirect": req.redirect })).into_response())
}

async fn ca_root(State(p): State<Shared>, _auth: Auth) -> ApiResult {
    let pem = certs(&p)?.ca_root_pem().to_string();
    Ok(Json(json!({ "pem": pem })).into_response())
}
