//! `slipway server`: binds the listeners, opens the state, restores every
//! app's live release, serves until SIGTERM (graceful: apps get their stop
//! signal and grace period) or SIGINT (fast: apps are killed), and leaves
//! no process behind either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

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

/// Validated server settings (from `slipway server` flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data: PathBuf,
    pub api: SocketAddr,
    pub http: SocketAddr,
    pub ssh: SocketAddr,
    pub domain: String,
    pub keep_releases: usize,
    /// Run apps as their own users when root (`--isolation off` disables).
    pub isolation: bool,
}

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

pub async fn run(cfg: ServerConfig) -> Result<()> {
    let layout = Layout::new(&cfg.data);
    for dir in [layout.root().to_path_buf(), layout.repos(), layout.envs(), layout.cache(), layout.run(), layout.root().join("apps")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Apps run as their own users when the daemon is root: they must be
    // able to reach their own release, environment and data below DIR,
    // and nothing else there.
    // SAFETY: geteuid has no preconditions.
    let isolation = cfg.isolation && unsafe { libc::geteuid() } == 0;
    if isolation {
        check_reachable(layout.root())?;
        set_mode(layout.root(), 0o711)?;
        for dir in [layout.root().join("apps"), layout.envs(), layout.cache()] {
            set_mode(&dir, 0o711)?;
        }
        for dir in [layout.repos(), layout.run()] {
            set_mode(&dir, 0o700)?;
        }
    } else {
        set_mode(layout.root(), 0o700)?;
    }
    let store = Store::open(&layout.db())?;
    for suffix in ["", "-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{suffix}", layout.db().display()));
        if f.exists() {
            set_mode(&f, 0o600)?;
        }
    }
    ensure_admin_token(&layout, &store)?;

    let api_listener = TcpListener::bind(cfg.api).await.with_context(|| format!("binding API address {}", cfg.api))?;
    let http_listener = TcpListener::bind(cfg.http).await.with_context(|| format!("binding HTTP address {}", cfg.http))?;
    let ssh_listener = TcpListener::bind(cfg.ssh).await.with_context(|| format!("binding SSH address {}", cfg.ssh))?;
    let ssh_addr = ssh_listener.local_addr().context("SSH address")?;
    let sock = layout.socket();
    let _ = std::fs::remove_file(&sock);
    let unix_listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    set_mode(&sock, 0o600)?;
    let api_addr = api_listener.local_addr().context("API address")?;
    let http_addr = http_listener.local_addr().context("HTTP address")?;

    let exe = std::env::current_exe().context("locating the slipway binary")?;
    let base_path = std::env::var("PATH").unwrap_or_else(|_| crate::runtime::SYSTEM_PATH.into());
    let platform = Arc::new(Platform {
        builder: Arc::new(Builder::new(layout.clone(), base_path)),
        repos: Repos::new(layout.clone(), exe),
        logs: Logs::new(layout.clone()),
        supervisor: Supervisor::new(layout.run()),
        proxy: Arc::new(Proxy::new()),
        store,
        domain: cfg.domain.clone(),
        http_port: http_addr.port(),
        keep_releases: cfg.keep_releases,
        app_locks: Mutex::default(),
        pushes: Mutex::default(),
        sessions: Mutex::default(),
        ended: Mutex::default(),
        api_addr,
        isolation,
        users: Mutex::default(),
        layout,
    });

    // Before anything starts: stop what a previous daemon (killed hard)
    // left running, so no app ever runs twice.
    let reaped = platform.supervisor.reap_leftovers().await;
    if reaped > 0 {
        tracing::info!(count = reaped, "stopped processes left by a previous run");
    }
    for app in platform.store.call(|s| s.apps()).await? {
        if let Ok(name) = AppName::parse(&app.name) {
            platform.repos.ensure(&name).await?;
            platform.register_routes(&name).await;
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let proxy_task = tokio::spawn(platform.proxy.clone().serve(http_listener, shutdown_rx.clone()));
    let api_tcp = tokio::spawn(crate::api::serve_tcp(platform.clone(), api_listener, shutdown_rx.clone()));
    let api_unix = tokio::spawn(crate::api::serve_unix(platform.clone(), unix_listener, shutdown_rx.clone()));
    let ssh_config = crate::ssh::config(&platform.layout)?;
    let ssh_task = tokio::spawn(crate::ssh::serve(platform.clone(), ssh_config, ssh_listener, shutdown_rx.clone()));

    crate::release::restore_all(&platform).await;
    crate::api::set_ready();
    tracing::info!(api = %api_addr, http = %http_addr, ssh = %ssh_addr, domain = %cfg.domain, "slipway ready");
    // One machine-readable line on stdout, for scripts and tests that bind port 0.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "slipway ready api=http://{api_addr} http=http://{http_addr} ssh=ssh://{ssh_addr} data={}",
            cfg.data.display()
        );
    }

    let fast = wait_for_signal().await;
    tracing::info!(fast, "shutting down");
    let _ = shutdown_tx.send(true);
    let apps = platform.supervisor.apps();
    let mut all = Vec::new();
    for app in apps {
        all.extend(platform.supervisor.take_all(&app));
    }
    if fast {
        for inst in &all {
            if let Some(pid) = inst.status().pid {
                crate::runtime::signal_group(pid, libc::SIGKILL);
            }
        }
    }
    futures_util::future::join_all(all.iter().map(|i| i.stop())).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = tokio::join!(proxy_task, api_tcp, api_unix, ssh_task);
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    tracing::info!("stopped");
    Ok(())
}

/// App users must be able to traverse every directory above DIR, or none
/// of their files could be reached. Refuse to start rather than fail every
/// deploy later.
fn check_reachable(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    for ancestor in abs.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor).with_context(|| format!("reading {}", ancestor.display()))?.permissions().mode();
        if mode & 0o001 == 0 {
            anyhow::bail!(
                "apps run as their own users, who cannot reach {}: {} is mode {:o}; make it traversable (chmod o+x {}) or start with --isolation off",
                dir.display(),
                ancestor.display(),
                mode & 0o777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// TERM → graceful (false), INT → fast (true).
async fn wait_for_signal() -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the daemon could not stop cleanly; wait
        // for ctrl-c through the portable path instead.
        let _ = tokio::signal::ctrl_c().await;
        return true;
    };
    tokio::select! {
        _ = term.recv() => false,
        _ = int.recv() => true,
    }
}

/// At first start: make the admin token, store its hash, write it 0600.
fn ensure_admin_token(layout: &Layout, store: &Store) -> Result<()> {
    if layout.admin_token().exists() {
        return Ok(());
    }
    let token = auth::generate_token();
    store.add_token("admin", &auth::hash_token(&token), None)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(layout.admin_token())
        .context("writing admin-token")?;
    writeln!(f, "{token}").context("writing admin-token")?;
    Ok(())
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}
