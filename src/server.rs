//! `slipway server`: binds the listeners, opens the state, restores every
//! app's live release, serves until SIGTERM (graceful: apps get their stop
//! signal and grace period) or SIGINT (fast: apps are killed), and leaves
//! no process behind either way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::auth;
use crate::build::Builder;
use crate::git::Repos;
use crate::layout::Layout;
use crate::logs::Logs;
use crate::names::AppName;
use crate::platform::Platform;
use crate::proxy::Proxy;
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
    let platform = Arc::new(Platform::new(
        layout.clone(),
        store,
        Arc::new(Proxy::new()),
        Supervisor::new(layout.run()),
        Logs::new(layout.clone()),
        Arc::new(Builder::new(layout.clone(), base_path)),
        Repos::new(layout, exe),
        cfg.domain.clone(),
        http_addr.port(),
        cfg.keep_releases,
        api_addr,
        isolation,
    ));

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
