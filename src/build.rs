//! Runtime detection and dependency environments.
//!
//! A Python app gets a virtualenv under DIR/envs/KEY, where KEY hashes the
//! interpreter (real path and version) and the dependency files' content.
//! The same KEY is the same environment, so a code-only push reuses it and
//! installs nothing. An environment is built in place (virtualenvs are not
//! relocatable) under a per-key lock, and only counts once its completion
//! marker is written; a failed build is removed whole.
//!
//! Interpreters come from the system (/usr/bin, /usr/local/bin, the
//! daemon's PATH) or from DIR/tools/python, the shared home of managed
//! interpreters: root's, read-only, and filled by `uv python install` when
//! a pin matches nothing apps can run (once per version, under a lock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::layout::Layout;
use crate::progress::Progress;
use crate::runtime::{self, AppUser, ProcessCommand};

const MARKER: &str = ".slipway-complete";
const INSTALL_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// One `uv python install`: a download of some 30 MB and an unpack.
const PYTHON_INSTALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Under the builder's home (the app's own build cache dir, DIR/cache/APP,
/// writable by that app alone): wheels uv built from sdists, fed back to
/// that app's later builds only (`--find-links`), never to another app's.
const WHEELHOUSE: &str = "wheels";

/// How an app's dependencies are declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonDeps {
    /// `requirements.txt`
    Requirements,
    /// `pyproject.toml` with `uv.lock`: installed exactly as locked.
    UvLock,
    /// `pyproject.toml` alone: its declared dependencies.
    Pyproject,
}

#[derive(Debug, Clone)]
pub enum Runtime {
    Python { deps: Option<PythonDeps>, interpreter: Interpreter },
    /// No runtime detected: the Procfile's commands run as they are.
    Generic,
}

#[derive(Debug, Clone)]
pub struct Interpreter {
    /// The interpreter's real executable (not a pyenv shim).
    pub path: PathBuf,
    pub version: String,
}

/// A ready dependency environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub key: String,
    pub dir: PathBuf,
}

impl Environment {
    /// Variables that put the environment first: `PATH`, `VIRTUAL_ENV`.
    pub fn vars(&self, base_path: &str) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), format!("{}:{base_path}", self.dir.join("bin").display())),
            ("VIRTUAL_ENV".into(), self.dir.display().to_string()),
        ]
    }
}

/// Holds an environment's key: while it lives, garbage collection leaves
/// the environment alone. A deploy keeps it until its release records the
/// key, so a concurrent collection cannot remove what it just built.
pub struct EnvLease(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

pub struct Builder {
    layout: Layout,
    /// The daemon's PATH, searched for interpreters and given to builds.
    base_path: String,
    uv_cache: PathBuf,
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One per pinned version being installed into DIR/tools/python: a
    /// second push asking for it waits, then finds the first one's.
    python_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Managed installs found root's and read-only: walking one (some
    /// 9,000 entries, tens of ms) on every push would tax each code-only
    /// redeploy, and only root can loosen a root-owned tree after the check.
    read_only_installs: Mutex<std::collections::HashSet<PathBuf>>,
    uv: tokio::sync::OnceCell<Option<PathBuf>>,
}

impl Builder {
    pub fn new(layout: Layout, base_path: String) -> Builder {
        // An operator (or the test suite) may share one download cache
        // across data directories.
        let uv_cache = std::env::var_os("UV_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| layout.cache().join("uv"));
        Builder {
            layout,
            base_path,
            uv_cache,
            key_locks: Mutex::default(),
            python_locks: Mutex::default(),
            read_only_installs: Mutex::default(),
            uv: tokio::sync::OnceCell::new(),
        }
    }

    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// Detect the runtime of a checked-out release.
    pub async fn detect(&self, dir: &Path, progress: &Progress) -> Result<Runtime> {
        let has = |f: &str| dir.join(f).is_file();
        let deps = if has("pyproject.toml") && has("uv.lock") {
            Some(PythonDeps::UvLock)
        } else if has("requirements.txt") {
            Some(PythonDeps::Requirements)
        } else if has("pyproject.toml") {
            Some(PythonDeps::Pyproject)
        } else {
            None
        };
        let pin = python_pin(dir)?;
        if deps.is_none() && pin.is_none() {
            return Ok(Runtime::Generic);
        }
        let interpreter = self.find_interpreter(pin.as_deref(), progress).await?;
        Ok(Runtime::Python { deps, interpreter })
    }

    /// The interpreter for a pin such as `3.11` or `3.11.7`; with no pin,
    /// a `python3`. A pin nothing here satisfies is installed with uv into
    /// DIR/tools/python; when that fails too, the push is refused with what
    /// was tried and what the operator can do.
    async fn find_interpreter(&self, pin: Option<&str>, progress: &Progress) -> Result<Interpreter> {
        let missing = match self.search_interpreters(pin).await {
            Ok(found) => return Ok(found),
            Err(missing) => missing,
        };
        let Some(pin) = pin else { bail!(missing.refusal("3", None, &self.layout.interpreters())) };
        let tried = match self.install_python(pin, progress).await {
            Ok(()) => match self.search_interpreters(Some(pin)).await {
                Ok(found) => return Ok(found),
                Err(after) => {
                    return Err(anyhow!(after.refusal(
                        pin,
                        Some("uv installed it, but no interpreter apps can run matched the pin"),
                        &self.layout.interpreters()
                    )))
                }
            },
            Err(why) => why,
        };
        bail!(missing.refusal(pin, Some(&tried), &self.layout.interpreters()))
    }

    /// Look for an interpreter apps can run that satisfies `pin`.
    ///
    /// The distribution's interpreter comes first: system app servers that
    /// embed Python (Debian's uWSGI plugin, mod_wsgi) are built against its
    /// libpython, and a virtualenv from another build of the same minor
    /// version loads in them only partly (its `ssl` fails on a missing
    /// symbol while the app still answers). The shared managed ones
    /// (DIR/tools/python) come next, then `PATH` (pyenv and the like), so
    /// an exact pin such as `3.11.7` still finds it.
    async fn search_interpreters(&self, pin: Option<&str>) -> std::result::Result<Interpreter, MissingInterpreter> {
        let name = match pin {
            None => "python3".to_string(),
            Some(v) => format!("python{}", minor(v)),
        };
        let managed = managed_installs(&self.layout.interpreters());
        let mut candidates: Vec<String> = ["/usr/bin", "/usr/local/bin"].iter().map(|d| format!("{d}/{name}")).collect();
        candidates.extend(managed.iter().map(|d| d.join("bin").join(&name).display().to_string()));
        candidates.push(name.clone());
        // What else apps could use, offered when the pin matches nothing.
        candidates.extend(managed.iter().map(|d| d.join("bin/python3").display().to_string()));
        candidates.push("python3".into());
        let mut missing = MissingInterpreter::default();
        let mut probed: Vec<PathBuf> = Vec::new();
        for candidate in candidates {
            if candidate.starts_with('/') && !Path::new(&candidate).exists() {
                continue;
            }
            let Some(found) = self.probe_interpreter(&candidate).await else { continue };
            let real = std::fs::canonicalize(&found.path).unwrap_or_else(|_| found.path.clone());
            if probed.contains(&real) {
                continue;
            }
            probed.push(real.clone());
            // As root, apps run as their own users: an interpreter they
            // cannot reach (pyenv under /root), or one they (or anyone but
            // root) could change, is no interpreter for them.
            let usable = runnable_by_app_users(&found.path).and_then(|()| match managed.iter().find(|d| real.starts_with(d)) {
                Some(install) => self.read_only_once(install),
                None => Ok(()),
            });
            if let Err(why) = usable {
                let note = format!("{} at {} ({why})", found.version, found.path.display());
                if !missing.unusable.contains(&note) {
                    missing.unusable.push(note);
                }
                continue;
            }
            if pin.is_none_or(|p| version_matches(p, &found.version)) {
                return Ok(found);
            }
            if !missing.offered.contains(&found.version) {
                missing.offered.push(found.version);
            }
        }
        Err(missing)
    }

    /// [`read_only_for_apps`], walked once per install while it passes.
    fn read_only_once(&self, install: &Path) -> std::result::Result<(), String> {
        let known = || self.read_only_installs.lock().unwrap_or_else(|e| e.into_inner());
        if known().contains(install) {
            return Ok(());
        }
        read_only_for_apps(install)?;
        known().insert(install.to_path_buf());
        Ok(())
    }

    /// `uv python install PIN` into DIR/tools/python, as root, with
    /// downloads allowed for this one command (builds never download an
    /// interpreter). uv's download source is the daemon's own settings:
    /// UV_PYTHON_INSTALL_MIRROR, UV_PYTHON_DOWNLOADS_JSON_URL. Pushes
    /// asking for the same pin wait for each other; the second finds the
    /// first one's interpreter. `Err` is what was tried and uv's reason.
    async fn install_python(&self, pin: &str, progress: &Progress) -> std::result::Result<(), String> {
        let tried = format!("`uv python install {pin}` into {}", self.layout.interpreters().display());
        let Some(uv) = self.uv(progress).await else {
            return Err(format!("could not try `uv python install {pin}`: uv could not be found or installed on this server"));
        };
        let lock = {
            let mut locks = self.python_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(pin.to_string()).or_default().clone()
        };
        let _installing = lock.lock().await;
        if self.search_interpreters(Some(pin)).await.is_ok() {
            return Ok(());
        }
        progress.info(&format!("installing python {pin} with uv (once, shared)"));
        let dir = self.layout.interpreters();
        if let Err(e) = create_shared_dir(&dir) {
            return Err(format!("tried {tried}: {e}"));
        }
        let mut cmd = Command::new(&uv);
        cmd.args(["python", "install", pin, "--no-bin", "--no-progress", "--install-dir"])
            .arg(&dir)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", &self.base_path)
            .env("HOME", self.layout.cache())
            .envs(host_package_settings())
            .env("UV_CACHE_DIR", &self.uv_cache)
            // Only what this command was asked for, whatever the daemon's
            // environment says about downloads elsewhere.
            .env("UV_PYTHON_DOWNLOADS", "manual")
            .env("LANG", "C.UTF-8")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(PYTHON_INSTALL_TIMEOUT, cmd.output()).await;
        // Whatever uv left (an install, a lock file, a half-unpacked temp
        // dir) becomes root's and read-only before anything runs it.
        let shared = share_read_only(&dir).await;
        let out = match out {
            Err(_) => return Err(format!("tried {tried}: uv did not finish within {} s", PYTHON_INSTALL_TIMEOUT.as_secs())),
            Ok(Err(e)) => return Err(format!("tried {tried}: could not run uv: {e}")),
            Ok(Ok(out)) => out,
        };
        if !out.status.success() {
            return Err(format!("tried {tried}: {}", uv_reason(&String::from_utf8_lossy(&out.stderr))));
        }
        shared.map_err(|e| format!("tried {tried}: it installed, but {e:#}"))?;
        progress.info(&format!("python {pin} installed in {}", dir.display()));
        Ok(())
    }

    async fn probe_interpreter(&self, name: &str) -> Option<Interpreter> {
        let out = Command::new(name)
            .args(["-c", "import sys; print(sys.executable); print('%d.%d.%d' % sys.version_info[:3])"])
            .env("PATH", &self.base_path)
            .output()
            .await
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let path = PathBuf::from(lines.next()?);
        let version = lines.next()?.to_string();
        Some(Interpreter { path, version })
    }

    /// Make sure the environment for this release exists; reuse it when
    /// the key is known. With `as_user` (isolation), the build runs as the
    /// app's user with the app's own cache dir, into an environment keyed
    /// by that user too: apps never share a writable environment or cache.
    pub async fn prepare(
        &self,
        dir: &Path,
        rt: &Runtime,
        as_user: Option<(AppUser, PathBuf)>,
        progress: &Progress,
    ) -> Result<Option<(Environment, EnvLease)>> {
        let Runtime::Python { deps, interpreter } = rt else { return Ok(None) };
        let key = env_key(dir, *deps, interpreter, as_user.as_ref().map(|(u, _)| u.uid))?;
        let env = Environment { key: key.clone(), dir: self.layout.env(&key) };

        let lock = {
            let mut locks = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        if env.dir.join(MARKER).is_file() {
            progress.info(&format!("dependencies unchanged: reusing environment {}", short(&key)));
            crate::tally::environment(true);
            if let Some((user, _)) = &as_user {
                open_to(&env, *user)?;
            }
            return Ok(Some((env, EnvLease(guard))));
        }
        progress.info(&format!("building environment {} (python {})", short(&key), interpreter.version));
        crate::tally::environment(false);
        // A directory without the marker is a build that died midway.
        let _ = tokio::fs::remove_dir_all(&env.dir).await;
        tokio::fs::create_dir_all(self.layout.envs()).await.context("creating envs directory")?;
        if let Some((user, _)) = &as_user {
            tokio::fs::create_dir_all(&env.dir).await.context("creating the environment directory")?;
            // Closed while it is built; `open_to` names who may enter it after.
            chown(&env.dir, *user, 0o700)?;
        }
        let built = match self.build(dir, *deps, interpreter, &env, as_user.as_ref(), progress).await {
            // Built by the app's user: take the tree back before trusting
            // anything in it. Root-owned and read-only, it can neither be
            // changed by the app later nor trick root (a planted symlink)
            // when the marker is written.
            Ok(()) if as_user.is_some() => seal(&env.dir).await,
            other => other,
        };
        match built {
            Ok(()) => {
                write_marker(&env.dir.join(MARKER), &format!("python {}\n", interpreter.version))
                    .context("marking environment complete")?;
                if let Some((user, _)) = &as_user {
                    open_to(&env, *user)?;
                }
                Ok(Some((env, EnvLease(guard))))
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&env.dir).await;
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        dir: &Path,
        deps: Option<PythonDeps>,
        interp: &Interpreter,
        env: &Environment,
        as_user: Option<&(AppUser, PathBuf)>,
        progress: &Progress,
    ) -> Result<()> {
        let envdir = env.dir.display().to_string();
        let python = interp.path.display().to_string();
        let (home, uv_cache, user) = match as_user {
            Some((u, cache)) => (cache.clone(), cache.join("uv"), Some(*u)),
            None => (self.layout.cache(), self.uv_cache.clone(), None),
        };
        let run = |line: String, extra: Vec<(String, String)>| {
            let mut vars = vec![
                ("PATH".to_string(), self.base_path.clone()),
                ("HOME".to_string(), home.display().to_string()),
                ("UV_CACHE_DIR".to_string(), uv_cache.display().to_string()),
                ("UV_PYTHON_DOWNLOADS".to_string(), "never".to_string()),
                ("UV_NO_PROGRESS".to_string(), "1".to_string()),
                ("PIP_CACHE_DIR".to_string(), home.join("pip").display().to_string()),
                ("PIP_DISABLE_PIP_VERSION_CHECK".to_string(), "1".to_string()),
                ("LANG".to_string(), "C.UTF-8".to_string()),
            ];
            vars.extend(host_package_settings());
            vars.extend(extra);
            ProcessCommand { command: line, cwd: dir.to_path_buf(), env: vars, user, limits: Default::default(), container: None, cgroup: None }
        };
        let q = shell_quote;
        if let Some(uv) = self.uv(progress).await {
            let uv = q(&uv.display().to_string());
            progress.info("installing with uv");
            runtime::run_to_end(&run(format!("{uv} venv --quiet --python {} {}", q(&python), q(&envdir)), vec![]), progress, INSTALL_TIMEOUT)
                .await
                .context("creating the virtualenv")?;
            // Wheels built from sdists are offered back to uv from the
            // builder's own wheelhouse (WHEELHOUSE): uv's cache alone does
            // not keep them when the index's responses carry no caching
            // headers (a proxy strips them), and uWSGI is then compiled
            // again on every dependency change.
            let wheels = q(&home.join(WHEELHOUSE).display().to_string());
            let install = match deps {
                None => return Ok(()),
                Some(PythonDeps::Requirements) => {
                    format!("mkdir -p {wheels} && {uv} pip install --find-links {wheels} --python {} -r requirements.txt", q(&format!("{envdir}/bin/python")))
                }
                Some(PythonDeps::Pyproject) => {
                    format!("mkdir -p {wheels} && {uv} pip install --find-links {wheels} --python {} -r pyproject.toml", q(&format!("{envdir}/bin/python")))
                }
                Some(PythonDeps::UvLock) => format!("{uv} sync --frozen --no-install-project --no-dev --python {}", q(&python)),
            };
            let extra = vec![("UV_PROJECT_ENVIRONMENT".to_string(), envdir.clone())];
            runtime::run_to_end(&run(install, extra), progress, INSTALL_TIMEOUT)
                .await
                .context("installing dependencies")?;
            if deps != Some(PythonDeps::UvLock) {
                // Run as the builder (the app's user), never as root: the
                // cache is the app's, and root must not follow what it
                // planted there. A failure only costs a later rebuild.
                let harvest = format!(
                    "find {cache}/sdists-v* -type f -name '*.whl' -exec cp -p {{}} {wheels}/ ';' 2>/dev/null; true",
                    cache = q(&uv_cache.display().to_string())
                );
                if let Err(e) = runtime::run_to_end(&run(harvest, vec![]), &Progress::default(), INSTALL_TIMEOUT).await {
                    tracing::warn!(error = %format!("{e:#}"), "keeping built wheels");
                }
            }
            return Ok(());
        }
        if deps == Some(PythonDeps::UvLock) {
            bail!("uv.lock needs uv, which could not be found or installed on this server");
        }
        progress.info("uv unavailable: installing with pip");
        runtime::run_to_end(&run(format!("{} -m venv {}", q(&python), q(&envdir)), vec![]), progress, INSTALL_TIMEOUT)
            .await
            .context("creating the virtualenv")?;
        let file = match deps {
            None => return Ok(()),
            Some(PythonDeps::Requirements) => "-r requirements.txt",
            Some(_) => ".",
        };
        runtime::run_to_end(&run(format!("{} -m pip install {file}", q(&format!("{envdir}/bin/python"))), vec![]), progress, INSTALL_TIMEOUT)
            .await
            .context("installing dependencies")?;
        Ok(())
    }

    /// uv from the server's PATH, from the interpreter's `uv` package, or
    /// installed once from PyPI into DIR/tools; `None` means use pip. uv is
    /// one static binary: a found one is linked (or copied) into DIR/tools,
    /// where app users can run it even when it lives under /root.
    async fn uv(&self, progress: &Progress) -> Option<PathBuf> {
        self.uv
            .get_or_init(|| async {
                let found = self.find_uv().await;
                if let Some(found) = found {
                    let bin = self.layout.tools().join("bin/uv");
                    if bin.is_file() {
                        return Some(bin);
                    }
                    let _ = std::fs::create_dir_all(self.layout.tools().join("bin"));
                    if std::fs::hard_link(&found, &bin).is_ok() || std::fs::copy(&found, &bin).is_ok() {
                        use std::os::unix::fs::PermissionsExt;
                        let _ = std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755));
                        return Some(bin);
                    }
                    return Some(found);
                }
                self.install_uv(progress).await
            })
            .await
            .clone()
    }

    async fn find_uv(&self) -> Option<PathBuf> {
        if let Some(p) = which("uv", &self.base_path) {
            // A pyenv shim is a script that needs pyenv: resolve it.
            if !p.to_string_lossy().contains("/shims/") {
                return Some(p);
            }
        }
        let out = Command::new("python3")
            .args(["-c", "import uv; print(uv.find_uv_bin())"])
            .env("PATH", &self.base_path)
            .output()
            .await
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        (out.status.success() && p.is_file()).then_some(p)
    }

    async fn install_uv(&self, progress: &Progress) -> Option<PathBuf> {
        {
            {
                let tools = self.layout.tools().join("uv");
                let bin = tools.join("bin/uv");
                if bin.is_file() {
                    return Some(bin);
                }
                progress.info("uv not found: installing it from PyPI (once)");
                let line = format!(
                    "python3 -m venv {t} && {t}/bin/pip install --quiet uv",
                    t = shell_quote(&tools.display().to_string())
                );
                let cmd = ProcessCommand {
                    command: line,
                    cwd: self.layout.root().to_path_buf(),
                    env: vec![("PATH".into(), self.base_path.clone()), ("HOME".into(), self.layout.cache().display().to_string())],
                    user: None,
                    limits: Default::default(),
                    container: None,
                    cgroup: None,
                };
                match runtime::run_to_end(&cmd, progress, INSTALL_TIMEOUT).await {
                    Ok(()) if bin.is_file() => Some(bin),
                    _ => {
                        let _ = tokio::fs::remove_dir_all(&tools).await;
                        None
                    }
                }
            }
        }
    }

    /// Remove environments that no kept release uses.
    pub fn collect(&self, in_use: &[String]) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(self.layout.envs()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e).context("listing environments"),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // Busy keys are being built right now: leave them.
            let busy = self
                .key_locks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                .is_some_and(|l| l.try_lock().is_err());
            if !in_use.contains(&name) && !busy {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing environment {name}"))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// The host's settings for reaching package indexes: proxies, CA bundles,
/// pip and uv configuration. Builds run with a cleared environment, but an
/// operator who configured a mirror or a corporate CA for the machine
/// expects slipway's installs to use it too. Only these names pass.
fn host_package_settings() -> Vec<(String, String)> {
    const EXACT: [&str; 8] = [
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "UV_INDEX_URL",
    ];
    std::env::vars()
        .filter(|(k, _)| {
            let upper = k.to_ascii_uppercase();
            EXACT.contains(&upper.as_str())
                || (k.starts_with("PIP_") && k != "PIP_CACHE_DIR")
                || (k.starts_with("UV_") && k != "UV_CACHE_DIR" && k != "UV_PROJECT_ENVIRONMENT")
        })
        .collect()
}

/// Why a pin found nothing apps can run: the versions they could use, and
/// the interpreters found that they cannot.
#[derive(Debug, Default)]
struct MissingInterpreter {
    offered: Vec<String>,
    unusable: Vec<String>,
}

impl MissingInterpreter {
    /// The refusal: what is there, what was tried, and what the operator
    /// can do, with commands that work as written.
    fn refusal(&self, pin: &str, tried: Option<&str>, shared: &Path) -> String {
        let mut msg = match self.offered.is_empty() {
            true => format!("python {pin} is not available on this server (no python3 that apps can run)"),
            false => format!("python {pin} is not available on this server (apps can use {}: pin one of those)", self.offered.join(", ")),
        };
        if !self.unusable.is_empty() {
            msg.push_str(&format!("; not usable by apps: {}", self.unusable.join(", ")));
        }
        if let Some(tried) = tried {
            msg.push_str(&format!("; {tried}"));
        }
        let dir = shared.display();
        let minor = minor(pin);
        // Root-owned and read-only, or slipway will not offer it to apps.
        let seal = if is_root() {
            format!("chown -R root:root {dir} && chmod -R a+rX,go-w {dir}")
        } else {
            format!("chmod -R a+rX,go-w {dir}")
        };
        msg.push_str(&format!(
            "; the operator can provide python {pin}, then push again, by one of: \
             the distribution's package (/usr/bin/python{minor}); \
             `uv python install {pin} --no-bin --install-dir {dir} && {seal}` where uv can download it \
             (or set UV_PYTHON_INSTALL_MIRROR, or UV_PYTHON_DOWNLOADS_JSON_URL naming a JSON list of local builds, \
             in slipway's environment and pushes install it by themselves); \
             or unpacking a python-build-standalone install_only archive: \
             `mkdir -p {dir}/cpython-{pin} && tar -xzf ARCHIVE --strip-components=1 -C {dir}/cpython-{pin} && {seal}`"
        ));
        msg
    }
}

/// The installs in the shared interpreter directory: real directories
/// with a `bin`, newest name first; uv's hidden state (`.lock`, `.temp`)
/// and its minor-version links (`cpython-3.12-…` → `cpython-3.12.1-…`)
/// are left out, so an environment names the install it was built on.
fn managed_installs(shared: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(shared) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.join("bin").is_dir())
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Is a managed install root's and closed to writes by anyone else? An
/// interpreter apps run must not be one an app (or another user) could
/// change under the others. Only checked when the daemon is root.
fn read_only_for_apps(install: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        return Ok(());
    }
    let check = |p: &Path| -> std::result::Result<std::fs::Metadata, String> {
        let m = std::fs::symlink_metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        if !m.file_type().is_symlink() && (m.uid() != 0 || m.mode() & 0o022 != 0) {
            return Err(format!("{} is not root's or is writable by others", p.display()));
        }
        Ok(m)
    };
    if let Some(shared) = install.parent() {
        check(shared)?;
    }
    let mut stack = vec![install.to_path_buf()];
    while let Some(p) = stack.pop() {
        if check(&p)?.is_dir() {
            let entries = std::fs::read_dir(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

/// Create the shared interpreter directory (and DIR/tools) open for
/// reading by app users.
fn create_shared_dir(dir: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for d in [dir.parent().unwrap_or(dir), dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {}: {e}", d.display()))?;
    }
    Ok(())
}

/// Make the shared interpreter directory root's (when the daemon is root)
/// and readable, never writable, by everyone else.
async fn share_read_only(dir: &Path) -> Result<()> {
    if is_root() {
        change_tree("chown", "chown", &["-R", "-P", "-h", "0:0"], dir).await?;
    }
    change_tree("chmod", "chmod", &["-R", "a+rX,go-w,ug-s"], dir).await
}

/// uv's reason in one line: its `error:` and its last `cause:`.
fn uv_reason(stderr: &str) -> String {
    let error = stderr.lines().find_map(|l| l.trim().strip_prefix("error: ")).map(str::trim);
    let cause = stderr.lines().filter_map(|l| l.trim().strip_prefix("cause: ")).next_back().map(str::trim);
    let line = match (error, cause) {
        (Some(e), Some(c)) => format!("uv says: {e}: {c}"),
        (Some(e), None) => format!("uv says: {e}"),
        _ => match stderr.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            Some(l) => format!("uv says: {l}"),
            None => "uv failed without saying why".to_string(),
        },
    };
    line.chars().take(400).collect()
}

/// `3.12.1` → `3.12`; `3` → `3`.
fn minor(pin: &str) -> String {
    pin.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Can an app's user (not the owner, not in root's group) run `path`?
/// Only when the daemon is root: otherwise apps run as the daemon's user.
fn runnable_by_app_users(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return Ok(());
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    for dir in real.ancestors().skip(1) {
        if mode(dir) & 0o001 == 0 {
            return Err(format!("app users cannot enter {}", dir.display()));
        }
    }
    if mode(&real) & 0o001 == 0 {
        return Err("app users cannot execute it".into());
    }
    Ok(())
}

/// The pin from `.python-version` or `runtime.txt` (`python-3.11.7`).
pub(crate) fn python_pin(dir: &Path) -> Result<Option<String>> {
    let read = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() && m.len() < 4096 => {
                Ok(Some(std::fs::read_to_string(&p).with_context(|| format!("reading {name}"))?))
            }
            Ok(_) => Err(anyhow!("{name} must be a small regular file")),
            Err(_) => Ok(None),
        }
    };
    let raw = if let Some(t) = read(".python-version")? {
        t.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string)
    } else if let Some(t) = read("runtime.txt")? {
        let t = t.trim();
        Some(t.strip_prefix("python-").unwrap_or(t).to_string())
    } else {
        None
    };
    let Some(v) = raw else { return Ok(None) };
    let v = v.strip_prefix("python").unwrap_or(&v).trim_start_matches('-').to_string();
    let valid = !v.is_empty()
        && v.len() < 16
        && v.split('.').count() <= 3
        && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()));
    if !valid {
        bail!("unsupported python version pin {:?}: use a version like 3.11 or 3.11.7", v.chars().take(20).collect::<String>());
    }
    Ok(Some(v))
}

/// `3.11` matches 3.11.x; `3.11.7` only 3.11.7.
pub(crate) fn version_matches(pin: &str, actual: &str) -> bool {
    let a: Vec<&str> = actual.split('.').collect();
    pin.split('.').enumerate().all(|(i, p)| a.get(i) == Some(&p))
}

fn env_key(dir: &Path, deps: Option<PythonDeps>, interp: &Interpreter, uid: Option<u32>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"python\0");
    if let Some(uid) = uid {
        h.update(format!("uid {uid}\0").as_bytes());
    }
    h.update(interp.path.as_os_str().as_encoded_bytes());
    h.update(b"\0");
    h.update(interp.version.as_bytes());
    let roots: &[&str] = match deps {
        None => &[],
        Some(PythonDeps::Requirements) => &["requirements.txt"],
        Some(PythonDeps::UvLock) => &["pyproject.toml", "uv.lock"],
        Some(PythonDeps::Pyproject) => &["pyproject.toml"],
    };
    let mut inputs = crate::depfiles::DepInputs::default();
    for f in roots {
        inputs.add_root(dir, f)?;
    }
    inputs.hash_into(dir, &mut h)?;
    Ok(hex::encode(&h.finalize()[..16]))
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn which(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Run `chown`/`chmod` with `args` on `path`; `what` names the step in
/// the error, with the tool's own complaint. (coreutils rather than a
/// walk of our own: `-R -P -h` never follows a symlink a build planted.)
async fn change_tree(what: &str, tool: &str, args: &[&str], path: &Path) -> Result<()> {
    let out = Command::new(tool).args(args).arg(path).output().await.with_context(|| format!("{what} {}", path.display()))?;
    if !out.status.success() {
        bail!("{what} {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Make a tree root's and read-only for everyone else, without following
/// any symlink inside it.
async fn seal(dir: &Path) -> Result<()> {
    change_tree("sealing", "chown", &["-R", "-P", "-h", "0:0"], dir).await?;
    change_tree("sealing", "chmod", &["-R", "go-w"], dir).await
}

/// The build phase of a release (DESIGN.md `[build]`): the configured
/// command; else, for a Django app (`manage.py` in the tree, Django in its
/// environment), `collectstatic` as Heroku's Python support runs it,
/// unless the config sets `DISABLE_COLLECTSTATIC=1`. `None`: no build.
pub fn build_phase_command(
    tree: &Path,
    env: Option<&Environment>,
    configured: Option<&str>,
    config: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    if let Some(cmd) = configured {
        return Some(cmd.to_string());
    }
    if config.get("DISABLE_COLLECTSTATIC").is_some_and(|v| v == "1") {
        return None;
    }
    let manage = std::fs::symlink_metadata(tree.join("manage.py")).is_ok_and(|m| m.is_file());
    if !manage || !env.is_some_and(has_django) {
        return None;
    }
    // Only projects that use django.contrib.staticfiles have the command;
    // `help` tells without running it, as Heroku's buildpack checks.
    Some(AUTO_COLLECTSTATIC.to_string())
}

/// What runs for a Django app without a `[build] command`.
pub const AUTO_COLLECTSTATIC: &str = "if python manage.py help collectstatic >/dev/null 2>&1; \
then python manage.py collectstatic --noinput; \
else echo 'collectstatic is not available (django.contrib.staticfiles not installed): skipped'; fi";

/// Is Django installed in the environment? (lib/pythonX.Y/site-packages/django)
fn has_django(env: &Environment) -> bool {
    let Ok(libs) = std::fs::read_dir(env.dir.join("lib")) else { return false };
    libs.flatten().any(|l| l.path().join("site-packages/django/__init__.py").is_file())
}

/// Hand a new release tree to the app's user for its build phase. The
/// tree is not live yet and nothing else runs in it.
pub async fn open_tree(tree: &Path, user: AppUser) -> Result<()> {
    change_tree("opening the release tree for its build", "chown", &["-R", "-P", "-h", &format!("{}:{}", user.uid, user.gid)], tree).await
}

/// Take a built release tree back: the daemon's, not writable by the app,
/// with no set-id bit, never following a symlink the build left in it.
pub async fn seal_tree(tree: &Path, user: Option<AppUser>) -> Result<()> {
    if user.is_some() {
        seal(tree).await?;
    }
    change_tree("sealing the release tree", "chmod", &["-R", "go-w,ug-s"], tree).await
}

/// Create the completion marker; never through a symlink, never over an
/// existing file.
fn write_marker(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).context("writing the marker")
}

/// Give `path` to the app's user with `mode`.
/// Let `user` use a sealed environment, and no other app but those
/// already let in (issue 10: an environment's packages, and anything a
/// build left in it, are its apps' own). More than one app enters one
/// environment when a promotion runs staging's build as the live app.
pub fn open_to(env: &Environment, user: AppUser) -> Result<()> {
    crate::acl::grant(&env.dir, user.uid).with_context(|| format!("letting uid {} use environment {}", user.uid, short(&env.key)))
}

pub fn chown(path: &Path, user: AppUser, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))
}

/// Quote for `sh -c`: single quotes, with embedded ones closed and escaped.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_pins() {
        assert!(version_matches("3.11", "3.11.7"));
        assert!(version_matches("3.11.7", "3.11.7"));
        assert!(!version_matches("3.11.8", "3.11.7"));
        assert!(!version_matches("3.1", "3.11.7"));
        assert!(!version_matches("2", "3.11.7"));
    }

    #[test]
    fn uv_reason_is_its_error_and_last_cause() {
        let offline = "error: Failed to install cpython-3.13.18-linux-x86_64-gnu\n  cause: Request failed after 3 retries\n  cause: dns error\n  cause: failed to lookup address information: Name or service not known\n";
        assert_eq!(
            uv_reason(offline),
            "uv says: Failed to install cpython-3.13.18-linux-x86_64-gnu: failed to lookup address information: Name or service not known"
        );
        assert_eq!(uv_reason("error: No download found for request: cpython-3.99-linux-x86_64-gnu\n"), "uv says: No download found for request: cpython-3.99-linux-x86_64-gnu");
        assert_eq!(uv_reason(""), "uv failed without saying why");
    }

    #[test]
    fn refusal_gives_commands_that_work_as_written() {
        let missing = MissingInterpreter { offered: vec!["3.11.2".into()], unusable: vec![] };
        let msg = missing.refusal("3.12", Some("tried `uv python install 3.12` into /d/tools/python: uv says: offline"), Path::new("/d/tools/python"));
        assert!(msg.starts_with("python 3.12 is not available on this server (apps can use 3.11.2: pin one of those); tried `uv python install 3.12`"), "{msg}");
        assert!(msg.contains("`uv python install 3.12 --no-bin --install-dir /d/tools/python && "), "{msg}");
        assert!(msg.contains("mkdir -p /d/tools/python/cpython-3.12 && tar -xzf ARCHIVE --strip-components=1 -C /d/tools/python/cpython-3.12"), "{msg}");
        assert!(!msg.contains('*'), "no globs: {msg}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
