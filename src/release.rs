//! The deploy pipeline (DESIGN.md workflow 1) and everything else that
//! changes what an app runs: config changes, rollback, restart, scale,
//! stop/start, destroy, and restoring service when the daemon starts.
//!
//! Architecture invariant: the pipeline never leaves an app without a
//! serving release. New processes are started beside the old ones and
//! health-checked with the app's own Host header; only then is the route
//! swapped (one atomic store), the store's live release moved (one
//! transaction) and the old processes drained and stopped. Any failure
//! before the swap stops the new processes, removes the new release's tree
//! and record, and leaves everything as it was.
//!
//! One operation at a time per app: each takes the app's lock first, and
//! a second push waits with a message. Different apps proceed in parallel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tracing::Instrument;

use crate::build::Environment;
use crate::git::{self, Quarantine};
use crate::layout::Layout;
use crate::manifest::{self, DeployPolicy, Manifest, ProcessSpec, Reload};
use crate::names::{self, AppName};
use crate::progress::Progress;
use crate::proxy::{self, Upstream};
use crate::runtime::{self, ProcessCommand, StepError};
use crate::platform::Platform;
use crate::store::{Release, ReleaseStatus, Switch, SwitchKind};
use crate::supervisor::{Instance, InstanceSpec, State};

// swarm track (issue 12): activation on the swarm, moving apps there and back.
pub mod swarm;

const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_SCALE: u32 = 50;

/// Instances of all types of one app together (issue 10 #9). Each costs
/// the daemon descriptors (its output pipes, its pid file, a pool of
/// upstream connections for web ones) out of one budget shared by every
/// app: with 32 types of up to 50 each, one deployer could otherwise take
/// 1,600 instances' worth.
pub const MAX_INSTANCES: u32 = 100;

/// Refuse a scale or a release whose instances would exceed
/// [`MAX_INSTANCES`]; types without a stored scale count as 1.
fn check_instance_total(manifest: &Manifest, scale: &BTreeMap<String, u32>) -> Result<()> {
    let total: u32 = manifest.processes.iter().map(|p| scale.get(&p.name).copied().unwrap_or(1)).sum();
    if total > MAX_INSTANCES {
        bail!("{total} instances in all is above the limit of {MAX_INSTANCES} per app: scale some types down");
    }
    Ok(())
}

/// Marks an error whose failure the pipeline has already reported.
#[derive(Debug)]
struct DeployFailed;

impl std::fmt::Display for DeployFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deploy failed")
    }
}

/// One line of a push's pre-receive input.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

/// Who asked for an operation, for release records and the event log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The app's lock, held for the length of an operation.
pub type AppGuard = tokio::sync::OwnedMutexGuard<()>;

/// Handle a push: check each ref against the deploy policy, deploy the
/// deployable one, store the rest. An error rejects the whole push.
///
/// On success the app's lock is handed back: git updates the refs only
/// after this hook returns, so the caller must hold the lock until
/// receive-pack has finished, or the next push could check its refs
/// against values that are about to change.
pub async fn receive_push(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    refs: Vec<RefUpdate>,
    q: Quarantine,
    progress: &Progress,
) -> Result<PushOutcome> {
    let guard = acquire(p, app, progress).await;
    let previous = live_release(p, app).await.ok().flatten().map(|r| r.version);
    let result = receive_locked(p, app, actor, refs, q, progress).await;
    if let Err(e) = &result {
        // A refusal before the pipeline: its cause is the push's `!` line
        // (said once, by the hook); the pipeline's failures said this already.
        if e.downcast_ref::<DeployFailed>().is_none() {
            progress.info("nothing changed: the previous release keeps serving");
        }
    }
    result.map(|deployed| PushOutcome { guard, deployed, previous })
}

/// What a successful push hands back: the app's lock, and what it
/// deployed, to be settled once git has ended.
pub struct PushOutcome {
    pub guard: AppGuard,
    /// The deployed commit and the ref it came from.
    pub deployed: Option<(String, String)>,
    /// The release that was live before this push's deploy.
    pub previous: Option<u32>,
}

/// Both the push's deploy and its git process have ended. If the ref names
/// the deployed commit (the normal case, and also when git finished after
/// its client left), tag it. If not (git died before it could update the
/// ref), bring back the release that was live before, so that the ref and
/// what serves agree again. Runs under the app's lock.
pub async fn settle_push(p: &Platform, app: &AppName, push: PushOutcome) {
    let _guard = push.guard;
    let Some((commit, git_ref)) = push.deployed else { return };
    let repo = p.layout.repo(app);
    if git::ref_value(&repo, &git_ref).await.as_deref() == Some(commit.as_str()) {
        crash_point("before-tag");
        tag(p, app, &commit, &Progress::default()).await;
        end_switch(p, app).await;
        return;
    }
    let log = p.logs.app(app);
    log.write("slipway", &format!("the push never updated {git_ref}: bringing back the previous release"));
    let result = match push.previous {
        Some(v) => relaunch(p, app, v, &Progress::default()).await,
        None => {
            p.proxy.set_upstreams(app.as_str(), Vec::new());
            stop_all(p.supervisor.take_all(app.as_str())).await;
            Ok(())
        }
    };
    end_switch(p, app).await;
    p.event(Some(app), &Actor("slipway".into()), "revert-abandoned-push", &git_ref, outcome(&result)).await;
}

async fn receive_locked(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    refs: Vec<RefUpdate>,
    q: Quarantine,
    progress: &Progress,
) -> Result<Option<(String, String)>> {
    let repo = p.layout.repo(app);
    let zero = |s: &str| s.bytes().all(|c| c == b'0');
    for r in &refs {
        names::check_ref(&r.name)?;
        refuse_deploy_tag(&r.name)?;
        if !is_object_id(&r.new) || !is_object_id(&r.old) {
            bail!("malformed ref update for {}", r.name);
        }
    }
    // A push that waited behind another may have been overtaken: git would
    // refuse its ref update after our deploy, leaving the ref and the live
    // release disagreeing. Refuse it now, before anything changes.
    for r in &refs {
        let current = git::ref_value(&repo, &r.name).await;
        let expected = (!zero(&r.old)).then(|| r.old.clone());
        if current != expected {
            bail!("{} moved while this push waited (another push landed first): fetch and push again", r.name);
        }
    }
    let live = live_release(p, app).await?;
    let mut target: Option<RefUpdate> = None;
    for r in refs {
        if zero(&r.new) {
            if live.as_ref().is_some_and(|l| l.git_ref == r.name) {
                bail!("refusing to delete {}: it names the live release", r.name);
            }
            progress.info(&format!("{} deleted", r.name));
            continue;
        }
        let manifest = manifest_at(&repo, &q, &r.new).await?;
        let has_main = git::resolve(&repo, "refs/heads/main").await.is_some();
        if !deployable(&manifest.deploy, &r.name, has_main) {
            progress.info(&format!("{} stored, not deployed ({})", r.name, describe_policy(&manifest.deploy)));
            continue;
        }
        if let Some(t) = &target {
            progress.info(&format!("{} stored, not deployed (this push deploys {})", r.name, t.name));
            continue;
        }
        target = Some(r);
    }
    let Some(t) = target else { return Ok(None) };
    deploy_locked(p, app, actor, &t.new, &t.name, &q, false, progress).await?;
    Ok(Some((t.new, t.name)))
}

/// Free space a deploy needs before it starts, unless
/// `SLIPWAY_MIN_FREE_SPACE` (in the daemon's environment: `2G`, `500M`,
/// bytes; `0` turns the check off) says otherwise. A full disk mid-deploy
/// fails that step and undoes it, but a deploy that cannot fit should not
/// start.
const DEFAULT_MIN_FREE: u64 = 256 << 20;

fn min_free_space() -> Result<u64> {
    let Ok(raw) = std::env::var("SLIPWAY_MIN_FREE_SPACE") else { return Ok(DEFAULT_MIN_FREE) };
    let raw = raw.trim();
    let (num, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("SLIPWAY_MIN_FREE_SPACE={raw:?}: use bytes or a size like 500M, 2G"),
    };
    let n: u64 = num.parse().with_context(|| format!("SLIPWAY_MIN_FREE_SPACE={raw:?}: use bytes or a size like 500M, 2G"))?;
    n.checked_mul(1 << shift).with_context(|| format!("SLIPWAY_MIN_FREE_SPACE={raw:?} is too large"))
}

/// Refuse to start a deploy when the data directory's file system has less
/// free space (for unprivileged users) than the threshold.
fn check_free_space(dir: &Path) -> Result<()> {
    let min = min_free_space()?;
    if min == 0 {
        return Ok(());
    }
    let free = free_space(dir).with_context(|| format!("checking free space on {}", dir.display()))?;
    if free < min {
        bail!(
            "only {} free on the server's data disk, below the {} a deploy needs to start: free some space (old releases: --keep-releases) or set SLIPWAY_MIN_FREE_SPACE",
            human_size(free),
            human_size(min)
        );
    }
    Ok(())
}

fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs fills the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `LIVE` and `DEPLOYED-*` record what slipway deployed: only slipway
/// writes them. A push may not move, create or delete them.
fn refuse_deploy_tag(name: &str) -> Result<()> {
    let tag = name.strip_prefix("refs/tags/").unwrap_or("");
    // A staging app's are `APP/LIVE`, `APP/DEPLOYED-…`.
    let last = tag.split_once('/').filter(|(_, rest)| rest == &"LIVE" || rest.starts_with("DEPLOYED-")).map_or(tag, |(_, rest)| rest);
    if last == "LIVE" || last.starts_with("DEPLOYED-") {
        bail!("{tag} is written by slipway only (it records what was deployed): it cannot be pushed or deleted; `git fetch --tags --force` brings your clone in line");
    }
    Ok(())
}

/// Build and release `commit` as a new version of `app`.
pub async fn deploy(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    commit: &str,
    git_ref: &str,
    q: &Quarantine,
    progress: &Progress,
) -> Result<u32> {
    let _guard = acquire(p, app, progress).await;
    deploy_locked(p, app, actor, commit, git_ref, q, true, progress).await
}

/// [`deploy`], for a caller that holds the app's lock. `tag_now`: tag the
/// repo at once (not inside a push, whose objects are still quarantined).
#[allow(clippy::too_many_arguments)]
async fn deploy_locked(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    commit: &str,
    git_ref: &str,
    q: &Quarantine,
    tag_now: bool,
    progress: &Progress,
) -> Result<u32> {
    let started = Instant::now();
    check_free_space(p.layout.root())?;
    ensure_app_dirs(p, app).await?;
    let repo = p.layout.repo(app);
    let description = git::subject(&repo, q, commit).await;
    let config = p.store.call({
        let app = app.clone();
        move |s| s.config(&app)
    })
    .await?;
    let version = p
        .store
        .call({
            let description = if description.is_empty() { "push".to_string() } else { description };
            let r = Release::pending(app.as_str(), 0, commit, git_ref, None, config, &description, &actor.0);
            move |s| s.begin_release(&r)
        })
        .await?;
    let progress = &record_output(p, app, version, progress);
    let span = tracing::info_span!("deploy", app = %app, release = version);
    let dir = p.layout.release(app, version);
    let result = async {
        progress.step(&format!("deploying {} ({}) as v{version}", short_ref(git_ref), &commit[..commit.len().min(8)]));
        if dir.exists() {
            // Left by a daemon that died mid-deploy: not a live tree.
            tokio::fs::remove_dir_all(&dir).await.context("clearing stale release directory")?;
        }
        // And its image record, if it got that far: this tree's image is chosen afresh.
        let _ = tokio::fs::remove_file(Layout::image_record(&dir)).await;
        git::archive(&repo, q, commit, &dir).await?;
        let manifest = Manifest::load(&dir)?;
        crate::storage::mount(&p.layout, app, &dir, &manifest.storage, p.user_of(app)).await?;
        for spec in &manifest.processes {
            if let Reload::Touch(path) = &spec.reload {
                reload_file(&dir, path).with_context(|| format!("processes.{}.reload", spec.name))?;
            }
        }
        // Containers (docker track): a Dockerfile or [docker] selects them; the image replaces the host environment.
        let live_tree = live_release(p, app).await.ok().flatten().map(|r| p.layout.release(app, r.tree));
        let in_container = runtime::container::prepare(&p.images, &p.layout, app, &dir, &manifest, live_tree.as_deref(), progress).await?;
        let rt = if in_container { crate::build::Runtime::Generic } else { p.builder.detect(&dir, progress).await? };
        match &rt {
            _ if in_container => {}
            crate::build::Runtime::Python { deps, interpreter } => progress.step(&format!(
                "python {} detected ({})",
                interpreter.version,
                match deps {
                    Some(crate::build::PythonDeps::Requirements) => "requirements.txt",
                    Some(crate::build::PythonDeps::UvLock) => "pyproject.toml + uv.lock",
                    Some(crate::build::PythonDeps::Pyproject) => "pyproject.toml",
                    None => "no dependencies",
                }
            )),
            crate::build::Runtime::Generic => progress.step("no runtime detected: running the Procfile as is"),
        }
        let t = Instant::now();
        let as_user = p.user_of(app).map(|u| (u, p.layout.cache().join(app.as_str())));
        // process track: SIGTERM cancels the long steps (issue 10 #13).
        let prepared = p.unless_shutdown(p.builder.prepare(&dir, &rt, as_user, progress)).await.context("dependency install failed")?;
        let env = match prepared {
            Some((env, _lease)) => {
                progress.info(&format!("environment ready in {:.1}s", t.elapsed().as_secs_f64()));
                let (app, key) = (app.clone(), env.key.clone());
                p.store.call(move |s| s.set_release_env(&app, version, &key)).await?;
                Some(env)
            }
            None => None,
        };
        let release = p
            .store
            .call({
                let app = app.clone();
                move |s| s.release(&app, version)
            })
            .await?
            .ok_or_else(|| anyhow!("release v{version} vanished"))?;
        let step_env = process_env(p, app, &release, env.as_ref(), None);
        build_phase(p, app, &dir, &manifest, env.as_ref(), &release, &step_env, progress).await?;
        if let Some(cmd) = &manifest.test_command {
            progress.step(&format!("running tests: {cmd}"));
            p.unless_shutdown(run_step(p, app, cmd, &dir, &step_env, progress)).await.context("test gate failed")?;
        }
        release_phase(p, app, &dir, &manifest, &step_env, progress).await?;
        if p.shutting_down() {
            bail!("the server is shutting down: deploy cancelled, nothing went live");
        }
        let kind = if tag_now { SwitchKind::Tag } else { SwitchKind::Push };
        begin_switch(p, app, version, commit, git_ref, kind).await?;
        activate(p, app, &release, &manifest, env.as_ref(), progress).await?;
        // The store names v{version}; for a push, git has not moved the ref.
        crash_point("after-switch");
        Ok(())
    }
    .instrument(span)
    .await;
    let v = finish(p, app, actor, version, true, started, "deploy", result, progress).await?;
    if tag_now {
        tag(p, app, commit, progress).await;
        end_switch(p, app).await;
    }
    Ok(v)
}

/// The build phase (`[build] command`, or Django's collectstatic): run as
/// the app's user in the new tree, which it may write until the tree is
/// sealed after it. What it makes (collected static files) belongs to this
/// release: a rollback brings back its own.
#[allow(clippy::too_many_arguments)]
async fn build_phase(
    p: &Platform,
    app: &AppName,
    dir: &Path,
    manifest: &Manifest,
    env: Option<&Environment>,
    release: &Release,
    step_env: &[(String, String)],
    progress: &Progress,
) -> Result<()> {
    let Some(cmd) = crate::build::build_phase_command(dir, env, manifest.build_command.as_deref(), &release.config) else {
        return Ok(());
    };
    let user = p.user_of(app);
    if cmd == crate::build::AUTO_COLLECTSTATIC {
        progress.step("build phase: python manage.py collectstatic --noinput (Django detected; DISABLE_COLLECTSTATIC=1 turns it off)");
    } else {
        progress.step(&format!("build phase: {cmd}"));
    }
    if let Some(u) = user {
        crate::build::open_tree(dir, u).await?;
    }
    let built = run_step(p, app, &cmd, dir, step_env, progress).await.context("build phase failed");
    // Sealed whatever the outcome: a failed tree is removed by root, and
    // a passed one must not stay writable by the app.
    crate::build::seal_tree(dir, user).await?;
    built?;
    // The build could have replaced a storage link: put them back.
    crate::storage::mount(&p.layout, app, dir, &manifest.storage, user).await
}

/// The release phase (`release` in the Procfile: migrations), run in the
/// release's tree with its config, as its app's user, before any switch.
async fn release_phase(p: &Platform, app: &AppName, dir: &Path, manifest: &Manifest, step_env: &[(String, String)], progress: &Progress) -> Result<()> {
    if let Some(cmd) = &manifest.release_command {
        progress.step(&format!("release phase: {cmd}"));
        p.unless_shutdown(run_step(p, app, cmd, dir, step_env, progress)).await.context("release phase failed")?;
    }
    Ok(())
}

/// Tag a deploy in the app's repo (`LIVE`, `DEPLOYED-…`). A failure to tag
/// is reported, never undoes the deploy.
pub async fn tag(p: &Platform, app: &AppName, commit: &str, progress: &Progress) {
    let prefix = tag_prefix(p, app).await;
    match git::tag_deploy(&p.layout.repo(app), commit, chrono::Utc::now(), &prefix).await {
        Ok(name) => progress.info(&format!("tagged {prefix}LIVE and {name}")),
        Err(e) => {
            tracing::warn!(app = %app, error = %format!("{e:#}"), "tagging the deploy failed");
            progress.info(&format!("could not tag the deploy: {e:#}"));
        }
    }
}

/// Deploy tags are per app when apps share a clone (issue 9 #12): the live
/// app has `LIVE` and `DEPLOYED-…`; an app that was promoted from (staging)
/// has `APP/LIVE` and `APP/DEPLOYED-…`, so `git fetch --tags` from both
/// never clobbers one with the other.
async fn tag_prefix(p: &Platform, app: &AppName) -> String {
    let a = app.clone();
    match p.store.call(move |s| s.is_promotion_source(&a)).await {
        Ok(true) => format!("{app}/"),
        _ => String::new(),
    }
}

/// `staging` was just promoted from: from now on its tags carry its name,
/// and the plain ones it had move there.
async fn become_promotion_source(p: &Platform, staging: &AppName, progress: &Progress) {
    let a = staging.clone();
    if !matches!(p.store.call(move |s| s.mark_promotion_source(&a)).await, Ok(true)) {
        return;
    }
    match git::prefix_deploy_tags(&p.layout.repo(staging), &format!("{staging}/")).await {
        Ok(n) if n > 0 => progress.info(&format!("{staging} is a staging app: its deploy tags are now {staging}/LIVE and {staging}/DEPLOYED-…")),
        Ok(_) => {}
        Err(e) => progress.info(&format!("could not rename {staging}'s deploy tags: {e:#}")),
    }
}

/// A new release with the live code and a changed config.
pub async fn change_config(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    set: BTreeMap<String, String>,
    unset: Vec<String>,
    progress: &Progress,
) -> Result<Option<u32>> {
    Ok(match change_config_with(p, app, actor, set, unset, true, progress).await? {
        ConfigOutcome::Released(v) => Some(v),
        ConfigOutcome::Unchanged | ConfigOutcome::Stored => None,
    })
}

/// What a config change did.
pub enum ConfigOutcome {
    /// The values were already so: nothing stored, no release.
    Unchanged,
    /// Stored for the next deploy (`--no-restart`, or nothing runs yet).
    Stored,
    /// Released as this version, health-checked and live.
    Released(u32),
}

/// [`change_config`]; `restart: false` (`config set --no-restart`) only
/// stores the change: the next deploy or config change picks it up (a
/// restart keeps the live release's own config).
pub async fn change_config_with(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    set: BTreeMap<String, String>,
    unset: Vec<String>,
    restart: bool,
    progress: &Progress,
) -> Result<ConfigOutcome> {
    for k in set.keys().chain(unset.iter()) {
        names::check_config_key(k)?;
    }
    if set.values().any(|v| v.len() > 32 * 1024 || v.contains('\0')) {
        bail!("config values must be at most 32 KiB and hold no NUL byte");
    }
    let _guard = acquire(p, app, progress).await;
    let (mut config, live) = p
        .store
        .call({
            let app = app.clone();
            move |s| Ok((s.config(&app)?, s.live_release(&app)?))
        })
        .await?;
    let before = config.clone();
    for k in &unset {
        config.remove(k);
    }
    config.extend(set.clone());
    if config == before {
        // Setting what is already set is no change: no release, no restart.
        progress.step("config unchanged: no new release");
        return Ok(ConfigOutcome::Unchanged);
    }
    let mut what: Vec<String> = set.keys().map(|k| format!("set {k}")).collect();
    what.extend(unset.iter().map(|k| format!("unset {k}")));
    let what = what.join(", ");
    let Some(live) = live.filter(|_| restart) else {
        // Nothing runs yet, or asked not to restart: the next deploy
        // picks the config up.
        let app2 = app.clone();
        p.store.call(move |s| s.replace_config(&app2, &config)).await?;
        progress.step(&format!("config stored ({what}): the next deploy uses it"));
        p.event(Some(app), actor, "config", &format!("{what} (for the next deploy)"), "ok").await;
        return Ok(ConfigOutcome::Stored);
    };
    let version = new_release_from(p, app, actor, &live, config.clone(), &format!("config: {what}")).await?;
    let progress = &record_output(p, app, version, progress);
    progress.step(&format!("config changed ({what}): releasing v{version}"));
    let started = Instant::now();
    let result = relaunch(p, app, version, progress).await;
    if result.is_ok() {
        let app2 = app.clone();
        p.store.call(move |s| s.replace_config(&app2, &config)).await?;
    }
    finish(p, app, actor, version, false, started, "config", result, progress).await.map(ConfigOutcome::Released)
}

/// Release an earlier version's code and config again, as a new version.
pub async fn rollback(p: &Platform, app: &AppName, actor: &Actor, to: Option<u32>, progress: &Progress) -> Result<u32> {
    let _guard = acquire(p, app, progress).await;
    let releases = p.store.call({
        let app = app.clone();
        move |s| s.releases(&app)
    })
    .await?;
    let live = releases.iter().find(|r| r.status == ReleaseStatus::Live).ok_or_else(|| anyhow!("{app} has no live release to roll back from"))?;
    let target = match to {
        Some(v) => releases.iter().find(|r| r.version == v).ok_or_else(|| anyhow!("{app} has no release v{v}"))?,
        None => releases
            .iter()
            .find(|r| r.version < live.version && r.status == ReleaseStatus::Superseded)
            .ok_or_else(|| anyhow!("{app} has no earlier release to roll back to"))?,
    };
    if target.status == ReleaseStatus::Failed || target.status == ReleaseStatus::Pending {
        bail!("release v{} of {app} never went live; it cannot be rolled back to", target.version);
    }
    if target.version == live.version {
        bail!("v{} is already live", target.version);
    }
    if target.collected || !p.layout.release(app, target.tree).is_dir() {
        bail!(
            "the code of v{} was collected (the server keeps the newest releases on disk, --keep-releases); rebuild it from its commit: slipway deploy {app} --ref {}",
            target.version,
            target.commit
        );
    }
    let version = new_release_from(p, app, actor, target, target.config.clone(), &format!("rollback to v{}", target.version)).await?;
    let progress = &record_output(p, app, version, progress);
    progress.step(&format!("rolling back to v{} as v{version}", target.version));
    let started = Instant::now();
    let result = match begin_switch(p, app, version, &target.commit, &target.git_ref, SwitchKind::Tag).await {
        Ok(()) => relaunch(p, app, version, progress).await,
        Err(e) => Err(e),
    };
    if result.is_ok() {
        let (app2, config) = (app.clone(), target.config.clone());
        p.store.call(move |s| s.replace_config(&app2, &config)).await?;
    }
    let v = finish(p, app, actor, version, false, started, "rollback", result, progress).await?;
    tag(p, app, &target.commit, progress).await;
    end_switch(p, app).await;
    Ok(v)
}

/// Promote the staging app's live build to `live`: run the staging
/// release's `[promote] check` against the staging app, then release the
/// same tree and environment (nothing is rebuilt or reinstalled) with the
/// live app's own config, through the health-checked switch.
pub async fn promote(p: &Platform, staging: &AppName, live: &AppName, actor: &Actor, progress: &Progress) -> Result<u32> {
    if staging == live {
        bail!("an app cannot be promoted to itself");
    }
    // Both apps are locked, in name order, so two promotions never deadlock.
    let (first, second) = if staging < live { (staging, live) } else { (live, staging) };
    let _g1 = acquire(p, first, progress).await;
    let _g2 = acquire(p, second, progress).await;
    let started = Instant::now();
    let from = live_release(p, staging).await?.ok_or_else(|| anyhow!("{staging} has no live release to promote"))?;
    let from_tree = p.layout.release(staging, from.tree);
    let manifest = Manifest::load(&from_tree)?;
    let env = release_env(p, staging, &from);
    match &manifest.promote_check {
        Some(check) => {
            let (url, host) = target_url(p, staging).await;
            progress.step(&format!("promote check against {url}: {check}"));
            let mut vars = process_env(p, staging, &from, env.as_ref(), None);
            vars.push(("TARGET_PUBLIC_URL".into(), p.app_url(staging)));
            vars.push(("TARGET_URL".into(), url));
            vars.push(("TARGET_HOST".into(), host));
            run_step(p, staging, check, &from_tree, &vars, progress).await.context("promote check failed: nothing was promoted")?;
        }
        None => progress.info("no [promote] check in slipway.toml: promoting without one"),
    }

    check_free_space(p.layout.root())?;
    ensure_app_dirs(p, live).await?;
    let live_now = live_release(p, live).await?;
    let branch = live_now
        .as_ref()
        .map(|r| r.git_ref.clone())
        .filter(|r| r.starts_with("refs/heads/"))
        .unwrap_or_else(|| "refs/heads/main".into());
    let config = p.store.call({
        let live = live.clone();
        move |s| s.config(&live)
    })
    .await?;
    let version = p
        .store
        .call({
            let description = format!("promote {staging} v{}", from.version);
            let r = Release::pending(live.as_str(), 0, &from.commit, &branch, from.env_key.clone(), config, &description, &actor.0);
            move |s| s.begin_release(&r)
        })
        .await?;
    let progress = &record_output(p, live, version, progress);
    progress.step(&format!("promoting {staging} v{} ({}) to {live} as v{version}", from.version, &from.commit[..from.commit.len().min(8)]));
    let result = async {
        let tree = p.layout.release(live, version);
        link_tree(&from_tree, &tree).await?;
        // Staging's environment now serves live too, as live's user.
        if let (Some(env), Some(user)) = (&env, p.user_of(live)) {
            crate::build::open_to(env, user)?;
        }
        // The copied tree's storage links name staging's storage.
        crate::storage::mount(&p.layout, live, &tree, &manifest.storage, p.user_of(live)).await?;
        // The live repo gets the commits first (under a scratch ref), so a
        // failure below leaves its branch untouched.
        git::fetch_commit(&p.layout.repo(staging), &p.layout.repo(live), &from.commit).await?;
        // Containers (docker track): staging's image, under live's name,
        // before anything of live's runs in it (its release phase first).
        runtime::container::prepare_promoted(&p.images, &p.layout, staging, &from_tree, live, &tree, &manifest, progress).await?;
        promote_release_phase(p, live, version, &tree, &manifest, env.as_ref(), progress).await?;
        begin_switch(p, live, version, &from.commit, &branch, SwitchKind::MoveRef).await?;
        relaunch(p, live, version, progress).await
    }
    .await;
    let v = finish(p, live, actor, version, true, started, "promote", result, progress).await?;
    become_promotion_source(p, staging, progress).await;
    if let Err(e) = git::set_ref(&p.layout.repo(live), &branch, &from.commit).await {
        progress.info(&format!("could not move {branch}: {e:#}"));
    }
    tag(p, live, &from.commit, progress).await;
    end_switch(p, live).await;
    Ok(v)
}

/// The target's own release phase gates a promotion as it gates a push:
/// the target's config (its database), the target's user, before its switch.
async fn promote_release_phase(
    p: &Platform,
    live: &AppName,
    version: u32,
    tree: &Path,
    manifest: &Manifest,
    env: Option<&Environment>,
    progress: &Progress,
) -> Result<()> {
    if manifest.release_command.is_none() {
        return Ok(());
    }
    let release = p
        .store
        .call({
            let live = live.clone();
            move |s| s.release(&live, version)
        })
        .await?
        .ok_or_else(|| anyhow!("release v{version} vanished"))?;
    let step_env = process_env(p, live, &release, env, None);
    release_phase(p, live, tree, manifest, &step_env, progress).await
}

/// Where a promote check reaches the staging app, always through slipway's
/// proxy (routing, static files and headers as a visitor gets them): its
/// public URL when the name resolves from here; otherwise the proxy on
/// loopback, to be sent `Host: TARGET_HOST` (the default `localhost`
/// domain does not resolve for most programs).
async fn target_url(p: &Platform, app: &AppName) -> (String, String) {
    let host = p.app_host(app);
    if tokio::net::lookup_host((host.as_str(), p.http_port)).await.is_ok() {
        return (p.app_url(app), host);
    }
    (format!("http://127.0.0.1:{}/", p.http_port), host)
}

/// A copy of an immutable release tree that shares its files (hard links):
/// promotion reuses the build instead of copying it.
async fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let out = tokio::process::Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(to)
        .output()
        .await
        .context("running cp")?;
    if !out.status.success() {
        bail!("copying the release tree: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Start fresh processes of the live release (health-checked, switched):
/// all of them, or those of one type.
pub async fn restart(p: &Platform, app: &AppName, actor: &Actor, ptype: Option<&str>, progress: &Progress) -> Result<()> {
    let _guard = acquire(p, app, progress).await;
    let live = live_release(p, app).await?.ok_or_else(|| anyhow!("{app} has no live release"))?;
    let r = match ptype {
        _ if p.on_swarm(app).await => swarm::restart(p, app, &live, ptype, progress).await,
        None => {
            progress.step(&format!("restarting v{}", live.version));
            relaunch(p, app, live.version, progress).await
        }
        Some(t) => restart_type(p, app, &live, t, progress).await,
    };
    let what = match ptype {
        Some(t) => format!("v{} {t}", live.version),
        None => format!("v{}", live.version),
    };
    p.event(Some(app), actor, "restart", &what, outcome(&r)).await;
    r
}

/// Replace the instances of one type with fresh ones of the same release:
/// new web instances serve only once healthy, then the old are drained.
async fn restart_type(p: &Platform, app: &AppName, live: &Release, ptype: &str, progress: &Progress) -> Result<()> {
    let manifest = Manifest::load(&p.layout.release(app, live.tree))?;
    let spec = manifest.process(ptype).ok_or_else(|| anyhow!("{app} has no process type {ptype:?} in its Procfile"))?;
    let old: Vec<Arc<Instance>> = p.supervisor.instances(app.as_str()).into_iter().filter(|i| i.spec.ptype == ptype).collect();
    let mut indexes: Vec<u32> = old.iter().map(|i| i.spec.index).collect();
    if indexes.is_empty() {
        indexes.push(1);
    }
    ensure_app_dirs(p, app).await?;
    let env = release_env(p, app, live);
    progress.step(&format!("restarting {} {ptype} of v{}", indexes.len(), live.version));
    let from_current = spec.reload != Reload::Replace;
    let new = start_type(p, app, live, spec, &indexes, env.as_ref(), &manifest, from_current, progress).await?;
    p.supervisor.remove(app.as_str(), &old);
    p.supervisor.adopt(app.as_str(), new.clone());
    if ptype == "web" {
        let gone = p.proxy.upstreams(app.as_str());
        p.proxy.set_upstreams(app.as_str(), new.iter().filter_map(upstream_of).collect());
        p.proxy.drain(&gone, DRAIN_TIMEOUT).await;
    }
    stop_all(old).await;
    Ok(())
}

/// Stop all of an app's processes; it answers 503 until started or
/// deployed again, also across daemon restarts.
pub async fn stop(p: &Platform, app: &AppName, actor: &Actor) -> Result<()> {
    let _guard = p.app_lock(app).lock_owned().await;
    let a = app.clone();
    p.store.call(move |s| s.set_stopped(&a, true)).await?;
    if p.on_swarm(app).await {
        swarm::stop(p, app).await?;
    }
    p.proxy.set_upstreams(app.as_str(), Vec::new());
    stop_all(p.supervisor.take_all(app.as_str())).await;
    // process track: and whatever escaped its process group (setsid).
    p.kill_app_processes(app).await;
    p.event(Some(app), actor, "stop", "", "ok").await;
    Ok(())
}

/// Change how many instances of each type run, without restarting the
/// others. New web instances serve only once healthy; removed ones are
/// taken out of the route, drained, then stopped.
pub async fn scale(p: &Platform, app: &AppName, actor: &Actor, counts: BTreeMap<String, u32>, progress: &Progress) -> Result<()> {
    let _guard = acquire(p, app, progress).await;
    let live = live_release(p, app).await?.ok_or_else(|| anyhow!("{app} has no live release to scale"))?;
    let dir = p.layout.release(app, live.tree);
    let manifest = Manifest::load(&dir)?;
    for (t, n) in &counts {
        if manifest.process(t).is_none() {
            bail!("{app} has no process type {t:?} in its Procfile");
        }
        if *n > MAX_SCALE {
            bail!("scale {t}={n} is above the limit of {MAX_SCALE}");
        }
    }
    let a = app.clone();
    let mut wanted = p.store.call(move |s| s.scale(&a)).await?;
    wanted.extend(counts.iter().map(|(t, n)| (t.clone(), *n)));
    check_instance_total(&manifest, &wanted)?;
    if p.on_swarm(app).await {
        // The services take the new counts (replicas change: no rolling).
        for (ptype, &want) in &counts {
            let (app2, t2) = (app.clone(), ptype.clone());
            p.store.call(move |s| s.set_scale(&app2, &t2, want)).await?;
        }
        let r = relaunch(p, app, live.version, progress).await;
        let what = counts.iter().map(|(t, n)| format!("{t}={n}")).collect::<Vec<_>>().join(" ");
        p.event(Some(app), actor, "scale", &what, outcome(&r)).await;
        return r;
    }
    let env = release_env(p, app, &live);
    for (ptype, &want) in &counts {
        let spec = manifest.process(ptype).context("checked above")?;
        let current: Vec<Arc<Instance>> =
            p.supervisor.instances(app.as_str()).into_iter().filter(|i| &i.spec.ptype == ptype).collect();
        let have = current.len() as u32;
        if want > have {
            let used: Vec<u32> = current.iter().map(|i| i.spec.index).collect();
            let indexes: Vec<u32> = (1..).filter(|i| !used.contains(i)).take((want - have) as usize).collect();
            progress.step(&format!("starting {} more {ptype}", want - have));
            let from_current = spec.reload != Reload::Replace;
            let started = start_type(p, app, &live, spec, &indexes, env.as_ref(), &manifest, from_current, progress).await?;
            p.supervisor.adopt(app.as_str(), started.clone());
            if ptype == "web" {
                let mut ups = p.proxy.upstreams(app.as_str());
                ups.extend(started.iter().filter_map(upstream_of));
                p.proxy.set_upstreams(app.as_str(), ups);
            }
        } else if want < have {
            let mut sorted = current;
            sorted.sort_by_key(|i| std::cmp::Reverse(i.spec.index));
            let remove: Vec<Arc<Instance>> = sorted.into_iter().take((have - want) as usize).collect();
            progress.step(&format!("stopping {} {ptype}", have - want));
            let ports: Vec<u16> = remove.iter().filter_map(|i| i.spec.port).collect();
            let (gone, kept): (Vec<_>, Vec<_>) =
                p.proxy.upstreams(app.as_str()).into_iter().partition(|u| ports.contains(&u.addr().port()));
            p.proxy.set_upstreams(app.as_str(), kept);
            p.proxy.drain(&gone, DRAIN_TIMEOUT).await;
            p.supervisor.remove(app.as_str(), &remove);
            stop_all(remove).await;
        }
        let (app2, t2) = (app.clone(), ptype.clone());
        p.store.call(move |s| s.set_scale(&app2, &t2, want)).await?;
    }
    let what = counts.iter().map(|(t, n)| format!("{t}={n}")).collect::<Vec<_>>().join(" ");
    p.event(Some(app), actor, "scale", &what, "ok").await;
    Ok(())
}

/// Releases a stopped daemon left `pending` never went live: record them
/// as failed (interrupted) and remove the trees they made. Runs at start,
/// before any operation can begin.
async fn settle_interrupted(p: &Platform) {
    let pending = match p.store.call(|s| s.pending_releases()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot list pending releases");
            return;
        }
    };
    for r in pending {
        let Ok(app) = AppName::parse(&r.app) else { continue };
        let (a, v) = (app.clone(), r.version);
        if let Err(e) = p.store.call(move |s| s.mark_failed(&a, v, "interrupted: the daemon stopped during it")).await {
            tracing::warn!(app = %app, release = v, error = %format!("{e:#}"), "recording an interrupted release");
            continue;
        }
        // Its own tree only (a config change or rollback shares another's).
        if r.tree == r.version {
            let _ = tokio::fs::remove_dir_all(p.layout.release(&app, r.tree)).await;
        }
        p.logs.app(&app).write("slipway", &format!("v{v} was interrupted when the daemon stopped: recorded as failed, nothing of it kept"));
    }
}

// ---- integrity track (issue 10 #12): one record says what is live ----
//
// A switch writes, in this order: the journal entry (`begin_switch`), the
// `current` link, the proxy's route, the store's live release (one
// transaction: the source of truth for the daemon), then, for a push, git
// moves the ref after the hook, then the tags, then the entry is removed
// (`end_switch`). At start, an entry still there is settled from the store
// and the repo: the store's live release stands (rolled forward: refs and
// tags follow it) unless it came from a push whose ref git never moved
// (the pusher was told it failed; its objects are gone): then the previous
// release is live again (rolled back). `current` and the proxy follow from
// the restore that comes next.

/// Record the switch to `version` before it happens.
async fn begin_switch(p: &Platform, app: &AppName, version: u32, commit: &str, git_ref: &str, kind: SwitchKind) -> Result<()> {
    let previous = live_release(p, app).await?.map(|r| r.version);
    let sw = Switch { app: app.to_string(), version, previous, commit: commit.to_string(), git_ref: git_ref.to_string(), kind };
    p.store.call(move |s| s.begin_switch(&sw)).await.context("recording the switch")
}

/// The repo agrees with the store again: forget the switch. A failure to
/// forget only means the next start checks it again.
async fn end_switch(p: &Platform, app: &AppName) {
    let a = app.clone();
    if let Err(e) = p.store.call(move |s| s.end_switch(&a)).await {
        tracing::warn!(app = %app, error = %format!("{e:#}"), "forgetting a settled switch");
    }
}

/// Test hook, for the crash tests only: `SLIPWAY_TEST_CRASH_AT=POINT` in
/// the daemon's environment aborts it at that point, as `kill -9` there
/// would. Points: `after-switch` (the store names the new release, git has
/// not moved the ref), `before-tag` (git moved it, no tags yet).
fn crash_point(point: &str) {
    if std::env::var("SLIPWAY_TEST_CRASH_AT").is_ok_and(|v| v == point) {
        tracing::error!(point, "SLIPWAY_TEST_CRASH_AT: aborting here (test hook)");
        std::process::abort();
    }
}

/// Settle every switch a stopped daemon left unsettled. Runs at start,
/// before pending releases are settled and apps restored.
async fn reconcile(p: &Platform) {
    let switches = match p.store.call(|s| s.unsettled_switches()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot list unsettled switches");
            return;
        }
    };
    for sw in switches {
        let Ok(app) = AppName::parse(&sw.app) else { continue };
        match reconcile_app(p, &app, &sw).await {
            Ok(detail) => {
                tracing::warn!(app = %app, "{detail}");
                p.logs.app(&app).write("slipway", &detail);
                p.event(Some(&app), &Actor("slipway".into()), "reconcile", &detail, "ok").await;
            }
            Err(e) => {
                let detail = format!("v{}: {e:#}", sw.version);
                tracing::error!(app = %app, "reconciling after a crash failed: {detail}");
                p.event(Some(&app), &Actor("slipway".into()), "reconcile", &detail, "failed").await;
            }
        }
    }
}

async fn reconcile_app(p: &Platform, app: &AppName, sw: &Switch) -> Result<String> {
    let (a, v) = (app.clone(), sw.version);
    let release = p.store.call(move |s| s.release(&a, v)).await?;
    let went_live = release.as_ref().is_some_and(|r| r.status == ReleaseStatus::Live);
    let repo = p.layout.repo(app);
    let short = &sw.commit[..sw.commit.len().min(8)];
    if !went_live {
        // Stopped before the store switched: store and repo still agree on
        // the release before; `current` is put back by the restore.
        end_switch(p, app).await;
        let live = live_release(p, app).await?;
        if live.is_none() {
            remove_current(p, app).await?;
        }
        return Ok(match live {
            Some(l) => format!("rolled back to v{}: v{v} was interrupted before it went live", l.version),
            None => format!("rolled back: v{v} was interrupted before it went live; nothing is live"),
        });
    }
    let confirmed = match sw.kind {
        SwitchKind::Push => git::ref_value(&repo, &sw.git_ref).await.as_deref() == Some(sw.commit.as_str()),
        SwitchKind::MoveRef | SwitchKind::Tag => true,
    };
    if confirmed {
        if sw.kind == SwitchKind::MoveRef {
            git::set_ref(&repo, &sw.git_ref, &sw.commit).await?;
        }
        tag(p, app, &sw.commit, &Progress::default()).await;
        end_switch(p, app).await;
        return Ok(format!("rolled forward to v{v}: {} and LIVE name its commit {short}", short_ref(&sw.git_ref)));
    }
    let (a, previous) = (app.clone(), sw.previous);
    p.store
        .call(move |s| s.roll_back_switch(&a, v, previous, "interrupted: the daemon stopped before git took the push"))
        .await?;
    if release.as_ref().is_some_and(|r| r.tree == r.version) {
        let _ = tokio::fs::remove_dir_all(p.layout.release(app, v)).await;
    }
    let git_ref = short_ref(&sw.git_ref);
    Ok(match previous {
        Some(prev) => format!("rolled back to v{prev}: the push of v{v} ({short}) never updated {git_ref}"),
        None => {
            remove_current(p, app).await?;
            format!("rolled back: the push of v{v} ({short}) never updated {git_ref}; nothing is live")
        }
    })
}

/// No release is live: `current` must not name one.
async fn remove_current(p: &Platform, app: &AppName) -> Result<()> {
    match tokio::fs::remove_file(p.layout.current(app)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("removing the current link"),
        _ => Ok(()),
    }
}

/// Bring every app's live release back up, at daemon start.
pub async fn restore_all(p: &Platform) {
    reconcile(p).await;
    settle_interrupted(p).await;
    let live = match p.store.call(|s| s.live_releases()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot list live releases");
            return;
        }
    };
    let tasks = live.into_iter().map(|r| async move {
        let Ok(app) = AppName::parse(&r.app) else { return };
        p.register_routes(&app).await;
        let _guard = p.app_lock(&app).lock_owned().await;
        // upgrade track: instances a previous daemon left running serve on.
        let leftovers = p.supervisor.take_adoptable(app.as_str());
        if !leftovers.is_empty() {
            match adopt(p, &app, r.version, &leftovers).await {
                Ok(true) => return,
                Ok(false) => p.logs.app(&app).write("slipway", "the running processes do not match the live release's; starting them afresh"),
                Err(e) => p.logs.app(&app).write("slipway", &format!("adopting the running processes failed ({e:#}); starting them afresh")),
            }
            for l in &leftovers {
                runtime::signal_group(l.pid, libc::SIGKILL);
            }
        }
        let a = app.clone();
        if p.store.call(move |s| s.is_stopped(&a)).await.unwrap_or(false) {
            p.proxy.set_upstreams(app.as_str(), Vec::new());
            p.logs.app(&app).write("slipway", "stopped by request: not started (slipway start to run it)");
            return;
        }
        // backup track (issue 14 #6): a restored data dir (or a lost tree) has no release tree: rebuilt from its commit.
        if !p.layout.release(&app, r.tree).is_dir() {
            if let Err(e) = rebuild_tree(p, &app, &r, &Progress::default()).await {
                tracing::error!(app = %app, release = r.version, error = %format!("{e:#}"), "rebuilding the live release failed");
                p.logs.app(&app).write("slipway", &format!("rebuilding v{} from {} failed: {e:#}", r.version, r.commit));
                return;
            }
        }
        if let Err(e) = relaunch(p, &app, r.version, &Progress::default()).await {
            tracing::error!(app = %app, release = r.version, error = %format!("{e:#}"), "restoring app failed");
            p.logs.app(&app).write("slipway", &format!("restoring v{} failed: {e:#}", r.version));
        }
    });
    futures_util::future::join_all(tasks).await;
}

/// backup track (issue 14 #6): make the tree of a live release again from
/// its recorded commit, as its deploy did (archive, `[storage]` links, the
/// environment, the build phase), without the test gate or the release
/// phase: their effects live in the data, which was kept. A restored data
/// dir's data came from other uids: it is handed to the app's user first.
async fn rebuild_tree(p: &Platform, app: &AppName, release: &Release, progress: &Progress) -> Result<()> {
    ensure_app_dirs(p, app).await?;
    if let Some(user) = p.load_user(app).await? {
        crate::storage::give_tree(&p.layout.app_data(app), Some(user))?;
    }
    let dir = p.layout.release(app, release.tree);
    let result = async {
        git::archive(&p.layout.repo(app), &Quarantine(Vec::new()), &release.commit, &dir).await?;
        let manifest = Manifest::load(&dir)?;
        crate::storage::mount(&p.layout, app, &dir, &manifest.storage, p.user_of(app)).await?;
        let in_container = runtime::container::prepare(&p.images, &p.layout, app, &dir, &manifest, None, progress).await?;
        let rt = if in_container { crate::build::Runtime::Generic } else { p.builder.detect(&dir, progress).await? };
        let as_user = p.user_of(app).map(|u| (u, p.layout.cache().join(app.as_str())));
        let prepared = p.unless_shutdown(p.builder.prepare(&dir, &rt, as_user, progress)).await.context("dependency install failed")?;
        let env = match prepared {
            Some((env, _lease)) => {
                let (a, key, version) = (app.clone(), env.key.clone(), release.version);
                p.store.call(move |s| s.set_release_env(&a, version, &key)).await?;
                Some(env)
            }
            None => None,
        };
        let (a, version) = (app.clone(), release.version);
        let release = p.store.call(move |s| s.release(&a, version)).await?.ok_or_else(|| anyhow!("release v{version} vanished"))?;
        let step_env = process_env(p, app, &release, env.as_ref(), None);
        build_phase(p, app, &dir, &manifest, env.as_ref(), &release, &step_env, progress).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    result
}

/// upgrade track: supervise the instances a previous daemon left running
/// for live release `version` instead of starting new ones, and route to
/// them. All or nothing: only when every instance the scale asks for is
/// there (web ones with their port; replace-type ones of this release);
/// otherwise false and the caller starts the release afresh.
async fn adopt(p: &Platform, app: &AppName, version: u32, leftovers: &[crate::supervisor::Leftover]) -> Result<bool> {
    let a = app.clone();
    let Some(release) = p.store.call(move |s| s.release(&a, version)).await? else { return Ok(false) };
    let a = app.clone();
    if p.store.call(move |s| s.is_stopped(&a)).await? {
        return Ok(false);
    }
    let manifest = Manifest::load(&p.layout.release(app, release.tree))?;
    let env = release_env(p, app, &release);
    let a = app.clone();
    let scale = p.store.call(move |s| s.scale(&a)).await?;
    let mut wanted = Vec::new();
    for spec in &manifest.processes {
        for index in 1..=scale.get(&spec.name).copied().unwrap_or(1) {
            let found = leftovers.iter().find(|l| {
                l.ptype == spec.name
                    && l.index == index
                    && (spec.name != "web" || l.port.is_some())
                    && (spec.reload != Reload::Replace || l.release == Some(version))
            });
            let Some(l) = found else { return Ok(false) };
            wanted.push((spec, l));
        }
    }
    if wanted.len() != leftovers.len() {
        return Ok(false);
    }
    let mut adopted = Vec::new();
    for (spec, l) in wanted {
        let from_current = spec.reload != Reload::Replace;
        let inst = InstanceSpec {
            app: app.to_string(),
            release: version,
            ptype: spec.name.clone(),
            index: l.index,
            command: instance_command(p, app, &release, spec, l.index, env.as_ref(), l.port, from_current),
            port: l.port,
            restart: spec.restart,
            stop_signal: spec.stop_signal,
            stop_timeout: spec.stop_timeout,
        };
        adopted.push(p.supervisor.adopt_running(inst, p.logs.app(app), l.pid, l.start));
    }
    p.proxy.set_upstreams(app.as_str(), adopted.iter().filter(|i| i.spec.ptype == "web").filter_map(upstream_of).collect());
    p.supervisor.swap(app.as_str(), adopted);
    Ok(true)
}

/// Stop everything of an app and remove its repo, releases, data and logs.
pub async fn destroy(p: &Platform, app: &AppName, actor: &Actor) -> Result<()> {
    let _guard = p.app_lock(app).lock_owned().await;
    if p.on_swarm(app).await {
        swarm::stop(p, app).await?;
    }
    p.proxy.remove_app(app.as_str());
    if let Some(certs) = p.certs.get() {
        certs.remove_app(app.as_str());
    }
    stop_all(p.supervisor.take_all(app.as_str())).await;
    // process track: and whatever escaped its process group (setsid).
    p.kill_app_processes(app).await;
    let app2 = app.clone();
    p.store.call(move |s| s.delete_app(&app2)).await?;
    for dir in [p.layout.repo(app), p.layout.app(app), p.layout.run().join(app.as_str()), p.layout.cache().join(app.as_str())] {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
    p.logs.forget(app);
    collect_envs(p).await;
    // Containers (docker track): the app's images and network go with it.
    runtime::container::remove_app(&p.images, &p.layout, app).await;
    p.event(Some(app), actor, "destroy", "", "ok").await;
    Ok(())
}

/// The dependency environment a release runs with, opened to the app's
/// user. Idempotent; it also opens environments that a slipway from
/// before access ACLs left world-readable, the first time they are used.
fn release_env(p: &Platform, app: &AppName, release: &Release) -> Option<Environment> {
    let env = release.env_key.as_ref().map(|k| Environment { key: k.clone(), dir: p.layout.env(k) })?;
    if let Some(user) = p.user_of(app) {
        if env.dir.is_dir() {
            if let Err(e) = crate::build::open_to(&env, user) {
                tracing::warn!(app = %app, error = %format!("{e:#}"), "opening the environment to the app's user");
            }
        }
    }
    Some(env)
}

/// Run `cmd` in the release's directory as a one-off, with its env.
pub fn one_off_command(p: &Platform, app: &AppName, release: &Release, cmd: &str) -> ProcessCommand {
    let env = release_env(p, app, release);
    ProcessCommand {
        command: cmd.to_string(),
        cwd: p.layout.release(app, release.tree),
        env: process_env(p, app, release, env.as_ref(), None),
        user: p.user_of(app),
        limits: Default::default(),
        container: p.images.step_placement(&p.layout.release(app, release.tree), "run"),
        cgroup: Some(runtime::cgroup::CgroupName::new(app.as_str(), runtime::cgroup::ONE_OFFS)),
    }
}

// ---- the shared steps ----

/// Start the processes of release `version` (whose tree and env exist),
/// gate on health, switch, drain and stop the old ones.
async fn relaunch(p: &Platform, app: &AppName, version: u32, progress: &Progress) -> Result<()> {
    let release = p
        .store
        .call({
            let app = app.clone();
            move |s| s.release(&app, version)
        })
        .await?
        .ok_or_else(|| anyhow!("release v{version} not found"))?;
    let dir = p.layout.release(app, release.tree);
    let manifest = Manifest::load(&dir)?;
    ensure_app_dirs(p, app).await?;
    // Containers (docker track): the release's image, rebuilt if it was collected.
    runtime::container::prepare(&p.images, &p.layout, app, &dir, &manifest, None, progress).await?;
    let env = release_env(p, app, &release);
    if let Some(env) = &env {
        if !env.dir.is_dir() {
            bail!("the environment of v{version} is gone; redeploy with `slipway deploy {app}`");
        }
    }
    activate(p, app, &release, &manifest, env.as_ref(), progress).await
}

async fn activate(
    p: &Platform,
    app: &AppName,
    release: &Release,
    manifest: &Manifest,
    env: Option<&Environment>,
    progress: &Progress,
) -> Result<()> {
    if p.on_swarm(app).await {
        return swarm::activate(p, app, release, manifest, env, progress).await;
    }
    let scale = p.store.call({
        let app = app.clone();
        move |s| s.scale(&app)
    })
    .await?;
    let count = |t: &str| scale.get(t).copied().unwrap_or(1);
    check_instance_total(manifest, &scale)?;
    let running = p.supervisor.instances(app.as_str());
    let link = p.layout.current(app);
    let tree = p.layout.release(app, release.tree);
    // static track: `[static]` is served from this release's own tree,
    // switched with its upstreams; a bad mount fails before anything changes.
    let statics = crate::proxy::Statics::resolve(&tree, &manifest.statics)?;

    // 1. Gate on health before anything changes. A `replace` web type
    //    starts its new processes beside the old ones; a type that reloads
    //    in place (signal/touch) proves the new release with a canary that
    //    is stopped again: its real processes run from `current`, which
    //    must not move before the check passes.
    let mut new: Vec<Arc<Instance>> = Vec::new();
    let mut reload_in_place: Vec<(Vec<Arc<Instance>>, Reload)> = Vec::new();
    let web = manifest.process("web").filter(|_| count("web") > 0);
    if let Some(web) = web {
        let n = count("web");
        if web.reload == Reload::Replace {
            progress.step(&format!("starting {n} web process{}", plural(n as usize)));
            let indexes: Vec<u32> = (1..=n).collect();
            new = start_type(p, app, release, web, &indexes, env, manifest, false, progress).await?;
        } else {
            progress.step(&format!("checking v{} with a canary web process", release.version));
            let canary = start_type(p, app, release, web, &[0], env, manifest, false, progress).await?;
            stop_all(canary).await;
        }
    }

    // 2. Switch `current`. Replace-type processes run from their own
    //    release directory and do not see it; in-place types are reloaded
    //    onto it below.
    let previous_target = tokio::fs::read_link(&link).await.ok();
    if let Err(e) = switch_current(&link, &tree).await {
        stop_all(new).await;
        return Err(e);
    }
    let mut started_from_current: Vec<Arc<Instance>> = Vec::new();
    for spec in manifest.processes.iter().filter(|s| s.reload != Reload::Replace) {
        let n = count(&spec.name);
        if n == 0 {
            continue;
        }
        let same: Vec<Arc<Instance>> = running.iter().filter(|i| i.spec.ptype == spec.name).cloned().collect();
        if reloadable_in_place(p, app, release, spec, env, &same, n) {
            reload_in_place.push((same, spec.reload.clone()));
            continue;
        }
        // Nothing suitable runs (first deploy, changed command, env or
        // scale): start them fresh, from `current`.
        let indexes: Vec<u32> = (1..=n).collect();
        let result = start_type(p, app, release, spec, &indexes, env, manifest, true, progress).await;
        match result {
            Ok(started) => started_from_current.extend(started),
            Err(e) => {
                stop_all(std::mem::take(&mut started_from_current)).await;
                stop_all(std::mem::take(&mut new)).await;
                if let Some(prev) = &previous_target {
                    let _ = switch_current(&link, prev).await;
                }
                return Err(e);
            }
        }
    }
    new.extend(started_from_current);

    // 3. Traffic and the record. An in-place web type keeps its upstreams.
    let old_upstreams = p.proxy.upstreams(app.as_str());
    let web_in_place = reload_in_place.iter().any(|(insts, _)| insts.iter().any(|i| i.spec.ptype == "web"));
    p.register_routes(app).await;
    if web_in_place {
        p.proxy.set_statics(app.as_str(), statics);
    } else {
        p.proxy.switch(app.as_str(), new.iter().filter(|i| i.spec.ptype == "web").filter_map(upstream_of).collect(), statics);
    }
    let (app2, v) = (app.clone(), release.version);
    let marked = p
        .store
        .call(move |s| {
            s.mark_live(&app2, v)?;
            // Whatever made a release go live (a deploy, a start) ends a stop.
            s.set_stopped(&app2, false)
        })
        .await;
    if let Err(e) = marked {
        // integrity track (issue 10 #4): the store did not switch (a full
        // disk): neither does anything else. Old route, old `current`, and
        // the new processes stopped, none left untracked.
        if !web_in_place {
            p.proxy.set_upstreams(app.as_str(), old_upstreams);
        }
        match &previous_target {
            Some(prev) => {
                let _ = switch_current(&link, prev).await;
            }
            None => {
                let _ = tokio::fs::remove_file(&link).await;
            }
        }
        stop_all(new).await;
        return Err(e.context("recording the switch"));
    }
    progress.step(&format!("switched traffic to v{}", release.version));

    // 4. Reload in place: the masters stay, their workers load `current`.
    //    The switch is done and the canary proved the release, so nothing
    //    here may fail the deploy: a problem is reported, never unwound.
    let mut kept: Vec<Arc<Instance>> = Vec::new();
    for (insts, reload) in reload_in_place {
        for inst in &insts {
            match &reload {
                Reload::Signal(sig) => {
                    progress.step(&format!("reloading {} with signal {sig}", inst.name()));
                    if let Some(pid) = inst.status().pid {
                        runtime::signal_main(pid, *sig);
                    }
                }
                Reload::Touch(path) => {
                    // The app server watches the file in the tree it last
                    // loaded (a cwd is a resolved directory, not the link):
                    // the tree this instance was recorded on, not whatever
                    // directory its process claims.
                    progress.step(&format!("reloading {} by touching {path}", inst.name()));
                    let (a, v) = (app.clone(), inst.status().release);
                    let running_tree = p.store.call(move |s| s.release(&a, v)).await.ok().flatten().map(|r| r.tree);
                    let base = p.layout.release(app, running_tree.unwrap_or(release.tree));
                    if let Err(e) = touch(&base, path).await {
                        progress.info(&format!("could not reload {}: {e:#}; restart it with `slipway restart {app}`", inst.name()));
                    }
                }
                Reload::Replace => {}
            }
            inst.set_release(release.version);
        }
        if let Some(inst) = insts.iter().find(|i| i.spec.ptype == "web") {
            let host = p.app_host(app);
            if let Err(e) = wait_healthy(inst, &host, &manifest.health_path, manifest.health_timeout).await {
                progress.info(&format!("after its reload: {e:#}"));
            }
        }
        kept.extend(insts);
    }

    // 5. The other replace-type processes start now; they take no
    //    traffic, so there is nothing to gate on.
    for spec in manifest.processes.iter().filter(|s| s.name != "web" && s.reload == Reload::Replace) {
        for i in 1..=count(&spec.name) {
            new.push(spawn_instance(p, app, release, spec, i, env, None, false));
        }
    }
    new.extend(kept.iter().cloned());
    let old: Vec<Arc<Instance>> =
        p.supervisor.swap(app.as_str(), new).into_iter().filter(|i| !kept.iter().any(|k| Arc::ptr_eq(k, i))).collect();

    // 6. Drain: in-flight requests to the old processes finish before
    //    they get their stop signal.
    if !old.is_empty() {
        if !web_in_place && !p.proxy.drain(&old_upstreams, DRAIN_TIMEOUT).await {
            progress.info("old processes still busy after 30s: stopping them anyway");
        }
        progress.step(&format!("stopping {} old process{}", old.len(), plural(old.len())));
        stop_old(old, progress).await;
    }
    Ok(())
}

/// Can the running instances of `spec` take the new release by a reload
/// signal or touch? Only when they run exactly what a fresh start would:
/// same command, same environment (but for the release name), same count.
/// A new dependency environment or config needs new processes.
fn reloadable_in_place(
    p: &Platform,
    app: &AppName,
    release: &Release,
    spec: &ProcessSpec,
    env: Option<&Environment>,
    running: &[Arc<Instance>],
    count: u32,
) -> bool {
    if running.len() as u32 != count || running.is_empty() {
        return false;
    }
    running.iter().all(|inst| {
        let st = inst.status();
        let wanted = instance_command(p, app, release, spec, inst.spec.index, env, inst.spec.port, true);
        let strip = |v: &[(String, String)]| -> Vec<(String, String)> {
            v.iter().filter(|(k, _)| k != "SLIPWAY_RELEASE").cloned().collect()
        };
        st.state == State::Running
            && inst.spec.command.command == wanted.command
            && inst.spec.command.cwd == wanted.cwd
            && strip(&inst.spec.command.env) == strip(&wanted.env)
            // A new image needs new containers (docker track); labels name the release, so compare the image only.
            && inst.spec.command.container.as_ref().map(|c| &c.image) == wanted.container.as_ref().map(|c| &c.image)
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "es"
    }
}

/// The reload file `rel` inside the tree `base`. The path comes from a
/// pushed repo: every component must be a real directory and the last a
/// regular file — no symlink anywhere, nothing special.
fn reload_file(base: &Path, rel: &str) -> Result<std::path::PathBuf> {
    let mut path = base.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || *part == "." || *part == ".." {
            bail!("the reload file {rel} must be a plain relative path");
        }
        path.push(part);
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("the reload file {rel} does not exist"))?;
        let last = i + 1 == parts.len();
        let ok = if last { meta.file_type().is_file() } else { meta.file_type().is_dir() };
        if !ok {
            bail!("{rel} must be a regular file, not a symlink, in the release");
        }
    }
    Ok(path)
}

/// Set the reload file's times to now, as `touch` does (uWSGI watches the
/// mtime): never through a symlink, never blocking on a FIFO, never
/// creating anything.
async fn touch(base: &Path, rel: &str) -> Result<()> {
    let (base, rel) = (base.to_path_buf(), rel.to_string());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let path = reload_file(&base, &rel)?;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.set_modified(std::time::SystemTime::now()).context("touching the reload file")
    })
    .await
    .context("touch task")?
}

/// Start instances of one type; for `web`, wait until each answers its
/// health check, or fail (stopping them) when one crashes or times out.
#[allow(clippy::too_many_arguments)]
async fn start_type(
    p: &Platform,
    app: &AppName,
    release: &Release,
    spec: &ProcessSpec,
    indexes: &[u32],
    env: Option<&Environment>,
    manifest: &Manifest,
    from_current: bool,
    progress: &Progress,
) -> Result<Vec<Arc<Instance>>> {
    let mut started = Vec::new();
    for &i in indexes {
        let port = if spec.name == "web" { Some(free_port().context("finding a free port")?) } else { None };
        started.push(spawn_instance(p, app, release, spec, i, env, port, from_current));
    }
    if spec.name != "web" {
        return Ok(started);
    }
    let host = p.app_host(app);
    let checks = started.iter().map(|inst| wait_healthy(inst, &host, &manifest.health_path, manifest.health_timeout));
    let results = futures_util::future::join_all(checks).await;
    if let Some(err) = results.into_iter().find_map(|r| r.err()) {
        stop_all(started).await;
        return Err(err);
    }
    progress.info(&format!("healthy: {} answered {} on {}", host, manifest.health_path, started.len()));
    Ok(started)
}

#[allow(clippy::too_many_arguments)]
fn spawn_instance(
    p: &Platform,
    app: &AppName,
    release: &Release,
    spec: &ProcessSpec,
    index: u32,
    env: Option<&Environment>,
    port: Option<u16>,
    from_current: bool,
) -> Arc<Instance> {
    p.supervisor.start(
        InstanceSpec {
            app: app.to_string(),
            release: release.version,
            ptype: spec.name.clone(),
            index,
            command: instance_command(p, app, release, spec, index, env, port, from_current),
            port,
            restart: spec.restart,
            stop_signal: spec.stop_signal,
            stop_timeout: spec.stop_timeout,
        },
        p.logs.app(app),
    )
}

/// What an instance runs. Types that reload in place run from `current`
/// (with `PWD` naming the link, which gunicorn keeps as its directory), so
/// a reload picks up whatever release `current` points at by then.
#[allow(clippy::too_many_arguments)]
fn instance_command(
    p: &Platform,
    app: &AppName,
    release: &Release,
    spec: &ProcessSpec,
    index: u32,
    env: Option<&Environment>,
    port: Option<u16>,
    from_current: bool,
) -> ProcessCommand {
    let mut vars = process_env(p, app, release, env, port);
    let cwd = if from_current {
        let link = p.layout.current(app);
        vars.push(("PWD".into(), link.display().to_string()));
        if matches!(spec.reload, Reload::Touch(_)) {
            // uWSGI's own option (read from the environment) to chdir to
            // this path on every (re)load: the link, so a touch reload
            // loads whichever release `current` names by then.
            vars.push(("UWSGI_CHDIR".into(), link.display().to_string()));
        }
        link
    } else {
        p.layout.release(app, release.tree)
    };
    let container = p.images.placement(&p.layout.release(app, release.tree), release.version, spec);
    ProcessCommand { command: spec.command.clone(), cwd, env: vars, user: p.user_of(app),
        container,
        limits: spec.limits.clone(),
        cgroup: Some(runtime::cgroup::CgroupName::instance(app.as_str(), &spec.name, index, release.version)),
    }
}

async fn wait_healthy(inst: &Instance, host: &str, path: &str, timeout: Duration) -> Result<()> {
    let port = inst.spec.port.context("web process without a port")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        let st = inst.status();
        if st.restarts > 0 || matches!(st.state, State::Exited | State::Crashed | State::Stopped | State::Backoff) {
            let exit = st.last_exit.unwrap_or_else(|| "an error".into());
            return Err(anyhow!(
                "{} crashed on boot (exited with {exit}); its last output:\n{}",
                inst.name(),
                indent(&inst.tail())
            ));
        }
        match proxy::health_check(addr, host, path, "http", Duration::from_secs(5)).await {
            Ok(proxy::Health::Healthy) => return Ok(()),
            Ok(proxy::Health::Unhealthy(why)) => last = why,
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            let tail = inst.tail();
            if last.contains("Connection refused") {
                last = nothing_listens(port, &tail);
            }
            return Err(anyhow!(
                "{} did not pass its health check (GET {path}, Host {host}) within {}s: {last}; its last output:\n{}",
                inst.name(),
                timeout.as_secs(),
                indent(&tail)
            ));
        }
        // Most app servers bind within a few hundred ms; a short interval
        // keeps a code-only deploy close to the app's own boot time.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// The environment every process and build step of a release gets.
fn process_env(p: &Platform, app: &AppName, release: &Release, env: Option<&Environment>, port: Option<u16>) -> Vec<(String, String)> {
    let data = p.layout.app_data(app);
    let mut vars: Vec<(String, String)> = vec![
        ("PATH".into(), p.builder.base_path().to_string()),
        ("HOME".into(), data.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("PYTHONUNBUFFERED".into(), "1".into()),
        // Bytecode caches go to the app's data dir: the release tree stays
        // exactly what was pushed, and caching still works.
        ("PYTHONPYCACHEPREFIX".into(), data.join(".cache/pycache").display().to_string()),
    ];
    if let Some(env) = env {
        vars.extend(env.vars(p.builder.base_path()));
    }
    // Config may override the defaults above, never the slipway-owned
    // variables below.
    vars.extend(release.config.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.push(("SLIPWAY_APP".into(), app.to_string()));
    vars.push(("SLIPWAY_RELEASE".into(), format!("v{}", release.version)));
    vars.push(("SLIPWAY_DATA_DIR".into(), data.display().to_string()));
    if let Some(port) = port {
        vars.push(("PORT".into(), port.to_string()));
    }
    // Later entries win: keep only the last of each name.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(String, String)> = vars.into_iter().rev().filter(|(k, _)| seen.insert(k.clone())).collect();
    out.reverse();
    out
}

async fn run_step(p: &Platform, app: &AppName, cmd: &str, dir: &Path, env: &[(String, String)], progress: &Progress) -> Result<()> {
    let container = p.images.step_placement(dir, "step");
    let pc = ProcessCommand { command: cmd.to_string(), cwd: dir.to_path_buf(), env: env.to_vec(), user: p.user_of(app),
        container,
        limits: Default::default(),
        cgroup: Some(runtime::cgroup::CgroupName::new(app.as_str(), runtime::cgroup::STEPS)),
    };
    runtime::run_to_end(&pc, progress, STEP_TIMEOUT).await
}

/// The same progress, also kept as release `version`'s deploy output
/// (`slipway logs APP --deploy vN`).
fn record_output(p: &Platform, app: &AppName, version: u32, progress: &Progress) -> Progress {
    progress.recording(crate::deploy_output::Recorder::create(p.layout.deploy_output(app, version)))
}

async fn new_release_from(p: &Platform, app: &AppName, actor: &Actor, base: &Release, config: BTreeMap<String, String>, description: &str) -> Result<u32> {
    let r = Release::pending(app.as_str(), base.tree, &base.commit, &base.git_ref, base.env_key.clone(), config, description, &actor.0);
    p.store.call(move |s| s.begin_release(&r)).await
}

/// Record the outcome of an operation that made release `version`: on
/// success print the summary and collect old releases; on failure remove
/// the release (its tree too, when `own_tree`) so nothing half-made stays.
#[allow(clippy::too_many_arguments)]
async fn finish(
    p: &Platform,
    app: &AppName,
    actor: &Actor,
    version: u32,
    own_tree: bool,
    started: Instant,
    action: &str,
    result: Result<()>,
    progress: &Progress,
) -> Result<u32> {
    let log = p.logs.app(app);
    // Read once, before a failure may delete it: what changed, its commit,
    // and whether it went live.
    let a = app.clone();
    let record = p.store.call(move |s| s.release(&a, version)).await.ok().flatten();
    let commit = record.as_ref().map(|r| r.commit.as_str());
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    crate::tally::operation(app.as_str(), action, outcome, started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            let secs = started.elapsed().as_secs_f64();
            progress.step(&format!("v{version} is live at {} ({secs:.1}s)", p.app_url(app)));
            log.write("slipway", &format!("{action}: v{version} is live ({secs:.1}s)"));
            // The release's description says what changed (a commit's
            // subject, config keys set, the version rolled back to).
            let detail = match record.as_ref().map(|r| r.description.as_str()) {
                Some(d) if !d.is_empty() => format!("v{version} {d}"),
                _ => format!("v{version}"),
            };
            p.event(Some(app), actor, action, &detail, "ok").await;
            p.notify(app, actor, action, version, commit, "ok", "").await;
            if let Err(e) = collect_releases(p, app).await {
                tracing::warn!(app = %app, error = %format!("{e:#}"), "collecting old releases failed");
            }
            Ok(version)
        }
        Err(e) => {
            // Said once (issue 15 #6): what the client has not seen yet
            // (a crashed process's last output), then the cause in one
            // line, which the client prints as the failure (`!` in a push).
            let (cause, details) = explain_failure(&e);
            // integrity track (issue 10 #4): a full disk is said as such.
            let cause = if disk_full(&e) { format!("the server's data disk is full (free some space and push again): {cause}") } else { cause };
            if !details.is_empty() {
                progress.step(&format!("{action} failed; the last output:"));
                for d in &details {
                    progress.output(d.trim_start());
                }
            }
            progress.info("nothing changed: the previous release keeps serving");
            progress.record_failure(&format!("{DeployFailed}: {cause}"));
            let reason = cause.clone();
            log.write("slipway", &format!("{action} of v{version} failed: {}", reason.lines().next().unwrap_or("")));
            // A failure after the switch must not take the live release's
            // record or tree with it.
            let went_live = record.as_ref().is_some_and(|r| r.status == ReleaseStatus::Live);
            if !went_live {
                // The tree first: on a full disk, the space it frees lets
                // the database write that follows succeed. The record stays,
                // `failed` with its reason (history is whole, numbers are
                // never reused).
                if own_tree {
                    let _ = tokio::fs::remove_dir_all(p.layout.release(app, version)).await;
                }
                let (app2, why) = (app.clone(), reason.lines().next().unwrap_or("").to_string());
                if let Err(e) = p.store.call(move |s| s.mark_failed(&app2, version, &why)).await {
                    tracing::warn!(app = %app, release = version, error = %format!("{e:#}"), "recording a failed release");
                }
                // Nothing of it went live: there is nothing to settle.
                end_switch(p, app).await;
            }
            collect_envs(p).await;
            let first = reason.lines().next().unwrap_or("");
            p.event(Some(app), actor, action, &format!("v{version}: {first}"), "failed").await;
            p.notify(app, actor, action, version, commit, "failed", first).await;
            tracing::info!(app = %app, release = version, error = %format!("{e:#}"), "{action} failed");
            Err(anyhow!("{cause}").context(DeployFailed))
        }
    }
}

/// Did the operation fail because a file system was full (ENOSPC, EDQUOT,
/// or SQLite's "database or disk is full"), here or in a step's output?
fn disk_full(e: &anyhow::Error) -> bool {
    let io = e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)));
    let sqlite = e.chain().filter_map(|c| c.downcast_ref::<rusqlite::Error>()).any(|s| s.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull));
    let tail = e.chain().filter_map(|c| c.downcast_ref::<StepError>()).any(|s| s.tail().iter().any(|l| l.contains("No space left on device")));
    io || sqlite || tail || format!("{e:#}").contains("No space left on device")
}

/// A failure as the client should read it: the cause in words, on one
/// line, with what to do; and the lines it has not seen yet (a crashed
/// process's last output), to show once before it. A failed step's output
/// was streamed as it ran and is not repeated; its command line (for the
/// dependency install, an internal one naming server paths) is not shown:
/// the step's heading above says which step it was.
fn explain_failure(e: &anyhow::Error) -> (String, Vec<String>) {
    if let Some(step) = e.chain().find_map(|c| c.downcast_ref::<StepError>()) {
        let contexts: Vec<String> = e
            .chain()
            .take_while(|c| c.downcast_ref::<StepError>().is_none())
            .map(|c| c.to_string().lines().next().unwrap_or("").to_string())
            .collect();
        let what = match step {
            StepError::Failed { status, .. } => format!("the step exited with {status}"),
            StepError::TimedOut { timeout, .. } => format!("the step did not finish within {}s", timeout.as_secs()),
        };
        let mut cause = contexts.join(": ");
        if !cause.is_empty() {
            cause.push_str(": ");
        }
        cause.push_str(&what);
        cause.push_str("; its output is above");
        if let Some(hint) = contexts.first().and_then(|c| step_hint(c)) {
            cause.push_str(&format!(" ({hint})"));
        }
        return (cause, Vec::new());
    }
    let text = format!("{e:#}");
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let cause = first.strip_suffix("; its last output:").unwrap_or(first).trim_end_matches(':').to_string();
    (cause, lines.map(str::to_string).collect())
}

/// What to do when a step of this kind failed.
fn step_hint(context: &str) -> Option<&'static str> {
    Some(match context {
        c if c.starts_with("dependency install failed") => "fix the dependency files, e.g. requirements.txt or pyproject.toml, and push again",
        c if c.starts_with("test gate failed") => "the tests failed: fix them, or [test] command in slipway.toml, and push again",
        c if c.starts_with("build phase failed") => "fix the build ([build] command in slipway.toml) and push again",
        c if c.starts_with("release phase failed") => "fix the release command (Procfile `release:`) and push again",
        c if c.starts_with("promote check failed") => "the check ([promote] check in slipway.toml) refused the staging app",
        _ => return None,
    })
}

/// A health check that never connected: nobody listens on `$PORT`. Says
/// the port and, when the process printed another one it listens on,
/// that one (the usual mistake: a hard-coded port).
fn nothing_listens(port: u16, tail: &[String]) -> String {
    let mut printed = None;
    for line in tail {
        for marker in ["127.0.0.1:", "0.0.0.0:", "localhost:", "[::]:", "port "] {
            for (i, _) in line.match_indices(marker) {
                let digits: String = line[i + marker.len()..].chars().take_while(char::is_ascii_digit).collect();
                if let Ok(n) = digits.parse::<u16>() {
                    if n != port && n != 0 {
                        printed = Some(n);
                    }
                }
            }
        }
    }
    let printed = printed.map(|n| format!(" (it printed port {n})")).unwrap_or_default();
    format!("nothing listens on $PORT={port}: bind to 127.0.0.1:$PORT{printed}")
}

/// Keep the newest releases (and the live one) on disk, remove the rest
/// and the environments nothing uses any more.
async fn collect_releases(p: &Platform, app: &AppName) -> Result<()> {
    let keep = p.keep_releases;
    let releases = p.store.call({
        let app = app.clone();
        move |s| s.releases(&app)
    })
    .await?;
    let kept: Vec<&Release> = releases.iter().filter(|r| r.status != ReleaseStatus::Failed && !r.collected).take(keep).collect();
    let kept_trees: Vec<u32> = kept.iter().map(|r| r.tree).collect();
    // The records stay (history is whole); their trees and images go.
    let drop_versions: Vec<u32> = releases
        .iter()
        .filter(|r| !kept.iter().any(|k| k.version == r.version))
        .filter(|r| matches!(r.status, ReleaseStatus::Superseded) && !r.collected)
        .map(|r| r.version)
        .collect();
    if !drop_versions.is_empty() {
        let app2 = app.clone();
        p.store.call(move |s| s.mark_collected(&app2, &drop_versions)).await?;
    }
    if let Some(newest) = releases.first().map(|r| r.version) {
        crate::deploy_output::prune(&p.layout.deploy_outputs(app), newest);
    }
    if let Ok(mut entries) = tokio::fs::read_dir(p.layout.releases(app)).await {
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().to_string();
            // `vN` and its image record `vN.image` go together.
            let record = name.ends_with(".image");
            let tree: Option<u32> = name.trim_end_matches(".image").strip_prefix('v').and_then(|n| n.parse().ok());
            if let Some(t) = tree {
                if !kept_trees.contains(&t) && !releases.iter().any(|r| r.tree == t && r.status == ReleaseStatus::Pending) {
                    let _ = if record { tokio::fs::remove_file(e.path()).await } else { tokio::fs::remove_dir_all(e.path()).await };
                }
            }
        }
    }
    collect_envs(p).await;
    // Containers (docker track): images no kept release uses go with their releases.
    runtime::container::collect_images(&p.images, &p.layout, app).await;
    Ok(())
}

async fn collect_envs(p: &Platform) {
    let in_use = match p.store.call(|s| s.env_keys_in_use()).await {
        Ok(k) => k,
        Err(_) => return,
    };
    let builder = p.builder.clone();
    let collected = tokio::task::spawn_blocking(move || builder.collect(&in_use)).await;
    let Ok(collected) = collected else { return };
    match collected {
        Ok(removed) if !removed.is_empty() => tracing::info!(count = removed.len(), "collected unused environments"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "collecting environments failed"),
    }
}

/// Point `link` at `target` atomically: a new link beside it, renamed over.
async fn switch_current(link: &Path, target: &Path) -> Result<()> {
    let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
    let _ = tokio::fs::remove_file(&tmp).await;
    tokio::fs::symlink(target, &tmp).await.context("creating current link")?;
    tokio::fs::rename(&tmp, link).await.context("switching current link")?;
    Ok(())
}

/// The app's persistent data dir (`SLIPWAY_DATA_DIR`, also `HOME`) and
/// releases dir: made before any step can need them. With isolation, the
/// data dir and the build cache belong to the app's user alone, and the
/// releases are readable by its group alone.
pub async fn ensure_app_dirs(p: &Platform, app: &AppName) -> Result<()> {
    let cache = p.layout.cache().join(app.as_str());
    for dir in [p.layout.app_data(app), p.layout.releases(app), cache.clone()] {
        tokio::fs::create_dir_all(&dir).await.with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Some(user) = p.load_user(app).await? {
        use std::os::unix::fs::PermissionsExt;
        crate::build::chown(&p.layout.app_data(app), user, 0o700)?;
        crate::build::chown(&cache, user, 0o700)?;
        let releases = p.layout.releases(app);
        std::os::unix::fs::chown(&releases, Some(0), Some(user.gid)).context("chown releases")?;
        std::fs::set_permissions(&releases, std::fs::Permissions::from_mode(0o750)).context("chmod releases")?;
        std::fs::set_permissions(p.layout.app(app), std::fs::Permissions::from_mode(0o711)).context("chmod app dir")?;
    }
    Ok(())
}

async fn stop_all(instances: Vec<Arc<Instance>>) {
    futures_util::future::join_all(instances.iter().map(|i| i.stop())).await;
    prune_cgroups(&instances);
}

/// The stopped instances' cgroups go with them (one per instance).
fn prune_cgroups(instances: &[Arc<Instance>]) {
    let mut apps: Vec<&str> = instances.iter().map(|i| i.spec.app.as_str()).collect();
    apps.dedup();
    for app in apps {
        runtime::cgroup::prune_app(app);
    }
}

/// Stop the old processes of a switch, saying in the operation's output
/// which ones ignored their stop signal (each one cost its stop timeout).
async fn stop_old(instances: Vec<Arc<Instance>>, progress: &Progress) {
    for what in futures_util::future::join_all(instances.iter().map(|i| i.stop())).await.into_iter().flatten() {
        progress.info(&what);
    }
    prune_cgroups(&instances);
}

fn upstream_of(inst: &Arc<Instance>) -> Option<Arc<Upstream>> {
    // proxy track (issue 10 #2): the proxy sends traffic only to a socket the app's own user holds.
    let owner = inst.spec.command.listener_owner();
    inst.spec.port.map(|port| Upstream::owned(SocketAddr::from(([127, 0, 0, 1], port)), owner))
}

/// Take the app's lock, saying so when another operation holds it.
async fn acquire(p: &Platform, app: &AppName, progress: &Progress) -> AppGuard {
    let lock = p.app_lock(app);
    match lock.clone().try_lock_owned() {
        Ok(g) => g,
        Err(_) => {
            progress.step(&format!("another operation on {app} is in progress; waiting for it to finish"));
            lock.lock_owned().await
        }
    }
}

async fn live_release(p: &Platform, app: &AppName) -> Result<Option<Release>> {
    let app = app.clone();
    p.store.call(move |s| s.live_release(&app)).await
}

async fn manifest_at(repo: &Path, q: &Quarantine, commit: &str) -> Result<Manifest> {
    let read = |f: &'static str| async move {
        git::read_file(repo, q, commit, f, 64 * 1024)
            .await
            .map(|b| b.map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default())
    };
    let procfile = read("Procfile").await?;
    let toml = read("slipway.toml").await?;
    Ok(Manifest::parse(&procfile, &toml)?)
}

fn deployable(policy: &DeployPolicy, refname: &str, repo_has_main: bool) -> bool {
    match policy {
        DeployPolicy::Branch(Some(b)) => refname == format!("refs/heads/{b}"),
        DeployPolicy::Branch(None) => refname == "refs/heads/main" || (refname == "refs/heads/master" && !repo_has_main),
        DeployPolicy::Refs(patterns) => patterns.iter().any(|pat| manifest::ref_matches(pat, refname)),
    }
}

fn describe_policy(policy: &DeployPolicy) -> String {
    match policy {
        DeployPolicy::Branch(Some(b)) => format!("this app deploys branch {b}"),
        DeployPolicy::Branch(None) => "this app deploys branch main (or master)".into(),
        DeployPolicy::Refs(p) => format!("this app deploys {}", p.join(", ")),
    }
}

fn short_ref(r: &str) -> &str {
    r.strip_prefix("refs/heads/").or_else(|| r.strip_prefix("refs/tags/")).unwrap_or(r)
}

fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|c| c.is_ascii_hexdigit())
}

fn indent(lines: &[String]) -> String {
    lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

fn outcome<T>(r: &Result<T>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "failed"
    }
}

/// Web processes get ports from here up to the kernel's ephemeral range.
const APP_PORTS_FROM: u16 = 20_000;

/// A free TCP port for a new web process, outside the kernel's ephemeral
/// range (`ip_local_port_range`). A port the kernel hands out with
/// `bind(0)` is also what it gives outgoing connections: under many
/// client connections (the proxy's own pool, a flood from another host
/// address) one of them took the port between this check and the app's
/// `bind`, and the deploy failed with EADDRINUSE. Ports are taken in turn
/// (a shared cursor, so two deploys at once try different ones) and each
/// is checked on the wildcard address, as the app may bind 0.0.0.0.
fn free_port() -> std::io::Result<u16> {
    static CURSOR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Servers sharing a host start their turns apart.
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = SEED.get_or_init(rand::random::<u32>);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    let span = u32::from(ephemeral_low.saturating_sub(APP_PORTS_FROM));
    if span < 1_000 {
        // No room below the ephemeral range on this host: the kernel's pick.
        let l = std::net::TcpListener::bind(("0.0.0.0", 0))?;
        return Ok(l.local_addr()?.port());
    }
    for _ in 0..span.min(4_096) {
        let offset = CURSOR.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_add(*seed) % span;
        let port = APP_PORTS_FROM + offset as u16;
        // The wildcard address conflicts with a socket on any address.
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free port in {APP_PORTS_FROM}-{ephemeral_low}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_ports_are_never_ones_the_kernel_gives_outgoing_connections() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(32_768);
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        if low >= APP_PORTS_FROM + 1_000 {
            assert!(ports.iter().all(|&p| (APP_PORTS_FROM..low).contains(&p)), "{ports:?} vs ephemeral from {low}");
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "successive ports differ: {ports:?}");
    }

    #[test]
    fn default_policy_prefers_main() {
        let p = DeployPolicy::Branch(None);
        assert!(deployable(&p, "refs/heads/main", true));
        assert!(deployable(&p, "refs/heads/master", false));
        assert!(!deployable(&p, "refs/heads/master", true));
        assert!(!deployable(&p, "refs/heads/dev", false));
        let tags = DeployPolicy::Refs(vec!["refs/tags/release-*".into()]);
        assert!(deployable(&tags, "refs/tags/release-2", true));
        assert!(!deployable(&tags, "refs/heads/main", true));
    }
}
