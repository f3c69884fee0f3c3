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
    /// Certificates, with `--https` (set once at start-up).
    pub certs: std::sync::OnceLock<Arc<crate::certs::Certs>>,
    /// The first uid of this server's block (see `runtime::uids`): app
    /// uids are allocated from it, [`crate::runtime::uids::BLOCK`] of them.
    uid_base: std::sync::atomic::AtomicU32,
    /// Set once at SIGTERM/SIGINT: in-flight deploys cancel, new ones are
    /// refused, so nothing goes live while the daemon stops.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// upgrade track: set during a hand-over to the next daemon; operations
    /// that change apps are refused ("server restarting") meanwhile.
    restarting: std::sync::atomic::AtomicBool,
    /// Bumped whenever a key is removed or a token revoked: open sessions
    /// and streams re-check their credential and end if it is gone.
    revocations: tokio::sync::watch::Sender<u64>,
    /// Images of the releases that run in containers (docker track).
    pub images: crate::runtime::container::AppImages,
    /// swarm track: the proxy routes of apps on the swarm, following their tasks.
    pub task_routes: crate::task_routes::TaskRoutes,
}

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
            certs: std::sync::OnceLock::new(),
            uid_base: std::sync::atomic::AtomicU32::new(crate::runtime::uids::FIRST),
            shutdown: tokio::sync::watch::channel(false).0,
            restarting: std::sync::atomic::AtomicBool::new(false),
            revocations: tokio::sync::watch::channel(0).0,
            images: Default::default(),
            task_routes: Default::default(),
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
        let user = match self.allocate_uid(app) {
            Ok(uid) => crate::runtime::AppUser { uid, gid: uid },
            Err(e) => {
                tracing::error!(app = %app, error = %format!("{e:#}"), "looking up the app's user failed; using nobody");
                crate::runtime::AppUser { uid: 65534, gid: 65534 }
            }
        };
        self.users.lock().unwrap_or_else(|e| e.into_inner()).insert(app.to_string(), user);
        Some(user)
    }

    /// A key was removed or a token revoked.
    pub fn credentials_revoked(&self) {
        self.revocations.send_modify(|g| *g += 1);
    }

    /// Resolves once a revocation leaves `still_valid` false; never if the
    /// credential stays.
    pub async fn until_revoked<F, Fut>(&self, still_valid: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut rx = self.revocations.subscribe();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if !still_valid().await {
                return;
            }
        }
    }

    /// Is this bearer token (by hash) still good: a live SSH session's or
    /// a stored, unrevoked token?
    pub async fn token_valid(&self, hash: &str) -> bool {
        if self.session_principal(hash).is_some() {
            return true;
        }
        let h = hash.to_string();
        // A database error is not a revocation: keep the stream.
        self.store.call(move |s| s.token_by_hash(&h)).await.map(|t| t.is_some()).unwrap_or(true)
    }

    /// The daemon is stopping: cancel deploys, refuse new ones.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// upgrade track: a hand-over to the next daemon begins (true) or was
    /// given up (false).
    pub fn set_restarting(&self, on: bool) {
        self.restarting.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn restarting(&self) -> bool {
        self.restarting.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Run a deploy step unless the daemon starts stopping first; then
    /// the step is dropped (its processes die with the app user's at
    /// shutdown) and the deploy fails, so it never goes live.
    pub async fn unless_shutdown<T>(&self, step: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        let mut rx = self.shutdown.subscribe();
        tokio::select! {
            biased;
            _ = rx.wait_for(|v| *v) => anyhow::bail!("the server is shutting down: deploy cancelled, nothing went live"),
            r = step => r,
        }
    }

    /// Use the block of app uids the server claimed at start.
    pub fn set_uid_base(&self, base: u32) {
        self.uid_base.store(base, std::sync::atomic::Ordering::Relaxed);
    }

    /// The app's uid from the store, allocated in this server's block on
    /// first use; refused past the block's end (it would be another
    /// server's).
    fn allocate_uid(&self, app: &AppName) -> anyhow::Result<u32> {
        let base = self.uid_base.load(std::sync::atomic::Ordering::Relaxed);
        let uid = self.store.app_uid(app, base)?;
        if uid < base || uid >= base + crate::runtime::uids::BLOCK {
            anyhow::bail!("app uid {uid} of {app} is outside this server's block {base}..{}", base + crate::runtime::uids::BLOCK);
        }
        Ok(uid)
    }

    /// Stop everything that runs as the app's user: one-offs, release
    /// phases and whatever detached from its supervisor (setsid). Only
    /// with isolation, where the uid is the app's alone.
    /// Then its cgroups, now empty, are removed.
    /// An app on the swarm keeps its tasks: they run as its uid too, but
    /// they are the engine's to stop.
    pub async fn kill_app_processes(&self, app: &AppName) {
        if let Some(user) = self.user_of(app) {
            match self.on_swarm(app).await {
                true => crate::runtime::kill_user_on_host(user).await,
                false => crate::runtime::kill_user(user).await,
            }
        }
        crate::runtime::cgroup::remove_app(app.as_str()).await;
    }

    /// upgrade track: the same, sparing the process groups in `keep`
    /// (instances to adopt).
    pub async fn kill_app_processes_except(&self, app: &AppName, keep: &[i32]) {
        let on_swarm = self.on_swarm(app).await;
        match self.user_of(app) {
            Some(user) if on_swarm => crate::runtime::kill_user_on_host(user).await,
            Some(user) if keep.is_empty() => crate::runtime::kill_user(user).await,
            Some(user) => crate::runtime::kill_user_except(user, keep).await,
            None => {}
        }
    }

    /// swarm track: does the app run on the swarm? (An unreadable store
    /// says yes: sparing its tasks is the safe mistake.)
    pub async fn on_swarm(&self, app: &AppName) -> bool {
        let a = app.clone();
        self.store.call(move |s| s.scheduler(&a)).await.map(|s| s == crate::store::Scheduler::Swarm).unwrap_or(true)
    }

    /// Look up (allocating on first use) the app's user.
    pub async fn load_user(&self, app: &AppName) -> anyhow::Result<Option<crate::runtime::AppUser>> {
        if !self.isolation {
            return Ok(None);
        }
        let uid = self.allocate_uid(app)?;
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
        if let Some(certs) = self.certs.get() {
            certs.set_hosts(app.as_str(), hosts.clone());
        }
        self.proxy.set_hosts(app.as_str(), hosts);
    }

    /// history track (issue 13 #5): write the proxy's access lines to the
    /// logs of the apps they went to, as `router` lines, on a thread of
    /// their own. The instance serving each upstream address is looked up
    /// once per batch of lines; an address no instance holds any more
    /// (drained, stopped) is remembered for a while, so late lines of a
    /// drained process still reach its app.
    pub fn serve_router_lines(self: &Arc<Self>) {
        let Some(rx) = crate::proxy::access::open() else { return };
        let p = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("router-lines".into()).spawn(move || {
            let mut known: HashMap<std::net::SocketAddr, (String, String)> = HashMap::new();
            let mut fresh_for: Option<std::time::Instant> = None;
            // A batch's lines per app, written with one write each.
            let pending: std::cell::RefCell<HashMap<String, Vec<String>>> = Default::default();
            let flush = || {
                let Some(p) = p.upgrade() else { return };
                for (app, lines) in pending.borrow_mut().drain() {
                    if let Ok(name) = AppName::parse(&app) {
                        p.logs.app(&name).write_lines("router", &lines);
                    }
                }
            };
            let write = |addr, entry: &crate::proxy::access::Entry, line: &dyn Fn(&str) -> String| {
                let Some(p) = p.upgrade() else { return false };
                // Refreshed at most every 100 ms, and when an address is new.
                if !known.contains_key(&addr) || fresh_for.is_none_or(|t| t.elapsed() > std::time::Duration::from_millis(100)) {
                    if known.len() > 4096 {
                        known.clear();
                    }
                    for app in p.supervisor.apps() {
                        for inst in p.supervisor.instances(&app) {
                            if let Some(port) = inst.spec.port {
                                known.insert(std::net::SocketAddr::from(([127, 0, 0, 1], port)), (app.clone(), inst.name()));
                            }
                        }
                    }
                    fresh_for = Some(std::time::Instant::now());
                }
                let Some((app, instance)) = known.get(&addr) else { return false };
                crate::proxy::access::observe(app, entry);
                let mut pending = pending.borrow_mut();
                match pending.get_mut(app) {
                    Some(lines) => lines.push(line(instance)),
                    None => {
                        pending.insert(app.clone(), vec![line(instance)]);
                    }
                }
                true
            };
            crate::proxy::access::serve(rx, write, flush);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no router access lines: starting their writer failed");
        }
    }

    /// Append to the audit trail. A failure to record never fails the
    /// operation it describes.
    pub async fn event(&self, app: Option<&AppName>, actor: &Actor, action: &str, detail: &str, outcome: &str) {
        // One structured line per operation in the daemon's log (JSON with
        // --log-format json), as recorded in the event log.
        tracing::info!(app = app.map(|a| a.as_str()).unwrap_or("-"), actor = %actor.0, action, detail, outcome, "operation");
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
        // people track: the app's signing secret, and the delivery's outcome in events.
        let Ok((Some(url), secret)) = self.store.call(move |s| Ok((s.webhook(&a)?, s.webhook_secret(&a)?))).await else { return };
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
        let (store, app) = (self.store.clone(), app.to_string());
        crate::notify::deliver(url, secret, payload, move |d| async move {
            let outcome = if d.ok { "ok" } else { "failed" };
            let _ = store.call(move |s| s.record_event(Some(&app), "slipway", "webhook", &d.detail, outcome)).await;
        });
    }
}
