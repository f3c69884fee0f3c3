//! cgroups for host processes: memory, CPU and process limits of a
//! process type (`[processes.X] memory`, `cpus`, `processes`), which
//! rlimits cannot express.
//!
//! Each app process instance gets a cgroup `slipway-ID/APP/TYPE.N.vR` (under the
//! root of v2, under the daemon's own cgroup in each v1 tree), ID naming
//! this server's data dir (the same hash that labels its containers), so
//! two servers on one host never share one. One-offs join `APP/_run` and
//! pipeline steps (build phase, test gate, release phase) `APP/_step`,
//! with the default limits. A type's limits hold for each of its
//! instances, as they do per container. Unset: no memory
//! or CPU cap, [`super::DEFAULT_PROCESSES`] pids; the cgroup exists anyway.
//!
//! The host is inspected once at start ([`init`]): cgroup v2 (unified,
//! controllers enabled down the tree through `cgroup.subtree_control`) or
//! v1 (one tree per controller). Without either (not root, read-only, no
//! controller), processes run as before, under their rlimits only, and
//! the daemon says so once.
//!
//! A child joins its cgroups itself, before exec, by writing "0" to
//! `cgroup.procs` descriptors the daemon opened as root before the fork:
//! app code never runs outside its cgroup. The kernel checks such a write
//! against the opener's credentials (v2, since 5.16 and in the stable
//! kernels that took CVE-2021-4197's fix) or lets a process move itself
//! (v1), so it works after std has switched to the app's user.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::manifest::Limits;

/// Which cgroup a host process joins: its app's, of its kind (a process
/// type, `run` for one-offs, `step` for pipeline steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupName {
    pub app: String,
    pub kind: String,
}

impl CgroupName {
    pub fn new(app: &str, kind: &str) -> Self {
        CgroupName { app: app.to_string(), kind: kind.to_string() }
    }

    /// One instance's own cgroup, `TYPE.INDEX.vRELEASE`: a limit holds per
    /// process, as it does per container, and a deploy's new instance
    /// never shares its budget with the old one it replaces.
    pub fn instance(app: &str, ptype: &str, index: u32, release: u32) -> Self {
        CgroupName { app: app.to_string(), kind: format!("{ptype}.{index}.v{release}") }
    }
}

/// The cgroup of an app's one-offs (`slipway run`); not a process type
/// name, which starts with a letter.
pub const ONE_OFFS: &str = "_run";
/// The cgroup of an app's pipeline steps: build phase, test gate,
/// release phase, promotion check.
pub const STEPS: &str = "_step";

/// Detect the host's cgroups for the server of data dir `data`, once;
/// logs whether memory and CPU limits are enforced.
pub fn init(data: &Path) {
    let id = format!("slipway-{}", crate::container::server_id(data));
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let host = detect(Path::new(ROOT), &id, &own);
    match &host {
        Ok(h) => {
            let missing: Vec<&str> = [("memory", h.memory), ("cpu", h.cpu), ("pids", h.pids)]
                .iter()
                .filter(|(_, on)| !on)
                .map(|(c, _)| *c)
                .collect();
            if missing.is_empty() {
                tracing::info!(version = h.version(), under = %h.describe(), "cgroups: memory, CPU and process limits are enforced on the host");
            } else {
                tracing::warn!(version = h.version(), missing = %missing.join(","), "cgroups: some limits are not enforced on the host (controller not available)");
            }
        }
        Err(reason) => {
            tracing::warn!(reason = %reason, "cgroups are not usable: memory and CPU limits are NOT enforced on the host (processes and open files still are, by rlimits)");
        }
    }
    let _ = HOST.set(host.ok());
}

/// The cgroups of this server, when the host offers usable ones.
fn host() -> Option<&'static Host> {
    HOST.get().and_then(Option::as_ref)
}

/// Create (or update) the cgroup `name` with `limits`, and make `cmd`'s
/// child join it before exec. Nothing when the host has no usable
/// cgroups. An error means the process must not start: it would run
/// unlimited.
pub fn place(cmd: &mut tokio::process::Command, name: &CgroupName, limits: &Limits) -> std::io::Result<()> {
    let Some(host) = host() else { return Ok(()) };
    let procs = host.prepare(name, limits).map_err(|e| std::io::Error::new(e.kind(), format!("cgroup {}/{}: {e}", name.app, name.kind)))?;
    // SAFETY: runs in the forked child before exec; write(2) on
    // descriptors opened before the fork is async-signal-safe, and nothing
    // is allocated.
    unsafe {
        cmd.pre_exec(move || {
            for f in &procs {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Remove the app's cgroups that are empty (all of them once its
/// processes are killed). A cgroup still holding a process stays.
pub async fn remove_app(app: &str) {
    let Some(host) = host() else { return };
    for base in host.bases() {
        let dir = base.join(app);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dir(&e.path()).await;
            }
        }
        remove_dir(&dir).await;
    }
}

/// Remove the app's cgroups that are empty now, without waiting: those
/// of stopped instances. One a SIGKILLed process still holds for a moment
/// is taken by a later prune, `remove_app` or `remove_server`.
pub fn prune_app(app: &str) {
    let Some(host) = host() else { return };
    for base in host.bases() {
        let Ok(entries) = std::fs::read_dir(base.join(app)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            // The steps' and one-offs' cgroups stay for the next one.
            if name.to_str().is_some_and(|n| !n.starts_with('_')) && e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// Remove this server's cgroup tree where it is empty (at shutdown, after
/// every app's processes were killed).
pub async fn remove_server() {
    let Some(host) = host() else { return };
    for base in host.bases() {
        let Ok(entries) = std::fs::read_dir(&base) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Some(app) = e.file_name().to_str() {
                    remove_app(app).await;
                }
            }
        }
        remove_dir(&base).await;
    }
}

/// rmdir a cgroup; a killed process leaves it a moment after its
/// SIGKILL, so EBUSY is retried for up to a second.
async fn remove_dir(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "removing a cgroup");
                return;
            }
        }
    }
    tracing::warn!(cgroup = %dir.display(), "cgroup still holds processes; left in place");
}

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period for `cpus`: quota = cpus × period.
const CPU_PERIOD_US: u64 = 100_000;

static HOST: OnceLock<Option<Host>> = OnceLock::new();

/// The usable cgroup trees of this host, with this server's base in each.
#[derive(Debug)]
struct Host {
    layout: Layout,
    memory: bool,
    cpu: bool,
    pids: bool,
}

#[derive(Debug)]
enum Layout {
    /// v2: one tree; `base` is ROOT/slipway-ID.
    Unified { base: PathBuf },
    /// v1: ROOT/CONTROLLER/OWN/slipway-ID for each usable controller, OWN
    /// the daemon's own cgroup there.
    PerController { memory: Option<PathBuf>, cpu: Option<PathBuf>, pids: Option<PathBuf> },
}

fn detect(root: &Path, id: &str, own: &str) -> Result<Host, String> {
    if root.join("cgroup.controllers").exists() {
        detect_unified(root, id)
    } else {
        detect_v1(root, id, own)
    }
}

fn detect_unified(root: &Path, id: &str) -> Result<Host, String> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).map_err(|e| format!("reading {}: {e}", root.display()))?;
    let wanted: Vec<&str> = ["memory", "cpu", "pids"].into_iter().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
    if wanted.is_empty() {
        return Err(format!("cgroup v2 at {} offers none of memory, cpu, pids", root.display()));
    }
    let base = root.join(id);
    enable_controllers(root, &wanted);
    std::fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    enable_controllers(&base, &wanted);
    // What children of the base really get: a controller the root could
    // not delegate (threaded cgroups, a container's namespace) is missing.
    let delegated = std::fs::read_to_string(base.join("cgroup.subtree_control")).map_err(|e| format!("reading {}: {e}", base.display()))?;
    let on = |c: &str| delegated.split_whitespace().any(|d| d == c);
    let host = Host { memory: on("memory"), cpu: on("cpu"), pids: on("pids"), layout: Layout::Unified { base: base.clone() } };
    if !(host.memory || host.cpu || host.pids) {
        let _ = std::fs::remove_dir(&base);
        return Err(format!("no controller could be enabled under {}", base.display()));
    }
    Ok(host)
}

/// Each controller on its own; one that fails leaves the others enabled.
fn enable_controllers(dir: &Path, controllers: &[&str]) {
    for c in controllers {
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::debug!(cgroup = %dir.display(), controller = c, error = %e, "enabling a cgroup controller");
        }
    }
}

/// `own`: the daemon's /proc/self/cgroup.
fn detect_v1(root: &Path, id: &str, own: &str) -> Result<Host, String> {
    // A controller counts when this server's base can be made in its tree
    // and has the file we write (a v1 root lacks `pids.max`, so the base
    // is what tells). The base sits below the daemon's own cgroup: v1
    // allows processes beside children, and so apps stay inside whatever
    // limits the host gave the daemon (a systemd unit, a container).
    let usable = |controller: &str, file: &str| -> Option<PathBuf> {
        let parent = root.join(controller).join(own_path(own, controller).trim_start_matches('/'));
        // Only in a tree that is there: never a directory of our own
        // making where no controller is mounted.
        if !parent.is_dir() {
            return None;
        }
        let base = parent.join(id);
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::debug!(cgroup = %base.display(), error = %e, "creating a cgroup");
                return None;
            }
        }
        if base.join(file).exists() {
            Some(base)
        } else {
            // Not a cgroup tree of that controller after all.
            let _ = std::fs::remove_dir(&base);
            None
        }
    };
    let memory = usable("memory", "memory.limit_in_bytes");
    let cpu = usable("cpu", "cpu.cfs_quota_us");
    let pids = usable("pids", "pids.max");
    if memory.is_none() && cpu.is_none() && pids.is_none() {
        return Err(format!("no writable cgroup v2 or v1 memory, cpu or pids tree under {}", root.display()));
    }
    Ok(Host { memory: memory.is_some(), cpu: cpu.is_some(), pids: pids.is_some(), layout: Layout::PerController { memory, cpu, pids } })
}

/// The daemon's own cgroup in the v1 tree of `controller`, from
/// /proc/self/cgroup (`4:memory:/path`, `1:cpu,cpuacct:/path`); "/"
/// when it is not listed.
fn own_path<'a>(proc_cgroup: &'a str, controller: &str) -> &'a str {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers.split(',').any(|c| c == controller).then_some(path)
        })
        .next()
        .unwrap_or("/")
}

impl Host {
    fn version(&self) -> u8 {
        match self.layout {
            Layout::Unified { .. } => 2,
            Layout::PerController { .. } => 1,
        }
    }

    fn describe(&self) -> String {
        self.bases().iter().map(|b| b.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// This server's base directory in every tree.
    fn bases(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::Unified { base } => vec![base.clone()],
            Layout::PerController { memory, cpu, pids } => [memory, cpu, pids].into_iter().flatten().cloned().collect(),
        }
    }

    /// Create `name` in every tree, write its limits, and open the
    /// `cgroup.procs` files the child writes to join.
    fn prepare(&self, name: &CgroupName, limits: &Limits) -> std::io::Result<Vec<File>> {
        let processes = limits.processes.unwrap_or(super::DEFAULT_PROCESSES);
        let quota = limits.cpus.map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000));
        match &self.layout {
            Layout::Unified { base } => {
                let app = base.join(&name.app);
                if !app.exists() {
                    std::fs::create_dir_all(&app)?;
                }
                // Idempotent, and cheap: children of APP need the
                // controllers delegated to APP.
                let wanted: Vec<&str> = [("memory", self.memory), ("cpu", self.cpu), ("pids", self.pids)].into_iter().filter(|c| c.1).map(|c| c.0).collect();
                enable_controllers(&app, &wanted);
                let dir = app.join(&name.kind);
                std::fs::create_dir_all(&dir)?;
                if self.memory {
                    write(&dir, "memory.max", &limits.memory.map_or("max".into(), |m| m.to_string()))?;
                    // Without this the limit would push the type into swap
                    // rather than stop it; absent without swap accounting.
                    let _ = std::fs::write(dir.join("memory.swap.max"), if limits.memory.is_some() { "0" } else { "max" });
                }
                if self.cpu {
                    write(&dir, "cpu.max", &format!("{} {CPU_PERIOD_US}", quota.map_or("max".into(), |q| q.to_string())))?;
                }
                if self.pids {
                    write(&dir, "pids.max", &processes.to_string())?;
                }
                Ok(vec![open_procs(&dir)?])
            }
            Layout::PerController { memory, cpu, pids } => {
                let mut procs = Vec::new();
                if let Some(base) = memory {
                    let dir = base.join(&name.app).join(&name.kind);
                    std::fs::create_dir_all(&dir)?;
                    // memsw (memory + swap) must stay ≥ the memory limit:
                    // lift it, set the limit, then bring it down to it.
                    let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), "-1");
                    write(&dir, "memory.limit_in_bytes", &limits.memory.map_or("-1".into(), |m| m.to_string()))?;
                    if let Some(m) = limits.memory {
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), m.to_string());
                    }
                    procs.push(open_procs(&dir)?);
                }
                if let Some(base) = cpu {
                    let dir = base.join(&name.app).join(&name.kind);
                    std::fs::create_dir_all(&dir)?;
                    write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(&dir, "cpu.cfs_quota_us", &quota.map_or("-1".into(), |q| q.to_string()))?;
                    procs.push(open_procs(&dir)?);
                }
                if let Some(base) = pids {
                    let dir = base.join(&name.app).join(&name.kind);
                    std::fs::create_dir_all(&dir)?;
                    write(&dir, "pids.max", &processes.to_string())?;
                    procs.push(open_procs(&dir)?);
                }
                Ok(procs)
            }
        }
    }
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| std::io::Error::new(e.kind(), format!("writing {value:?} to {}: {e}", dir.join(file).display())))
}

fn open_procs(dir: &Path) -> std::io::Result<File> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_found_by_controller() {
        let own = "9:name=systemd:/\n4:memory:/jobs/42\n1:cpu,cpuacct:/svc\n0::/\n";
        assert_eq!(own_path(own, "memory"), "/jobs/42");
        assert_eq!(own_path(own, "cpu"), "/svc");
        assert_eq!(own_path(own, "pids"), "/");
    }

    #[test]
    fn no_cgroup_tree_means_not_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = detect(dir.path(), "slipway-test", "").expect_err("nothing there");
        assert!(e.contains("no writable cgroup"), "{e}");
        // Nothing was created where no controller is mounted.
        assert_eq!(std::fs::read_dir(dir.path()).expect("read").count(), 0);
    }

    #[test]
    fn v1_trees_get_a_base_each_and_limits_on_prepare() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A plain directory stands in for cgroupfs: the files the kernel
        // would create are made by hand (the base's control files, as
        // the daemon's own cgroup in each tree is "/" here).
        for (c, f) in [("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us"), ("pids", "pids.max")] {
            std::fs::create_dir_all(dir.path().join(c).join("slipway-x")).expect("mkdir");
            std::fs::write(dir.path().join(c).join("slipway-x").join(f), "").expect("write");
        }
        let host = detect(dir.path(), "slipway-x", "4:memory:/\n").expect("usable");
        assert_eq!(host.version(), 1);
        for c in ["memory", "cpu", "pids"] {
            let d = dir.path().join(c).join("slipway-x/app/web");
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("write");
        }
        let limits = Limits { memory: Some(64 << 20), cpus: Some(0.2), processes: None, open_files: None };
        let procs = host.prepare(&CgroupName::new("app", "web"), &limits).expect("prepare");
        assert_eq!(procs.len(), 3);
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).expect("read");
        assert_eq!(read("memory/slipway-x/app/web/memory.limit_in_bytes"), (64u64 << 20).to_string());
        assert_eq!(read("cpu/slipway-x/app/web/cpu.cfs_quota_us"), "20000");
        assert_eq!(read("cpu/slipway-x/app/web/cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids/slipway-x/app/web/pids.max"), super::super::DEFAULT_PROCESSES.to_string());
    }
}
