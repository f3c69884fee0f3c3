//! The shared handle: everything the API, the git endpoints, the SSH
//! server and the pipeline reach through one `Arc<Platform>` — the store,
//! the proxy, the supervisor, logs, builds, repos — plus the small
//! registries they share (per-app locks, pushes under way, SSH sessions,
//! app users).
//!
//! It sits below every module that uses it: `server` builds it and wires
//! the listeners; `api`, `ssh` and `release` take it as an argument and
//! never import `server`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth;
use crate::build::Builder;
use crate::git::Repos;
use crate::layout::Layout;
use crate::logs::Logs;
use crate::names::AppName;
use crate::proxy::Proxy;
use crate::release::Actor;
use crate::store::Store;
use crate::supervisor::Supervisor;

/// Everything the API, the git endpoints and the pipeline share.
pub struct Platform {
    pub layout: Layout,
    pub store: Store,
    pub proxy: Arc<Proxy>,
    pub supervisor: Supervisor,
    pub logs: Logs,
    pub builder: Arc<Builder>,
    pub repos: Repos,
    pub domain: String,
    pub http_port: u16,
    pub keep_releases: usize,
    app_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pushes under way, by the id handed to their hook.
    pushes: Mutex<HashMap<String, PushEntry>>,
    /// Pushes whose git ended while their deploy was still running.
    ended: Mutex<HashMap<String, AppName>>,
    /// Credentials that live for one SSH command (token hash → who).
    sessions: Mutex<HashMap<String, crate::auth::Principal>>,
    /// The API's address, for commands run on behalf of SSH clients.
    pub api_addr: std::net::SocketAddr,
    /// Run each app as its own unprivileged user (the daemon is root).
    pub isolation: bool,
    users: Mutex<HashMap<String, crate::runtime::AppUser>>,
}

/// App uids start here, far above any distribution's system and login
/// users, so they never collide with a real account.
const FIRST_APP_UID: u32 = 200_000;

/// Who is pushing to which app, registered for the duration of one push.
#[derive(Debug, Clone)]
pub struct Push {
    pub app: AppName,
    pub actor: String,
}

struct PushEntry {
    push: Push,
    /// Once the push's deploy succeeded: the app's lock, held until
    /// receive-pack has updated the refs and the push ends, and the
    /// deployed commit, tagged then.
    held: Option<crate::release::PushOutcome>,
}

impl Platform {
    /// The parts `server` builds; the registries start empty.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: Layout,
        store: Store,
        proxy: Arc<Proxy>,
        supervisor: Supervisor,
        logs: Logs,
        builder: Arc<Builder>,
        repos: Repos,
        domain: String,
        http_port: u16,
        keep_releases: usize,
        api_addr: std::net::SocketAddr,
        isolation: bool,
    ) -> Platform {
        Platform {
            layout,
            store,
            proxy,
            supervisor,
            logs,
            builder,
            repos,
            domain,
            http_port,
            keep_releases,
            app_locks: Mutex::default(),
            pushes: Mutex::default(),
            ended: Mutex::default(),
            sessions: Mutex::default(),
            api_addr,
            isolation,
            users: Mutex::default(),
        }
    }

    /// The lock that serializes operations on one app.
    pub fn app_lock(&self, app: &AppName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.app_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(app.to_string()).or_default().clone()
    }

    /// The app's user, once [`Platform::load_user`] has run for it; `None`
    /// without isolation.
    ///
    /// With isolation on this never answers `None`: an app not yet seen in
    /// this daemon's life is looked up in (or allocated by) the store, and
    /// if even that fails, the command gets `nobody` rather than root.
    pub fn user_of(&self, app: &AppName) -> Option<crate::runtime::AppUser> {
        if !self.isolation {
            return None;
        }
        if let Some(u) = self.users.lock().unwrap_or_else(|e| e.into_inner()).get(app.as_str()).copied() {
            return Some(u);
        }
        let user = match self.store.app_uid(app, FIRST_APP_UID) {
            Ok(uid) => crate::runtime::AppUser { uid, gid: uid },
            Err(e) => {
                tracing::error!(app = %app, error = %format!("{e:#}"), "looking up the app's user failed; using nobody");
                crate::runtime::AppUser { uid: 65534, gid: 65534 }
            }
        };
        self.users.lock().unwrap_or_else(|e| e.into_inner()).insert(app.to_string(), user);
        Some(user)
    }

    /// Look up (allocating on first use) the app's user.
    pub async fn load_user(&self, app: &AppName) -> anyhow::Result<Option<crate::runtime::AppUser>> {
        if !self.isolation {
            return Ok(None);
        }
        let a = app.clone();
        let uid = self.store.call(move |s| s.app_uid(&a, FIRST_APP_UID)).await?;
        let user = crate::runtime::AppUser { uid, gid: uid };
        self.users.lock().unwrap_or_else(|e| e.into_inner()).insert(app.to_string(), user);
        Ok(Some(user))
    }

    pub fn app_host(&self, app: &AppName) -> String {
        format!("{app}.{}", self.domain)
    }

    pub fn app_url(&self, app: &AppName) -> String {
        match self.http_port {
            80 => format!("http://{}/", self.app_host(app)),
            port => format!("http://{}:{port}/", self.app_host(app)),
        }
    }

    /// Point the app's default host and its custom domains at its backend.
    pub async fn register_routes(&self, app: &AppName) {
        let mut hosts = vec![self.app_host(app)];
        let a = app.clone();
        match self.store.call(move |s| s.domains(&a)).await {
            Ok(d) => hosts.extend(d),
            Err(e) => tracing::warn!(app = %app, error = %format!("{e:#}"), "reading domains failed"),
        }
        self.proxy.set_hosts(app.as_str(), hosts);
    }

    /// Append to the audit trail. A failure to record never fails the
    /// operation it describes.
    pub async fn event(&self, app: Option<&AppName>, actor: &Actor, action: &str, detail: &str, outcome: &str) {
        let (app, actor, action, detail, outcome) =
            (app.map(|a| a.to_string()), actor.0.clone(), action.to_string(), detail.to_string(), outcome.to_string());
        if let Err(e) = self.store.call(move |s| s.record_event(app.as_deref(), &actor, &action, &detail, &outcome)).await {
            tracing::warn!(error = %format!("{e:#}"), "recording event failed");
        }
    }

    /// A token valid until [`Platform::end_session`], acting as `principal`.
    pub fn begin_session(&self, principal: crate::auth::Principal) -> String {
        let token = auth::generate_token();
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(auth::hash_token(&token), principal);
        token
    }

    pub fn end_session(&self, token: &str) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&auth::hash_token(token));
    }

    pub fn session_principal(&self, token_hash: &str) -> Option<crate::auth::Principal> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).get(token_hash).cloned()
    }

    pub fn register_push(&self, push: Push) -> String {
        let id = auth::generate_token();
        self.pushes.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), PushEntry { push, held: None });
        id
    }

    pub fn push(&self, id: &str) -> Option<Push> {
        self.pushes.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|e| e.push.clone())
    }

    /// The push's deploy succeeded: keep the app locked until git has
    /// ended, then settle it (see [`crate::release::settle_push`]). When git
    /// has ended already, settle now.
    pub fn hold_until_push_ends(self: &Arc<Self>, id: &str, outcome: crate::release::PushOutcome) {
        let mut pushes = self.pushes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = pushes.get_mut(id) {
            e.held = Some(outcome);
            return;
        }
        drop(pushes);
        let Some(app) = self.ended.lock().unwrap_or_else(|e| e.into_inner()).remove(id) else { return };
        let p = self.clone();
        tokio::spawn(async move { crate::release::settle_push(&p, &app, outcome).await });
    }

    /// The push's git process has ended: receive-pack's ref updates are
    /// settled and its objects left quarantine. Settle the deploy now, or,
    /// if it is still running, when it finishes.
    pub fn end_push(self: &Arc<Self>, id: &str) {
        let entry = self.pushes.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let Some(PushEntry { push, held }) = entry else { return };
        match held {
            Some(outcome) => {
                let p = self.clone();
                tokio::spawn(async move { crate::release::settle_push(&p, &push.app, outcome).await });
            }
            None => {
                self.ended.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), push.app);
            }
        }
    }

    /// Tell the app's webhook, if it has one, how a deploy ended. Never
    /// waits for the receiver: delivery (with retries) runs on its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn notify(
        &self,
        app: &AppName,
        actor: &Actor,
        action: &str,
        version: u32,
        commit: Option<&str>,
        outcome: &str,
        detail: &str,
    ) {
        let a = app.clone();
        let Ok(Some(url)) = self.store.call(move |s| s.webhook(&a)).await else { return };
        let payload = serde_json::json!({
            "app": app.as_str(),
            "action": action,
            "release": format!("v{version}"),
            "commit": commit,
            "outcome": outcome,
            "detail": detail,
            "actor": actor.0,
            "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "url": self.app_url(app),
        });
        crate::notify::deliver(url, payload);
    }
}
