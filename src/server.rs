//! `slipway server`: binds the listeners, opens the state, restores every
//! app's live release, serves until SIGTERM (graceful: apps get their stop
//! signal and grace period) or SIGINT (fast: apps are killed), and leaves
//! no process behind either way.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
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

/// The longest a shutdown waits, in-flight deploys and every app's
/// stop_timeout included; what is still running then is killed. Below
/// systemd's default stop timeout (90 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Validated server settings (from `slipway server` flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data: PathBuf,
    pub api: SocketAddr,
    pub http: SocketAddr,
    /// TLS for the apps (certificates from ACME, the internal CA or the operator).
    pub https: Option<SocketAddr>,
    /// ACME for public app hosts (`--acme-email` set).
    pub acme: Option<crate::certs::AcmeConfig>,
    pub ssh: SocketAddr,
    pub domain: String,
    pub keep_releases: usize,
    /// Run apps as their own users when root (`--isolation off` disables).
    pub isolation: bool,
    /// Peers whose `X-Forwarded-*` headers the proxy keeps (`--trusted-proxy`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

pub async fn run(cfg: ServerConfig) -> Result<()> {
    let layout = Layout::new(&cfg.data);
    std::fs::create_dir_all(layout.root()).with_context(|| format!("creating {}", layout.root().display()))?;
    // upgrade track: what a previous daemon handed over (nothing on a cold start).
    let mut inherited = crate::upgrade::Inherited::from_env()?;
    // First of all, before anything is reaped, removed or bound: one
    // server per data dir. Held (by the open file) until the process ends;
    // after a hand-over, the same lock (one open file, shared).
    let lock = match inherited.take("lock") {
        Some(fd) => take_over_lock(std::fs::File::from(fd), layout.root())?,
        None => lock_data_dir(layout.root())?,
    };
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

    // proxy track (issue 10 #3): the descriptor budget every listener's admission gate is cut from.
    let budget = crate::listener::Budget::from_limit(crate::listener::raise_nofile_limit());
    let api_listener = tcp_listener(&mut inherited, "api", cfg.api).await?;
    let http_listener = tcp_listener(&mut inherited, "http", cfg.http).await?;
    let https_listener = match cfg.https {
        Some(addr) => Some(tcp_listener(&mut inherited, "https", addr).await?),
        None => None,
    };
    let ssh_listener = tcp_listener(&mut inherited, "ssh", cfg.ssh).await?;
    let ssh_addr = ssh_listener.local_addr().context("SSH address")?;
    let sock = layout.socket();
    let unix_listener = match inherited.take("owner") {
        // upgrade track: the same socket (and file) the previous daemon served.
        Some(fd) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true).context("owner socket")?;
            UnixListener::from_std(l).context("owner socket")?
        }
        None => {
            let _ = std::fs::remove_file(&sock);
            let l = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
            set_mode(&sock, 0o600)?;
            l
        }
    };
    // upgrade track: what a hand-over passes on to the next daemon.
    let mut handover_fds: Vec<(String, std::os::fd::RawFd)> = vec![
        ("lock".into(), lock.as_raw_fd()),
        ("api".into(), api_listener.as_raw_fd()),
        ("http".into(), http_listener.as_raw_fd()),
        ("ssh".into(), ssh_listener.as_raw_fd()),
        ("owner".into(), unix_listener.as_raw_fd()),
    ];
    if let Some(l) = &https_listener {
        handover_fds.push(("https".into(), l.as_raw_fd()));
    }
    let api_addr = api_listener.local_addr().context("API address")?;
    let http_addr = http_listener.local_addr().context("HTTP address")?;

    let exe = std::env::current_exe().context("locating the slipway binary")?;
    let base_path = std::env::var("PATH").unwrap_or_else(|_| crate::runtime::SYSTEM_PATH.into());
    let certs = match &https_listener {
        Some(l) => {
            let https_port = l.local_addr().context("HTTPS address")?.port();
            let certs_cfg = crate::certs::CertsConfig { dir: layout.tls(), acme: cfg.acme.clone(), https_port };
            Some(crate::certs::Certs::open(certs_cfg, store.clone()).context("opening DIR/tls")?)
        }
        None => None,
    };
    let platform = Arc::new(Platform::new(
        layout.clone(),
        store,
        Arc::new(Proxy::new()),
        Supervisor::new(layout.run()),
        Logs::new(layout.clone()),
        Arc::new(Builder::new(layout.clone(), base_path)),
        Repos::new(layout, exe.clone()),
        cfg.domain.clone(),
        http_addr.port(),
        cfg.keep_releases,
        api_addr,
        isolation,
    ));

    // Once, before any app process starts: where memory and CPU limits
    // can be enforced on the host.
    crate::runtime::cgroup::init(platform.layout.root());
    if isolation {
        let in_use = platform.store.min_app_uid()?;
        platform.set_uid_base(crate::runtime::uids::claim(platform.layout.root(), in_use)?);
    }
    if let Some(certs) = &certs {
        let _ = platform.certs.set(certs.clone());
        platform.proxy.set_certs(certs.clone());
    }

    // Before anything starts: stop what a previous daemon (handed over or
    // killed hard) left running, so no app ever runs twice; but its app
    // instances that are verifiably still theirs are adopted instead
    // (upgrade track), see `upgrade::adoptable` and `release::restore_all`.
    let adoptable = crate::upgrade::adoptable(&platform);
    let keep: Vec<i32> = adoptable.iter().map(|l| l.pid).collect();
    platform.supervisor.set_adoptable(adoptable);
    let reaped = platform.supervisor.reap_leftovers(&keep).await;
    // With isolation, also everything else that runs as an app's user:
    // release phases, one-offs, processes that left their group.
    for app in platform.store.call(|s| s.apps()).await? {
        if let Ok(name) = AppName::parse(&app.name) {
            platform.kill_app_processes_except(&name, &keep).await;
        }
    }
    if reaped > 0 {
        tracing::info!(count = reaped, "stopped processes left by a previous run");
    }
    // Containers whose shims died with that daemon (docker track).
    let containers = crate::runtime::container::reap_leftovers(platform.layout.root()).await;
    if containers > 0 {
        tracing::info!(count = containers, "removed containers left by a previous run");
    }
    for app in platform.store.call(|s| s.apps()).await? {
        if let Ok(name) = AppName::parse(&app.name) {
            platform.repos.ensure(&name).await?;
            platform.register_routes(&name).await;
        }
    }

    // history track: the proxy's access lines, written to the app logs.
    platform.serve_router_lines();

    // upgrade track: after a hand-over the previous daemon serves until
    // we are ready, so adopt (and restore) before serving: no request
    // finds an app without upstreams.
    if inherited.is_handover() {
        crate::release::restore_all(&platform).await;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // proxy track: the proxy's gate, and the peers whose X-Forwarded-* are believed.
    platform.proxy.set_trusted_proxies(cfg.trusted_proxies.clone());
    let proxy_gate = Arc::new(crate::listener::Gate::new("http", budget.proxy, crate::listener::per_peer(budget.proxy)));
    let proxy_task = tokio::spawn(platform.proxy.clone().serve(http_listener, proxy_gate.clone(), shutdown_rx.clone()));
    let api_gate = Arc::new(crate::listener::Gate::new("api", budget.api, crate::listener::per_peer(budget.api)));
    let api_tcp = tokio::spawn(crate::api::serve_tcp(platform.clone(), api_listener, api_gate, shutdown_rx.clone()));
    let api_unix = tokio::spawn(crate::api::serve_unix(platform.clone(), unix_listener, shutdown_rx.clone()));
    let mut https_addr = None;
    let mut tls_tasks = Vec::new();
    if let (Some(listener), Some(certs)) = (https_listener, certs) {
        https_addr = Some(listener.local_addr().context("HTTPS address")?);
        tls_tasks.push(tokio::spawn(certs.clone().maintain(shutdown_rx.clone())));
        // The server's own host serves the API over TLS, with a certificate like an app's.
        certs.set_hosts(crate::certs::API_HOSTS, vec![cfg.domain.clone()]);
        let api = crate::tls::ApiHost { host: cfg.domain.clone(), router: crate::api::tcp_router(platform.clone()) };
        let (proxy, gate, rx) = (platform.proxy.clone(), proxy_gate.clone(), shutdown_rx.clone());
        tls_tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::tls::serve(proxy, certs, listener, gate, api, rx).await {
                tracing::error!(error = %format!("{e:#}"), "https listener failed");
            }
        }));
    }
    let ssh_config = crate::ssh::config(&platform.layout)?;
    let ssh_gate = Arc::new(crate::listener::Gate::new("ssh", budget.ssh, crate::listener::per_peer(budget.ssh)));
    let ssh_task = tokio::spawn(crate::ssh::serve(platform.clone(), ssh_config, ssh_listener, ssh_gate, shutdown_rx.clone()));

    let signalled = wait_for_signal();
    // upgrade track: SIGUSR2 hands over to the binary on disk (registered
    // before the ready line, like TERM and INT).
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()).context("listening for SIGUSR2")?;
    if !inherited.is_handover() {
        crate::release::restore_all(&platform).await;
    }
    // people track: `apps info` shows the SSH remote with this port.
    crate::api::set_ssh_addr(ssh_addr);
    crate::api::set_ready();
    tracing::info!(api = %api_addr, http = %http_addr, ssh = %ssh_addr, domain = %cfg.domain, "slipway ready");
    // One machine-readable line on stdout, for scripts and tests that bind port 0.
    // Written, not printed: after a hand-over nobody may read it any more.
    {
        use std::io::Write;
        let https = https_addr.map(|a| format!(" https=https://{a}")).unwrap_or_default();
        let _ = writeln!(
            std::io::stdout(),
            "slipway ready api=http://{api_addr} http=http://{http_addr}{https} ssh=ssh://{ssh_addr} data={}",
            cfg.data.display()
        );
    }

    if inherited.is_handover() {
        // Under systemd (NotifyAccess=all) the service's main pid is now ours.
        crate::systemd::notify(&format!("MAINPID={}", std::process::id()));
    }
    inherited.signal_ready();
    crate::systemd::notify("READY=1");
    crate::systemd::spawn_watchdog();
    let mut signalled = std::pin::pin!(signalled);
    let fast = loop {
        tokio::select! {
            fast = &mut signalled => break fast,
            _ = usr2.recv() => {
                crate::systemd::notify("RELOADING=1");
                match crate::upgrade::hand_over(&platform, &exe, &handover_fds).await {
                    Ok(detached) => {
                        // The new daemon serves and supervises the apps: stop
                        // accepting, let open connections finish, leave.
                        let _ = shutdown_tx.send(true);
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                            let _ = tokio::join!(proxy_task, api_tcp, api_unix, ssh_task, futures_util::future::join_all(tls_tasks));
                        })
                        .await;
                        // The proxy's open connections (plain and TLS) finish
                        // their requests before this process may end.
                        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
                            while proxy_gate.open() > 0 {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            }
                        })
                        .await;
                        if drained.is_err() {
                            tracing::warn!(open = proxy_gate.open(), "proxy connections still open after the grace; leaving");
                        }
                        drop(detached);
                        drop(lock);
                        tracing::info!("handed over");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "hand-over failed; serving on");
                        crate::systemd::notify("READY=1");
                    }
                }
            }
        }
    };
    tracing::info!(fast, "shutting down");
    crate::systemd::notify("STOPPING=1");
    // Cancel deploys first (nothing goes live from here on), then stop
    // serving, then the apps; all within SHUTDOWN_GRACE, whatever an
    // app's stop_timeout says.
    platform.begin_shutdown();
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    // Holding every app's lock: in-flight operations have ended (a
    // cancelled deploy has rolled back) and no new one starts.
    let mut held = Vec::new();
    if let Ok(apps) = platform.store.call(|s| s.apps()).await {
        for app in apps {
            if let Ok(name) = AppName::parse(&app.name) {
                match tokio::time::timeout_at(deadline, platform.app_lock(&name).lock_owned()).await {
                    Ok(guard) => held.push(guard),
                    Err(_) => tracing::warn!(app = %name, "an operation did not end within the shutdown grace"),
                }
            }
        }
    }
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
    if tokio::time::timeout_at(deadline, futures_util::future::join_all(all.iter().map(|i| i.stop()))).await.is_err() {
        tracing::warn!(grace = SHUTDOWN_GRACE.as_secs(), "apps did not stop within the shutdown grace; killing them");
        for inst in &all {
            if let Some(pid) = inst.status().pid {
                crate::runtime::signal_group(pid, libc::SIGKILL);
            }
        }
    }
    // Leave nothing of any app behind: one-offs, release phases, escapees.
    if let Ok(apps) = platform.store.call(|s| s.apps()).await {
        for app in apps {
            if let Ok(name) = AppName::parse(&app.name) {
                platform.kill_app_processes(&name).await;
            }
        }
    }
    // Every app's cgroups went with its processes; now the server's own.
    crate::runtime::cgroup::remove_server().await;
    drop(held);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = tokio::join!(proxy_task, api_tcp, api_unix, ssh_task, futures_util::future::join_all(tls_tasks));
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    tracing::info!("stopped");
    Ok(())
}

/// Take DIR/lock (flock, exclusive) and write our pid in it. A second
/// server on the same data dir is refused with the first one's pid and
/// has changed nothing. The kernel drops the lock when the holder dies,
/// however it dies, so no stale lock survives a `kill -9`.
/// upgrade track: DIR/lock as a previous daemon handed it over: the same
/// open file, whose lock is held as long as either of us has it open.
fn take_over_lock(mut f: std::fs::File, root: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Seek, Write};
    // SAFETY: flock on a descriptor we own; on the lock's own open file it
    // succeeds, so a failure means this is not the data dir's lock.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!("the inherited lock of {} is not held", root.display());
    }
    f.set_len(0).and_then(|()| f.rewind()).and_then(|()| writeln!(f, "{}", std::process::id())).context("writing DIR/lock")?;
    Ok(f)
}

/// upgrade track: the listener a previous daemon handed over as `name`,
/// or a new one bound to `addr`.
async fn tcp_listener(inherited: &mut crate::upgrade::Inherited, name: &str, addr: SocketAddr) -> Result<TcpListener> {
    if let Some(fd) = inherited.take(name) {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).with_context(|| format!("inherited {name} listener"))?;
        return TcpListener::from_std(l).with_context(|| format!("inherited {name} listener"));
    }
    TcpListener::bind(addr).await.with_context(|| format!("binding {name} address {addr}"))
}

fn lock_data_dir(root: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; failure comes back as -1.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another slipway server".to_string() } else { format!("another slipway server (pid {holder})") };
            anyhow::bail!("{who} is already using the data dir {}; refusing to start a second one", root.display());
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    f.set_len(0).and_then(|()| f.rewind()).and_then(|()| writeln!(f, "{}", std::process::id())).with_context(|| format!("writing {}", path.display()))?;
    Ok(f)
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
/// Listen for TERM and INT from now on (registered before the ready line,
/// so a signal sent the moment a supervisor sees it is never the default
/// kill); the future says whether the stop is the fast one (INT).
fn wait_for_signal() -> impl std::future::Future<Output = bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
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
