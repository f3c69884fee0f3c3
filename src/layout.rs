//! The data directory layout (DESIGN.md, "Data directory").
//!
//! Every path slipway reads or writes under `--data` is built here, from
//! names that `names` has already validated, so no other module joins
//! user input onto a path.

use std::path::{Path, PathBuf};

use crate::names::AppName;

/// Paths under the data directory. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The default data directory: `/var/lib/slipway` for root, else
    /// `$XDG_DATA_HOME/slipway` (or `~/.local/share/slipway`).
    pub fn default_root() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/slipway");
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("slipway");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".local/share/slipway")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// DIR/tls: ACME account, certificates, the internal CA.
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("slipway.db")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin-token")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("slipway.sock")
    }
    pub fn repos(&self) -> PathBuf {
        self.root.join("repos")
    }
    pub fn repo(&self, app: &AppName) -> PathBuf {
        self.repos().join(format!("{app}.git"))
    }
    pub fn app(&self, app: &AppName) -> PathBuf {
        self.root.join("apps").join(app.as_str())
    }
    pub fn releases(&self, app: &AppName) -> PathBuf {
        self.app(app).join("releases")
    }
    pub fn release(&self, app: &AppName, version: u32) -> PathBuf {
        self.releases(app).join(format!("v{version}"))
    }
    /// `releases/vN.image`, beside the release tree `releases/vN`: the
    /// image that tree runs in (containers), so a rollback or a restarted
    /// daemon runs exactly that image.
    pub fn image_record(release_tree: &Path) -> PathBuf {
        release_tree.with_extension("image")
    }
    pub fn current(&self, app: &AppName) -> PathBuf {
        self.app(app).join("current")
    }
    pub fn app_data(&self, app: &AppName) -> PathBuf {
        self.app(app).join("data")
    }
    /// Persistent `[storage]` items of an app, seen by every release.
    pub fn storage(&self, app: &AppName) -> PathBuf {
        self.app_data(app).join("storage")
    }
    /// One `[storage]` item; `name` was validated by `manifest`.
    pub fn storage_item(&self, app: &AppName, name: &str) -> PathBuf {
        self.storage(app).join(name)
    }
    pub fn logs(&self, app: &AppName) -> PathBuf {
        self.app(app).join("logs")
    }
    /// Each release's deploy output (history track): the daemon's, as logs.
    pub fn deploy_outputs(&self, app: &AppName) -> PathBuf {
        self.logs(app).join("deploys")
    }
    pub fn deploy_output(&self, app: &AppName, version: u32) -> PathBuf {
        self.deploy_outputs(app).join(format!("v{version}.log"))
    }
    pub fn envs(&self) -> PathBuf {
        self.root.join("envs")
    }
    pub fn env(&self, key: &str) -> PathBuf {
        self.envs().join(key)
    }
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Tools slipway installs for itself (uv when the host lacks it).
    pub fn tools(&self) -> PathBuf {
        self.root.join("tools")
    }
    /// Interpreters shared by every app: root's and read-only, installed
    /// there by `uv python install --install-dir` (by a push whose pin
    /// nothing else satisfies, or by the operator) or unpacked there.
    pub fn interpreters(&self) -> PathBuf {
        self.tools().join("python")
    }
    /// Pid files of running processes, per app.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Scratch space for work in progress; removed entries never hold state.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}
