//! Persistent state in SQLite (bundled, WAL): apps, releases, config,
//! scale, domains, tokens, keys and the event log.
//!
//! Architecture invariant: this is the only module that runs SQL. Callers
//! get plain structs back. Every method is synchronous and short; async
//! callers go through [`Store::call`], which runs it on the blocking pool.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::names::AppName;

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct App {
    pub name: String,
    pub created_at: String,
}

/// Where an app's processes run (swarm track, issue 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// This host: the supervisor's processes and containers.
    Local,
    /// Services of the swarm the engine belongs to.
    Swarm,
}

impl Scheduler {
    pub fn parse(s: &str) -> Option<Scheduler> {
        match s {
            "local" => Some(Scheduler::Local),
            "swarm" => Some(Scheduler::Swarm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Local => "local",
            Scheduler::Swarm => "swarm",
        }
    }
}

/// A switch recorded before it happens, until the repo agrees with it
/// (integrity track, issue 10 #12).
#[derive(Debug, Clone)]
pub struct Switch {
    pub app: String,
    pub version: u32,
    /// The release that was live before (`None`: the app's first).
    pub previous: Option<u32>,
    pub commit: String,
    pub git_ref: String,
    pub kind: SwitchKind,
}

/// What settles a switch's repo side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    /// A push: live only once git has moved `git_ref` to the commit (after
    /// the hook); otherwise it is rolled back.
    Push,
    /// slipway moves `git_ref` to the commit itself (promotion), then tags.
    MoveRef,
    /// Only `LIVE`/`DEPLOYED-*` follow (deploy from the API, rollback).
    Tag,
}

impl SwitchKind {
    fn as_str(self) -> &'static str {
        match self {
            SwitchKind::Push => "push",
            SwitchKind::MoveRef => "move-ref",
            SwitchKind::Tag => "tag",
        }
    }

    fn parse(s: &str) -> SwitchKind {
        match s {
            "push" => SwitchKind::Push,
            "move-ref" => SwitchKind::MoveRef,
            _ => SwitchKind::Tag,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseStatus {
    /// Being built or started; never the live release.
    Pending,
    /// Serving now. At most one per app.
    Live,
    /// Served before, replaced by a later release; can be rolled back to.
    Superseded,
    /// Its deploy failed; kept as a record only, its tree is removed.
    Failed,
}

impl ReleaseStatus {
    fn parse(s: &str) -> ReleaseStatus {
        match s {
            "live" => ReleaseStatus::Live,
            "superseded" => ReleaseStatus::Superseded,
            "failed" => ReleaseStatus::Failed,
            _ => ReleaseStatus::Pending,
        }
    }
}

/// One release: a code tree plus a config snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub app: String,
    pub version: u32,
    /// The release whose directory holds the code. A config-only release
    /// or a rollback reuses an earlier tree instead of copying it.
    pub tree: u32,
    pub commit: String,
    pub git_ref: String,
    pub env_key: Option<String>,
    pub config: BTreeMap<String, String>,
    pub description: String,
    pub actor: String,
    pub status: ReleaseStatus,
    pub created_at: String,
    /// Its tree (and image) was removed by `--keep-releases`; the record
    /// stays, so history is whole and numbers are never reused.
    pub collected: bool,
}

impl Release {
    /// A release about to be made: [`Store::begin_release`] gives it its
    /// version. `tree: 0` means a new tree of its own (the new version's).
    #[allow(clippy::too_many_arguments)]
    pub fn pending(
        app: &str,
        tree: u32,
        commit: &str,
        git_ref: &str,
        env_key: Option<String>,
        config: BTreeMap<String, String>,
        description: &str,
        actor: &str,
    ) -> Release {
        Release {
            app: app.to_string(),
            version: 0,
            tree,
            commit: commit.to_string(),
            git_ref: git_ref.to_string(),
            env_key,
            config,
            description: description.to_string(),
            actor: actor.to_string(),
            status: ReleaseStatus::Pending,
            created_at: String::new(),
            collected: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub name: String,
    pub app: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SshKey {
    pub name: String,
    pub fingerprint: String,
    pub app: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: i64,
    pub at: String,
    pub app: Option<String>,
    pub actor: String,
    pub action: String,
    pub detail: String,
    pub outcome: String,
}

/// The schema, as a list of migrations applied in order; the database's
/// `PRAGMA user_version` is the number applied. Append, never edit: a data
/// dir made by any earlier slipway opens with a newer one.
///
/// Hand-rolled rather than rusqlite_migration, which does the same over
/// `user_version`: every release of that crate pins a rusqlite older than
/// the 0.41 this project must use (two copies of libsqlite3-sys cannot be
/// linked).
///
/// Migration 1 is the schema of slipway before versioning; its
/// `IF NOT EXISTS` lets an unversioned database (user_version 0 with the
/// tables present) take it as a no-op.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, PROMOTION_SOURCES, WEBHOOK_SECRETS, HISTORY_COLLECTED, INTEGRITY_SWITCHES, SCHEDULERS];

// swarm track (issue 12): where an app's processes run: `local` (this
// host's supervisor) or `swarm` (services of the engine's swarm).
const SCHEDULERS: &str = "ALTER TABLE apps ADD COLUMN scheduler TEXT NOT NULL DEFAULT 'local';";

// history track: a collected release keeps its record (issue 15 #4).
const HISTORY_COLLECTED: &str = "ALTER TABLE releases ADD COLUMN collected INTEGER NOT NULL DEFAULT 0;";

/// Apps that were promoted from (staging apps): their deploy tags carry
/// the app's name, so `LIVE` names the live app's release only.
const PROMOTION_SOURCES: &str = "
CREATE TABLE IF NOT EXISTS promotion_sources (
    app TEXT PRIMARY KEY REFERENCES apps(name) ON DELETE CASCADE
);
";

/// Each app's webhook signing secret (HMAC-SHA256).
const WEBHOOK_SECRETS: &str = "ALTER TABLE webhooks ADD COLUMN secret TEXT;";

/// integrity track (issue 10 #12): a switch whose repo side (the pushed
/// ref, `LIVE`/`DEPLOYED-*`) is not settled yet. Written before the
/// switch, removed once the repo agrees; what a start finds here it rolls
/// forward or back (`release::reconcile`).
const INTEGRITY_SWITCHES: &str = "
CREATE TABLE IF NOT EXISTS unsettled_switches (
    app TEXT PRIMARY KEY REFERENCES apps(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    previous INTEGER,
    commit_id TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    kind TEXT NOT NULL
);
";

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    tree INTEGER NOT NULL,
    commit_id TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    env_key TEXT,
    config TEXT NOT NULL,
    description TEXT NOT NULL,
    actor TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, version)
);
CREATE TABLE IF NOT EXISTS config (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
CREATE TABLE IF NOT EXISTS scale (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    ptype TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (app, ptype)
);
CREATE TABLE IF NOT EXISTS domains (
    host TEXT PRIMARY KEY,
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    app TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stopped_apps (
    app TEXT PRIMARY KEY REFERENCES apps(name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS app_users (
    app TEXT PRIMARY KEY REFERENCES apps(name) ON DELETE CASCADE,
    uid INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    app TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    app TEXT PRIMARY KEY REFERENCES apps(name) ON DELETE CASCADE,
    url TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    app TEXT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    outcome TEXT NOT NULL
);
";

/// Apply the migrations the database has not seen, each in its own
/// transaction with its version bump. Refuses a database from a newer
/// slipway rather than guess at its schema.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<()> {
    let have: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).context("reading schema version")? as usize;
    if have > migrations.len() {
        anyhow::bail!(
            "the database has schema version {have}, newer than this slipway knows ({}): run the newer slipway, or restore a backup",
            migrations.len()
        );
    }
    for (i, sql) in migrations.iter().enumerate().skip(have) {
        let version = i + 1;
        let tx = conn.transaction().context("starting migration")?;
        tx.execute_batch(sql).with_context(|| format!("applying schema migration {version}"))?;
        // PRAGMA takes no bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {version}")).context("recording schema version")?;
        tx.commit().with_context(|| format!("committing schema migration {version}"))?;
    }
    Ok(())
}

/// The schema version this build migrates to.
pub fn schema_version() -> usize {
    MIGRATIONS.len()
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
        )
        .context("configuring database")?;
        let mut conn = conn;
        migrate(&mut conn, MIGRATIONS).with_context(|| format!("migrating database {}", path.display()))?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Run `f` on the blocking pool, so SQLite never stalls a runtime thread.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .context("store task panicked")?
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A poisoned lock only means another caller panicked mid-call; SQLite
        // itself rolled back, so the connection is still sound.
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).context("database error")
    }

    // backup track (issue 14 #6): snapshots through SQLite's online backup API.

    /// Copy the whole database to `dest` (a new file) as one consistent
    /// snapshot, while other callers wait on the connection's lock.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.backup(rusqlite::MAIN_DB, dest, None::<fn(rusqlite::backup::Progress)>)
            .with_context(|| format!("backing up the database to {}", dest.display()))
    }

    /// A restored data dir gets app uids from its own block at start: the
    /// recorded ones belong to the server the backup was made on.
    pub fn forget_app_users(&self) -> Result<()> {
        self.with(|c| c.execute_batch("DELETE FROM app_users; DELETE FROM counters WHERE name = 'uid';"))
    }

    // ---- apps ----

    /// Create an app; false when it existed already.
    pub fn create_app(&self, app: &AppName) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO apps (name, created_at) VALUES (?1, ?2)",
                params![app.as_str(), now()],
            )?;
            Ok(n == 1)
        })
    }

    /// Record that `app` was promoted from. True the first time.
    pub fn mark_promotion_source(&self, app: &AppName) -> Result<bool> {
        self.with(|c| Ok(c.execute("INSERT OR IGNORE INTO promotion_sources (app) VALUES (?1)", params![app.as_str()])? == 1))
    }

    pub fn is_promotion_source(&self, app: &AppName) -> Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM promotion_sources WHERE app = ?1", params![app.as_str()], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    pub fn app(&self, app: &AppName) -> Result<Option<App>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, created_at FROM apps WHERE name = ?1",
                params![app.as_str()],
                |r| Ok(App { name: r.get(0)?, created_at: r.get(1)? }),
            )
            .optional()
        })
    }

    pub fn apps(&self) -> Result<Vec<App>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, created_at FROM apps ORDER BY name")?;
            let rows = st.query_map([], |r| Ok(App { name: r.get(0)?, created_at: r.get(1)? }))?;
            rows.collect()
        })
    }

    pub fn delete_app(&self, app: &AppName) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for table in ["releases", "config", "scale", "domains", "webhooks", "app_users", "stopped_apps"] {
                tx.execute(&format!("DELETE FROM {table} WHERE app = ?1"), params![app.as_str()])?;
            }
            tx.execute("DELETE FROM tokens WHERE app = ?1", params![app.as_str()])?;
            tx.execute("DELETE FROM keys WHERE app = ?1", params![app.as_str()])?;
            tx.execute("DELETE FROM apps WHERE name = ?1", params![app.as_str()])?;
            tx.execute("DELETE FROM counters WHERE name = ?1", params![format!("release:{app}")])?;
            tx.commit()
        })
    }

    /// The lowest uid any app has (process track: which uid block a data
    /// dir made before blocks already uses).
    pub fn min_app_uid(&self) -> Result<Option<u32>> {
        self.with(|c| c.query_row("SELECT MIN(uid) FROM app_users", [], |r| r.get(0)))
    }

    /// The app's own uid, allocated on first use from `first` upwards and
    /// never handed to another app while this one exists.
    pub fn app_uid(&self, app: &AppName, first: u32) -> Result<u32> {
        self.with(|c| {
            let tx = c.transaction()?;
            let existing: Option<u32> =
                tx.query_row("SELECT uid FROM app_users WHERE app = ?1", params![app.as_str()], |r| r.get(0)).optional()?;
            let uid = match existing {
                Some(u) => u,
                None => {
                    // A counter, not MAX(uid)+1: a destroyed app's uid is
                    // never handed to a new app (its files or processes
                    // could outlive it).
                    let next: u32 = tx.query_row(
                        "SELECT MAX(COALESCE((SELECT value FROM counters WHERE name = 'uid'), ?1), ?1)",
                        params![first],
                        |r| r.get(0),
                    )?;
                    tx.execute(
                        "INSERT INTO counters (name, value) VALUES ('uid', ?1)
                         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        params![next + 1],
                    )?;
                    tx.execute("INSERT INTO app_users (app, uid) VALUES (?1, ?2)", params![app.as_str(), next])?;
                    next
                }
            };
            tx.commit()?;
            Ok(uid)
        })
    }

    /// Mark an app stopped by request (or not): a stopped app stays down
    /// across daemon restarts until it is started or deployed again.
    pub fn set_stopped(&self, app: &AppName, stopped: bool) -> Result<()> {
        self.with(|c| {
            if stopped {
                c.execute("INSERT OR IGNORE INTO stopped_apps (app) VALUES (?1)", params![app.as_str()])?;
            } else {
                c.execute("DELETE FROM stopped_apps WHERE app = ?1", params![app.as_str()])?;
            }
            Ok(())
        })
    }

    pub fn is_stopped(&self, app: &AppName) -> Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM stopped_apps WHERE app = ?1", params![app.as_str()], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    // ---- config ----

    pub fn config(&self, app: &AppName) -> Result<BTreeMap<String, String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT key, value FROM config WHERE app = ?1")?;
            let rows = st.query_map(params![app.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Replace the app's whole config (set, unset and rollback all end here).
    pub fn replace_config(&self, app: &AppName, config: &BTreeMap<String, String>) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM config WHERE app = ?1", params![app.as_str()])?;
            for (k, v) in config {
                tx.execute(
                    "INSERT INTO config (app, key, value) VALUES (?1, ?2, ?3)",
                    params![app.as_str(), k, v],
                )?;
            }
            tx.commit()
        })
    }

    // ---- scheduler (swarm track) ----

    /// Where the app's processes run; `Local` for an unknown app.
    pub fn scheduler(&self, app: &AppName) -> Result<Scheduler> {
        let s: Option<String> = self.with(|c| {
            c.query_row("SELECT scheduler FROM apps WHERE name = ?1", params![app.as_str()], |r| r.get(0)).optional()
        })?;
        Ok(Scheduler::parse(s.as_deref().unwrap_or("local")).unwrap_or(Scheduler::Local))
    }

    pub fn set_scheduler(&self, app: &AppName, scheduler: Scheduler) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE apps SET scheduler = ?2 WHERE name = ?1", params![app.as_str(), scheduler.as_str()])?;
            Ok(())
        })
    }

    // ---- scale ----

    pub fn scale(&self, app: &AppName) -> Result<BTreeMap<String, u32>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT ptype, count FROM scale WHERE app = ?1")?;
            let rows = st.query_map(params![app.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub fn set_scale(&self, app: &AppName, ptype: &str, count: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO scale (app, ptype, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app, ptype) DO UPDATE SET count = excluded.count",
                params![app.as_str(), ptype, count],
            )?;
            Ok(())
        })
    }

    // ---- domains ----

    pub fn add_domain(&self, app: &AppName, host: &str) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO domains (host, app) VALUES (?1, ?2)",
                params![host, app.as_str()],
            )?;
            Ok(n == 1)
        })
    }

    pub fn remove_domain(&self, app: &AppName, host: &str) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM domains WHERE host = ?1 AND app = ?2",
                params![host, app.as_str()],
            )?;
            Ok(n == 1)
        })
    }

    /// Which app owns `host`, if any.
    pub fn domain_owner(&self, host: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT app FROM domains WHERE host = ?1", params![host], |r| r.get(0))
                .optional()
        })
    }

    pub fn domains(&self, app: &AppName) -> Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT host FROM domains WHERE app = ?1 ORDER BY host")?;
            let rows = st.query_map(params![app.as_str()], |r| r.get(0))?;
            rows.collect()
        })
    }

    // ---- releases ----

    /// Reserve the next version number with a pending record. Numbers are
    /// never reused: the highest one ever given (kept in `counters`, as a
    /// record may be gone) plus one.
    pub fn begin_release(&self, r: &Release) -> Result<u32> {
        let config = serde_json::to_string(&r.config).context("encoding config")?;
        let counter = format!("release:{}", r.app);
        self.with(|c| {
            let tx = c.transaction()?;
            let version: u32 = tx.query_row(
                "SELECT MAX(COALESCE((SELECT MAX(version) FROM releases WHERE app = ?1), 0),
                            COALESCE((SELECT value FROM counters WHERE name = ?2), 0)) + 1",
                params![r.app, counter],
                |row| row.get(0),
            )?;
            tx.execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![counter, version],
            )?;
            let tree = if r.tree == 0 { version } else { r.tree };
            tx.execute(
                "INSERT INTO releases (app, version, tree, commit_id, git_ref, env_key, config,
                     description, actor, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10)",
                params![
                    r.app, version, tree, r.commit, r.git_ref, r.env_key, config,
                    r.description, r.actor, now()
                ],
            )?;
            tx.commit()?;
            Ok(version)
        })
    }

    pub fn set_release_env(&self, app: &AppName, version: u32, env_key: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE releases SET env_key = ?3 WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version, env_key],
            )?;
            Ok(())
        })
    }

    /// Make `version` the live release, superseding the previous one, in one
    /// transaction, so the store never shows zero or two live releases.
    pub fn mark_live(&self, app: &AppName, version: u32) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE releases SET status = 'superseded' WHERE app = ?1 AND status = 'live'",
                params![app.as_str()],
            )?;
            tx.execute(
                "UPDATE releases SET status = 'live' WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version],
            )?;
            tx.commit()
        })
    }

    pub fn mark_failed(&self, app: &AppName, version: u32, reason: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE releases SET status = 'failed', description = description || ' — failed: ' || ?3
                 WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version, reason],
            )?;
            Ok(())
        })
    }

    // ---- unsettled switches (integrity track) ----

    /// Record a switch before it happens (one per app: an app's operations
    /// are serialized, so a new one replaces a settled-and-forgotten one).
    pub fn begin_switch(&self, sw: &Switch) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO unsettled_switches (app, version, previous, commit_id, git_ref, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![sw.app, sw.version, sw.previous, sw.commit, sw.git_ref, sw.kind.as_str()],
            )?;
            Ok(())
        })
    }

    /// The repo agrees with the store again (or the operation failed).
    pub fn end_switch(&self, app: &AppName) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM unsettled_switches WHERE app = ?1", params![app.as_str()])?;
            Ok(())
        })
    }

    pub fn unsettled_switches(&self) -> Result<Vec<Switch>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT app, version, previous, commit_id, git_ref, kind FROM unsettled_switches ORDER BY app")?;
            let rows = st.query_map([], |r| {
                let kind: String = r.get(5)?;
                Ok(Switch {
                    app: r.get(0)?,
                    version: r.get(1)?,
                    previous: r.get(2)?,
                    commit: r.get(3)?,
                    git_ref: r.get(4)?,
                    kind: SwitchKind::parse(&kind),
                })
            })?;
            rows.collect()
        })
    }

    /// Undo a switch the repo never confirmed, in one transaction: `version`
    /// is recorded failed, `previous` (if any) is live again, the journal
    /// entry goes.
    pub fn roll_back_switch(&self, app: &AppName, version: u32, previous: Option<u32>, reason: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE releases SET status = 'failed', description = description || ' — failed: ' || ?3
                 WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version, reason],
            )?;
            if let Some(prev) = previous {
                tx.execute(
                    "UPDATE releases SET status = 'live' WHERE app = ?1 AND version = ?2",
                    params![app.as_str(), prev],
                )?;
            }
            tx.execute("DELETE FROM unsettled_switches WHERE app = ?1", params![app.as_str()])?;
            tx.commit()
        })
    }

    pub fn releases(&self, app: &AppName) -> Result<Vec<Release>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT app, version, tree, commit_id, git_ref, env_key, config, description,
                        actor, status, created_at, collected
                 FROM releases WHERE app = ?1 ORDER BY version DESC",
            )?;
            let rows = st.query_map(params![app.as_str()], release_from_row)?;
            rows.collect()
        })
    }

    pub fn release(&self, app: &AppName, version: u32) -> Result<Option<Release>> {
        self.with(|c| {
            c.query_row(
                "SELECT app, version, tree, commit_id, git_ref, env_key, config, description,
                        actor, status, created_at, collected
                 FROM releases WHERE app = ?1 AND version = ?2",
                params![app.as_str(), version],
                release_from_row,
            )
            .optional()
        })
    }

    pub fn live_release(&self, app: &AppName) -> Result<Option<Release>> {
        self.with(|c| {
            c.query_row(
                "SELECT app, version, tree, commit_id, git_ref, env_key, config, description,
                        actor, status, created_at, collected
                 FROM releases WHERE app = ?1 AND status = 'live'",
                params![app.as_str()],
                release_from_row,
            )
            .optional()
        })
    }

    /// Every app with a live release, for restoring service at start-up.
    pub fn live_releases(&self) -> Result<Vec<Release>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT app, version, tree, commit_id, git_ref, env_key, config, description,
                        actor, status, created_at, collected
                 FROM releases WHERE status = 'live' ORDER BY app",
            )?;
            let rows = st.query_map([], release_from_row)?;
            rows.collect()
        })
    }

    /// Releases left `pending` by a daemon that stopped mid-operation.
    pub fn pending_releases(&self) -> Result<Vec<Release>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT app, version, tree, commit_id, git_ref, env_key, config, description,
                        actor, status, created_at, collected
                 FROM releases WHERE status = 'pending' ORDER BY app, version",
            )?;
            let rows = st.query_map([], release_from_row)?;
            rows.collect()
        })
    }

    /// Env keys used by any release that still has a tree on disk.
    pub fn env_keys_in_use(&self) -> Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT DISTINCT env_key FROM releases
                 WHERE env_key IS NOT NULL AND status != 'failed' AND collected = 0",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Remove a release record (a failed deploy leaves none behind).
    pub fn delete_release(&self, app: &AppName, version: u32) -> Result<()> {
        self.delete_releases(app, &[version])
    }

    /// Record that these releases' trees were collected (`--keep-releases`):
    /// the records stay, a rollback to them says how to rebuild.
    pub fn mark_collected(&self, app: &AppName, versions: &[u32]) -> Result<()> {
        self.per_version(app, versions, "UPDATE releases SET collected = 1 WHERE app = ?1 AND version = ?2 AND status != 'live'")
    }

    pub fn delete_releases(&self, app: &AppName, versions: &[u32]) -> Result<()> {
        self.per_version(app, versions, "DELETE FROM releases WHERE app = ?1 AND version = ?2 AND status != 'live'")
    }

    /// `sql` (?1 the app, ?2 a version) for each of `versions`, in one
    /// transaction.
    fn per_version(&self, app: &AppName, versions: &[u32], sql: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for v in versions {
                tx.execute(sql, params![app.as_str(), v])?;
            }
            tx.commit()
        })
    }

    // ---- webhooks ----

    pub fn webhook(&self, app: &AppName) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT url FROM webhooks WHERE app = ?1", params![app.as_str()], |r| r.get(0))
                .optional()
        })
    }

    pub fn set_webhook(&self, app: &AppName, url: Option<&str>) -> Result<()> {
        self.with(|c| {
            match url {
                Some(u) => c.execute(
                    "INSERT INTO webhooks (app, url) VALUES (?1, ?2)
                     ON CONFLICT (app) DO UPDATE SET url = excluded.url",
                    params![app.as_str(), u],
                )?,
                None => c.execute("DELETE FROM webhooks WHERE app = ?1", params![app.as_str()])?,
            };
            Ok(())
        })
    }

    /// people track (`/metrics`): how many of each operation ended how,
    /// per app, from the audit trail: (app, action, outcome, count).
    pub fn operation_counts(&self) -> Result<Vec<(String, String, String, u64)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT app, action, outcome, COUNT(*) FROM events
                 WHERE app IS NOT NULL AND action IN ('deploy', 'rollback', 'promote', 'config', 'restart', 'scale', 'webhook')
                 GROUP BY app, action, outcome ORDER BY app, action, outcome",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64)))?;
            rows.collect()
        })
    }

    /// people track: the app's webhook signing secret, if one was made.
    pub fn webhook_secret(&self, app: &AppName) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT secret FROM webhooks WHERE app = ?1", params![app.as_str()], |r| r.get::<_, Option<String>>(0))
                .optional()
                .map(Option::flatten)
        })
    }

    /// people track: set the secret of an app's existing webhook.
    pub fn set_webhook_secret(&self, app: &AppName, secret: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE webhooks SET secret = ?2 WHERE app = ?1", params![app.as_str(), secret])?;
            Ok(())
        })
    }

    // ---- SSH keys ----

    /// Register a key; false when the name or the key is taken.
    pub fn add_key(&self, name: &str, fingerprint: &str, public_key: &str, app: Option<&AppName>) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO keys (name, fingerprint, public_key, app, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, fingerprint, public_key, app.map(|a| a.as_str()), now()],
            )?;
            Ok(n == 1)
        })
    }

    pub fn key_by_fingerprint(&self, fingerprint: &str) -> Result<Option<SshKey>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, fingerprint, app, created_at FROM keys WHERE fingerprint = ?1",
                params![fingerprint],
                |r| Ok(SshKey { name: r.get(0)?, fingerprint: r.get(1)?, app: r.get(2)?, created_at: r.get(3)? }),
            )
            .optional()
        })
    }

    pub fn keys(&self) -> Result<Vec<SshKey>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, fingerprint, app, created_at FROM keys ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(SshKey { name: r.get(0)?, fingerprint: r.get(1)?, app: r.get(2)?, created_at: r.get(3)? })
            })?;
            rows.collect()
        })
    }

    pub fn remove_key(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM keys WHERE name = ?1", params![name])? == 1))
    }

    // ---- tokens ----

    pub fn add_token(&self, name: &str, hash: &str, app: Option<&AppName>) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO tokens (name, hash, app, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, app.map(|a| a.as_str()), now()],
            )?;
            Ok(n == 1)
        })
    }

    /// The token with this hash: its name and scope.
    pub fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, app, created_at FROM tokens WHERE hash = ?1",
                params![hash],
                |r| Ok(Token { name: r.get(0)?, app: r.get(1)?, created_at: r.get(2)? }),
            )
            .optional()
        })
    }

    pub fn tokens(&self) -> Result<Vec<Token>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, app, created_at FROM tokens ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(Token { name: r.get(0)?, app: r.get(1)?, created_at: r.get(2)? })
            })?;
            rows.collect()
        })
    }

    pub fn revoke_token(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM tokens WHERE name = ?1", params![name])? == 1))
    }

    // ---- events ----

    pub fn record_event(
        &self,
        app: Option<&str>,
        actor: &str,
        action: &str,
        detail: &str,
        outcome: &str,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO events (at, app, actor, action, detail, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![now(), app, actor, action, detail, outcome],
            )?;
            Ok(())
        })
    }

    pub fn events(&self, app: Option<&AppName>, limit: u32) -> Result<Vec<Event>> {
        self.events_since(app, limit, None)
    }

    /// The newest `limit` events, only those at or after `since` (a UTC
    /// time as events record it, `YYYY-MM-DDTHH:MM:SSZ`) when given.
    pub fn events_since(&self, app: Option<&AppName>, limit: u32, since: Option<&str>) -> Result<Vec<Event>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, at, app, actor, action, detail, outcome FROM events
                 WHERE (?1 IS NULL OR app = ?1) AND (?3 IS NULL OR at >= ?3) ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![app.map(|a| a.as_str()), limit, since], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    app: r.get(2)?,
                    actor: r.get(3)?,
                    action: r.get(4)?,
                    detail: r.get(5)?,
                    outcome: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }
}

fn release_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Release> {
    let config: String = r.get(6)?;
    let status: String = r.get(9)?;
    Ok(Release {
        app: r.get(0)?,
        version: r.get(1)?,
        tree: r.get(2)?,
        commit: r.get(3)?,
        git_ref: r.get(4)?,
        env_key: r.get(5)?,
        // The column is only ever written from a BTreeMap by begin_release.
        config: serde_json::from_str(&config).unwrap_or_default(),
        description: r.get(7)?,
        actor: r.get(8)?,
        status: ReleaseStatus::parse(&status),
        created_at: r.get(10)?,
        collected: r.get::<_, i64>(11)? != 0,
    })
}

/// backup track: a consistent copy of an app's own SQLite database (a
/// `[storage]` file) while the app may be writing it: the online backup
/// API in one step, under a shared lock the app's writers wait on (their
/// busy handler), so the copy is never torn. The source is opened
/// read-only; `Ok(false)` when the file is not a database.
pub fn snapshot_foreign_db(src: &Path, dest: &Path) -> Result<bool> {
    use rusqlite::backup::{Backup, StepResult};
    use rusqlite::OpenFlags;
    let mut head = [0u8; 16];
    match std::fs::File::open(src).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)) {
        Ok(()) if &head == b"SQLite format 3\0" => {}
        _ => return Ok(false),
    }
    let from = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening {}", src.display()))?;
    from.busy_timeout(std::time::Duration::from_secs(5)).context("busy timeout")?;
    let mut to = Connection::open(dest).with_context(|| format!("creating {}", dest.display()))?;
    let backup = Backup::new(&from, &mut to).context("starting the backup")?;
    // -1: every page in one step, so a writer between steps cannot restart it.
    for _ in 0..50 {
        match backup.step(-1).with_context(|| format!("copying {}", src.display()))? {
            StepResult::Done => return Ok(true),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    anyhow::bail!("{} stayed locked for 5 s", src.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/schema-v0.db was made by the last slipway before
    /// schema versions (commit d08f644): an app, a config var, a scoped
    /// token and a domain. It must open, migrate and keep all of them.
    #[test]
    fn opens_a_database_made_before_schema_versions() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("slipway.db");
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v0.db"), &db)?;
        let s = Store::open(&db)?;
        let app = AppName::parse("oldapp")?;
        assert!(s.app(&app)?.is_some());
        assert_eq!(s.config(&app)?.get("GREETING").map(String::as_str), Some("kept"));
        assert_eq!(s.domains(&app)?, vec!["old.example.com".to_string()]);
        assert!(s.tokens()?.iter().any(|t| t.name == "ci" && t.app.as_deref() == Some("oldapp")));
        let version: i64 = s.with(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))?;
        assert_eq!(version as usize, schema_version());
        drop(s);
        // Opening again applies nothing and changes nothing.
        Store::open(&db)?;
        Ok(())
    }

    #[test]
    fn refuses_a_database_from_a_newer_slipway() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("slipway.db");
        drop(Store::open(&db)?);
        let conn = Connection::open(&db)?;
        conn.execute_batch(&format!("PRAGMA user_version = {}", schema_version() + 1))?;
        drop(conn);
        let err = Store::open(&db).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(err.contains("newer than this slipway knows"), "{err}");
        Ok(())
    }

    #[test]
    fn exactly_one_live_release() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Store::open(&dir.path().join("db"))?;
        let app = AppName::parse("a")?;
        assert!(s.create_app(&app)?);
        assert!(!s.create_app(&app)?);
        let base = Release::pending("a", 0, "c", "refs/heads/main", None, BTreeMap::new(), "push", "admin");
        let v1 = s.begin_release(&base)?;
        let v2 = s.begin_release(&base)?;
        assert_eq!((v1, v2), (1, 2));
        s.mark_live(&app, v1)?;
        s.mark_live(&app, v2)?;
        let live: Vec<_> = s.releases(&app)?.into_iter().filter(|r| r.status == ReleaseStatus::Live).collect();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].version, 2);
        assert_eq!(s.release(&app, 1)?.map(|r| r.status), Some(ReleaseStatus::Superseded));
        Ok(())
    }
}

