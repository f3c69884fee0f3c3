//! The container kind of process: an app process run in its image by the
//! engine, with the release tree and data dir bind-mounted at the paths
//! they have on the host.
//!
//! The supervisor supervises processes; a container becomes one through a
//! shim (what containerd-shim and conmon do): `slipway container-shim`,
//! started like any host process in its own group, creates the container,
//! streams its output as its own, forwards every signal it gets to it
//! (a reload's HUP, a stop's TERM), exits with its exit status and removes
//! it. So restart policies, crash loops, logs, pid files, reloads in place
//! and stops work the same for both kinds, and nothing above `runtime`
//! asks which kind runs. A third kind (Swarm tasks) is another variant of
//! [`ContainerPlacement`]'s caller, [`super::ProcessCommand::container`].
//!
//! Each app's containers (its processes, build steps and one-offs) sit on
//! the app's own bridge network, created here and removed with the app:
//! the engine drops traffic between bridges, so one app's container
//! cannot reach another's ports; the only way in is the port published on
//! 127.0.0.1, which slipway's proxy uses.
//!
//! Docker's own restart policy is off: the shim's exit is the supervisor's
//! signal. A shim killed hard leaves its container behind; containers are
//! labelled with the daemon's identity, and a starting daemon removes
//! exactly its own ([`reap_leftovers`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::container::base::{python_image, short_id};
use crate::container::inputs::{self, ImagePlan};
use crate::container::{self as engine, Engine};
use crate::layout::Layout;
use crate::manifest::{Manifest, ProcessSpec};
use crate::names::AppName;
use crate::progress::Progress;

/// The environment variable that hands the shim its spec. Not argv: config
/// values are secrets, and a process's environment is readable only by its
/// owner, its command line by everyone.
pub const SHIM_SPEC_VAR: &str = "SLIPWAY_CONTAINER_SPEC";

/// Where the host's CA bundle appears inside containers.
const CA_INSIDE: &str = "/etc/slipway/ca.crt";

/// A container deploy is refused below this much free disk where the
/// engine keeps its images: a half-written layer is worse than no deploy.
pub const MIN_FREE_DISK: u64 = 1 << 30;

/// How one process runs in a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerPlacement {
    pub image: String,
    /// The image's id: swarm services name it so (swarm track), which
    /// needs no registry and never changes under them.
    #[serde(default)]
    pub image_id: String,
    pub labels: BTreeMap<String, String>,
    /// Host directories visible read-only, at the same path inside.
    pub read_only: Vec<PathBuf>,
    /// Host directories visible writable, at the same path inside.
    pub writable: Vec<PathBuf>,
    /// Paths hidden under an empty tmpfs (the app's logs, under its
    /// read-only app directory).
    pub masked: Vec<PathBuf>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u32>,
    /// The type's stop signal: the shim kills the container when it has
    /// not stopped just before the supervisor's own deadline.
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
    pub ca_bundle: Option<PathBuf>,
    /// The app's own bridge network: containers of other apps cannot reach
    /// its containers' ports (the engine drops traffic between bridges);
    /// only the loopback port the proxy uses leads in.
    #[serde(default)]
    pub network: Option<String>,
}

/// What the shim gets: the placement and the command.
#[derive(Debug, Serialize, Deserialize)]
struct ShimSpec {
    placement: ContainerPlacement,
    command: String,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    user: Option<(u32, u32)>,
    /// The shim's stdin goes to the container's (a one-off's piped
    /// input), closed when it ends; otherwise the container has none.
    #[serde(default)]
    stdin: bool,
}

/// The host command that runs `cmd` in its container: the shim. `stdin`:
/// what the shim reads is the container's input.
pub(super) fn shim_command(cmd: &super::ProcessCommand, placement: &ContainerPlacement, stdin: bool) -> tokio::process::Command {
    let spec = ShimSpec {
        placement: placement.clone(),
        command: cmd.command.clone(),
        cwd: cmd.cwd.clone(),
        env: cmd.env.clone(),
        user: cmd.user.map(|u| (u.uid, u.gid)),
        stdin,
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut c = tokio::process::Command::new(exe);
    c.arg("container-shim").env_clear().env(SHIM_SPEC_VAR, serde_json::to_string(&spec).unwrap_or_default());
    // The engine the daemon uses (DOCKER_HOST), the shim uses too.
    for var in ["PATH", "DOCKER_HOST"] {
        if let Some(v) = std::env::var_os(var) {
            c.env(var, v);
        }
    }
    // The shim stays the daemon's user: it needs the engine's socket. The
    // app's own uid applies inside the container.
    c
}

/// The image an app's release runs in, once it is known to exist.
#[derive(Debug, Clone)]
pub struct AppImage {
    pub tag: String,
    pub id: String,
    pub inputs: String,
    app_dir: PathBuf,
    data_dir: PathBuf,
    logs_dir: PathBuf,
    server: String,
    app: String,
    network: String,
}

impl AppImage {
    /// `app`'s use of the image `id` under `tag`: the app's own dirs,
    /// network and this server's identity come from where it runs.
    fn of_app(layout: &Layout, app: &AppName, tag: String, id: String, inputs: String, network: String) -> AppImage {
        AppImage {
            tag,
            id,
            inputs,
            app_dir: layout.app(app),
            data_dir: layout.app_data(app),
            logs_dir: layout.logs(app),
            server: engine::server_id(layout.root()),
            app: app.to_string(),
            network,
        }
    }
}

/// The images of the releases this daemon runs or is about to run, by
/// release tree: a process of a tree in here runs in a container.
#[derive(Default)]
pub struct AppImages {
    by_tree: Mutex<HashMap<PathBuf, Arc<AppImage>>>,
}

impl AppImages {
    /// How a process of `spec` from the release `tree` runs, or `None` for
    /// the host.
    pub fn placement(&self, tree: &Path, release: u32, spec: &ProcessSpec) -> Option<Arc<ContainerPlacement>> {
        let image = self.get(tree)?;
        let mut p = base_placement(&image, release, &spec.name);
        p.memory = spec.limits.memory;
        p.cpus = spec.limits.cpus;
        p.pids = spec.limits.processes;
        p.stop_signal = spec.stop_signal;
        p.stop_timeout_ms = spec.stop_timeout.as_millis() as u64;
        Some(Arc::new(p))
    }

    /// How a build step (test gate, release phase) or a one-off runs in
    /// the release `tree`: the same image and mounts as its processes.
    pub fn step_placement(&self, tree: &Path, kind: &str) -> Option<Arc<ContainerPlacement>> {
        let image = self.get(tree)?;
        let release = tree
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Some(Arc::new(base_placement(&image, release, kind)))
    }

    pub fn get(&self, tree: &Path) -> Option<Arc<AppImage>> {
        self.by_tree.lock().unwrap_or_else(|e| e.into_inner()).get(tree).cloned()
    }

    fn insert(&self, tree: &Path, image: AppImage) {
        self.by_tree.lock().unwrap_or_else(|e| e.into_inner()).insert(tree.to_path_buf(), Arc::new(image));
    }

    fn remove(&self, tree: &Path) {
        self.by_tree.lock().unwrap_or_else(|e| e.into_inner()).remove(tree);
    }

    /// Forget trees that no longer exist (collected releases).
    pub fn forget_missing(&self) {
        self.by_tree.lock().unwrap_or_else(|e| e.into_inner()).retain(|t, _| t.is_dir());
    }

    /// Tags still in use by some known release of `app`.
    pub fn tags_of(&self, app: &str) -> Vec<String> {
        self.by_tree.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|i| i.app == app).map(|i| i.tag.clone()).collect()
    }
}

fn base_placement(image: &AppImage, release: u32, kind: &str) -> ContainerPlacement {
    let labels = BTreeMap::from([
        (engine::LABEL_APP.to_string(), image.app.clone()),
        (engine::LABEL_RELEASE.to_string(), format!("v{release}")),
        (engine::LABEL_TYPE.to_string(), kind.to_string()),
        (engine::LABEL_SERVER.to_string(), image.server.clone()),
    ]);
    ContainerPlacement {
        image: image.tag.clone(),
        image_id: image.id.clone(),
        labels,
        read_only: vec![image.app_dir.clone()],
        writable: vec![image.data_dir.clone()],
        masked: vec![image.logs_dir.clone()],
        memory: None,
        cpus: None,
        pids: None,
        stop_signal: libc::SIGTERM,
        stop_timeout_ms: 10_000,
        ca_bundle: ca_bundle(),
        network: Some(image.network.clone()),
    }
}

/// The name of `app`'s network, unique per daemon (two daemons on one
/// engine may have apps of the same name).
fn network_name(server: &str, app: &str) -> String {
    format!("slipway-{app}-{server}")
}

/// Create `app`'s network unless it exists. Callers hold the app's lock,
/// so two of them never race to create it.
async fn ensure_app_network(engine: &Engine, layout: &Layout, app: &AppName) -> Result<String> {
    let server = engine::server_id(layout.root());
    let name = network_name(&server, app.as_str());
    let labels = HashMap::from([(engine::LABEL_APP.to_string(), app.to_string()), (engine::LABEL_SERVER.to_string(), server)]);
    engine.ensure_network(&name, "bridge", &labels).await?;
    Ok(name)
}

/// The host's CA bundle: `SSL_CERT_FILE`, else Debian's.
fn ca_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/etc/ssl/certs/ca-certificates.crt")])
        .find(|p| p.is_file())
}

/// Runtime selection and the image, for the release tree `tree`: `false`
/// when the release runs on the host. For containers, the image whose
/// inputs the tree describes exists afterwards (reused or built), and the
/// push output says which and why.
pub async fn prepare(
    images: &AppImages,
    layout: &Layout,
    app: &AppName,
    tree: &Path,
    manifest: &Manifest,
    live_tree: Option<&Path>,
    progress: &Progress,
) -> Result<bool> {
    // A tree prepared before (a rollback, a restart, a promotion's switch,
    // by this daemon or an earlier one) keeps the image it was prepared
    // with while the engine holds it: a base image imported again since
    // would change the key, and a release's image never changes under it.
    let known = images.get(tree).map(|i| ImageRecord { tag: i.tag.clone(), id: i.id.clone(), inputs: i.inputs.clone() });
    if let Some(known) = known.or_else(|| read_record(tree)) {
        let engine = Engine::connect().await?;
        if let Some(found) = engine.image(&known.id).await? {
            if !found.tags.contains(&known.tag) {
                // Its tag was removed (`images prune` of a stopped app): by id.
                let (repo, t) = known.tag.rsplit_once(':').unwrap_or((&known.tag, "latest"));
                engine.tag_image(&known.id, repo, t).await?;
            }
            let network = ensure_app_network(&engine, layout, app).await?;
            progress.step(&format!("code deploy: image {} reused (the release's own image)", short_id(&known.id)));
            return record(images, tree, AppImage::of_app(layout, app, known.tag, known.id, known.inputs, network)).map(|()| true);
        }
    }
    let base = python_image(&crate::container::base::host_suite());
    let plan = {
        let (tree, manifest, base) = (tree.to_path_buf(), manifest.clone(), base.clone());
        tokio::task::spawn_blocking(move || inputs::select(&tree, &manifest, &base)).await.context("reading the image inputs")??
    };
    let Some(plan) = plan else {
        images.remove(tree);
        return Ok(false);
    };
    // The logs dir is hidden under a tmpfs inside the containers; the
    // mount point must exist before the first container starts (the app
    // dir is mounted read-only). Created as `logs` creates it.
    let logs = layout.logs(app);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let engine = Engine::connect().await?;
    let mut base_ids = Vec::new();
    for b in &plan.bases {
        match engine.image(b).await? {
            Some(i) => base_ids.push(i.id),
            None if *b == base => bail!(
                "base image {b} is not on this server, and no registry is reachable: import it with `slipway images import-base`"
            ),
            None => bail!(
                "base image {b} is not on this server, and no registry is reachable: build or import it here first (`docker load`, `docker import`), or use `slipway images import-base` and FROM {base}"
            ),
        }
    }
    let server = engine::server_id(layout.root());
    if plan.dockerfile_path.is_none() {
        check_python_pin(&engine, tree, &plan, &base_ids, &server, app).await?;
    }
    let network = ensure_app_network(&engine, layout, app).await?;
    let key = plan.key(&base_ids);
    let tag = engine::app_image_tag(app.as_str(), &server, &key);
    let legacy = engine::legacy_image_tag(app.as_str(), &key);
    let inputs_label = plan.label(&base_ids);
    let what = describe_inputs(&plan);
    if plan.whole_tree {
        progress.info(
            "the Dockerfile copies the whole tree (COPY .): every push changes its inputs and is a container deploy; \
             copy only the dependency files (COPY requirements.txt ...): slipway mounts the code at run time",
        );
    }
    let existing = match engine.image(&tag).await? {
        Some(existing) => Some(existing),
        // An older daemon's tag of the same inputs, on its own image: the
        // server's tag is added and the old one dropped, nothing built.
        None => match engine.image(&legacy).await? {
            Some(old) if old.tags_of_server(&server, Some(app.as_str())).contains(&legacy) => {
                let (repo, t) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
                engine.tag_image(&old.id, repo, t).await?;
                engine.remove_image(&legacy).await?;
                progress.info(&format!("image {} retagged {legacy} -> {tag}", short_id(&old.id)));
                Some(old)
            }
            _ => None,
        },
    };
    let id = match existing {
        Some(existing) => {
            progress.step(&format!("code deploy: image {} reused ({what} unchanged)", short_id(&existing.id)));
            existing.id
        }
        None => {
            let live = live_tree.and_then(|t| images.get(t));
            let why = match &live {
                Some(l) => {
                    let changes = plan.changes_since(&base_ids, &l.inputs);
                    if changes.is_empty() { "its inputs changed".to_string() } else { changes.join(", ") }
                }
                None => "no image of these inputs yet".to_string(),
            };
            progress.step(&format!("container deploy: {why}; building {tag}"));
            let free = engine.free_disk().await?;
            if free < MIN_FREE_DISK {
                bail!(
                    "only {} MiB free where the engine keeps images (at least {} MiB needed): remove old images (`slipway images prune`) or free disk",
                    free >> 20,
                    MIN_FREE_DISK >> 20
                );
            }
            let context = {
                let (plan, tree, ca) = (plan.clone(), tree.to_path_buf(), ca_bundle());
                tokio::task::spawn_blocking(move || plan.context(&tree, ca.as_deref())).await.context("building the context")??
            };
            let labels = HashMap::from([
                (engine::LABEL_APP.to_string(), app.to_string()),
                (engine::LABEL_SERVER.to_string(), server.clone()),
                (engine::LABEL_INPUTS.to_string(), inputs_label.clone()),
            ]);
            let t = std::time::Instant::now();
            let id = engine
                .build(context, &plan.dockerfile_name(), &tag, &labels, progress)
                .await
                .context("the image build failed")?;
            progress.info(&format!("image {} built in {:.1}s", short_id(&id), t.elapsed().as_secs_f64()));
            id
        }
    };
    record(images, tree, AppImage::of_app(layout, app, tag, id, inputs_label, network)).map(|()| true)
}

/// A generated image's interpreter is its base's `python3`: a
/// `.python-version`/`runtime.txt` pin it cannot meet is refused here,
/// before anything is built, in one line naming both versions.
async fn check_python_pin(engine: &Engine, tree: &Path, plan: &ImagePlan, base_ids: &[String], server: &str, app: &AppName) -> Result<()> {
    let Some(pin) = crate::build::python_pin(tree)? else { return Ok(()) };
    let (Some(base), Some(id)) = (plan.bases.first(), base_ids.first()) else { return Ok(()) };
    let labels = HashMap::from([(engine::LABEL_APP.to_string(), app.to_string()), (engine::LABEL_SERVER.to_string(), server.to_string())]);
    let version = engine.python_version(id, &labels).await?;
    if !crate::build::version_matches(&pin, &version) {
        let file = if tree.join(".python-version").exists() { ".python-version" } else { "runtime.txt" };
        bail!("{file} pins python {pin}, but the base image {base} has python {version}: pin {version} or a prefix of it, or give the app a Dockerfile FROM an image with python {pin}");
    }
    Ok(())
}

/// What `releases/vN.image` holds: the image the tree `vN` was prepared
/// with. A rollback to it, or a daemon started later, runs exactly this
/// image while the engine holds it, whatever its inputs hash to now.
#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    tag: String,
    id: String,
    inputs: String,
}

/// The record beside `tree`, if any (and readable).
fn read_record(tree: &Path) -> Option<ImageRecord> {
    let path = Layout::image_record(tree);
    let text = std::fs::read(&path).ok().filter(|t| t.len() < 64 * 1024)?;
    serde_json::from_slice(&text).ok()
}

/// `image` is the one the release `tree` runs in: known to this daemon,
/// and written down beside the tree (through a rename: a crash leaves the
/// old record or the new one).
fn record(images: &AppImages, tree: &Path, image: AppImage) -> Result<()> {
    let path = Layout::image_record(tree);
    let rec = ImageRecord { tag: image.tag.clone(), id: image.id.clone(), inputs: image.inputs.clone() };
    let tmp = path.with_extension("image.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&rec)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    images.insert(tree, image);
    Ok(())
}

/// The tags the kept release trees of `app` run in: known to this daemon,
/// or recorded beside a tree that still exists.
fn kept_tags(images: &AppImages, layout: &Layout, app: &AppName) -> Vec<String> {
    images.forget_missing();
    let mut keep = images.tags_of(app.as_str());
    let recorded = std::fs::read_dir(layout.releases(app)).into_iter().flatten().flatten().map(|e| e.path());
    keep.extend(recorded.filter(|t| t.is_dir()).filter_map(|t| read_record(&t)).map(|r| r.tag));
    keep
}

/// Runtime selection and the image for `tree`, a promotion of the release
/// tree `from_tree` of the app `from`: the same image, never rebuilt. The
/// image `from` runs gets `app`'s tag too (its releases and collection go
/// by tag), so the target's release phase and processes run in exactly
/// the image that was checked on `from`. `false` when `from`'s release
/// runs on the host.
#[allow(clippy::too_many_arguments)]
pub async fn prepare_promoted(
    images: &AppImages,
    layout: &Layout,
    from: &AppName,
    from_tree: &Path,
    app: &AppName,
    tree: &Path,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<bool> {
    // The source's image is known once its release was prepared (deployed,
    // or restored by this daemon); asking again only finds it by its tag.
    let source = match images.get(from_tree) {
        Some(s) => s,
        None => {
            if !prepare(images, layout, from, from_tree, manifest, None, progress).await? {
                images.remove(tree);
                return Ok(false);
            }
            images.get(from_tree).ok_or_else(|| anyhow!("the image of {} vanished", from_tree.display()))?
        }
    };
    let engine = Engine::connect().await?;
    let network = ensure_app_network(&engine, layout, app).await?;
    let tag = engine::app_image_tag(app.as_str(), &engine::server_id(layout.root()), engine::image_key(&source.tag));
    let (repo, t) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
    // By id: the source's tag could have been moved since.
    engine.tag_image(&source.id, repo, t).await?;
    progress.step(&format!("promote: image {} of {from} reused (nothing built)", short_id(&source.id)));
    record(images, tree, AppImage::of_app(layout, app, tag, source.id.clone(), source.inputs.clone(), network)).map(|()| true)
}

/// Remove what the engine holds for `app` (destroyed): its images no
/// other app's release uses, and its network.
pub async fn remove_app(images: &AppImages, layout: &Layout, app: &AppName) {
    collect_images(images, layout, app).await;
    let Ok(engine) = Engine::connect().await else { return };
    let labels = [format!("{}={app}", engine::LABEL_APP), format!("{}={}", engine::LABEL_SERVER, engine::server_id(layout.root()))];
    if let Err(e) = engine.remove_networks(&labels).await {
        tracing::warn!(app = %app, error = %format!("{e:#}"), "removing the app's network failed");
    }
}

fn describe_inputs(plan: &ImagePlan) -> String {
    let mut parts = vec![if plan.dockerfile_path.is_some() { "Dockerfile".to_string() } else { "generated Dockerfile".to_string() }];
    let deps: Vec<&str> = plan.files.keys().map(String::as_str).filter(|f| inputs::DEPENDENCY_FILES.contains(f)).collect();
    parts.extend(deps.iter().map(|s| s.to_string()));
    let others = plan.files.len() - deps.len() - usize::from(plan.dockerfile_path.is_some());
    if others > 0 {
        parts.push(format!("{others} copied file{}", if others == 1 { "" } else { "s" }));
    }
    parts.push("base image".into());
    parts.join(", ")
}

/// Remove the containers a previous daemon with this data directory left
/// (its shims were killed with it). An unreachable engine has none to
/// remove.
pub async fn reap_leftovers(root: &Path) -> usize {
    let Ok(engine) = Engine::connect().await else { return 0 };
    let label = format!("{}={}", engine::LABEL_SERVER, engine::server_id(root));
    engine.remove_containers(&[label]).await.unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "removing leftover containers failed");
        0
    })
}

/// Remove the app's images that no kept release uses (after old releases
/// were collected, or the app destroyed). Images a container still uses
/// stay.
pub async fn collect_images(images: &AppImages, layout: &Layout, app: &AppName) -> usize {
    let keep = kept_tags(images, layout, app);
    let server = engine::server_id(layout.root());
    let Ok(engine) = Engine::connect().await else { return 0 };
    // By this server's tags of the app, not by the image's labels: a
    // promoted image was built for (and labelled with) the source app and
    // carries the target's tag too, and another server's tag of the same
    // inputs may sit on it. Only the app's own tags go; an image with
    // another tag left stays.
    let Ok(list) = engine.images(engine::LABEL_APP).await else { return 0 };
    let mut n = 0;
    for t in list.iter().flat_map(|i| i.tags_of_server(&server, Some(app.as_str()))).filter(|t| !keep.contains(t)) {
        if engine.remove_image(&t).await.unwrap_or(false) {
            n += 1;
        }
    }
    n
}

/// What the app's images take, in words (`2 images, 245 MB`), or `None`
/// when it has none (a host app) or the engine is unreachable. Each
/// image's size includes its base layers, which images share.
pub async fn image_usage(layout: &Layout, app: &AppName) -> Option<String> {
    let engine = Engine::connect().await.ok()?;
    let server = engine::server_id(layout.root());
    let list = engine.images(engine::LABEL_APP).await.ok()?;
    let mine: Vec<_> = list.into_iter().filter(|i| !i.tags_of_server(&server, Some(app.as_str())).is_empty()).collect();
    if mine.is_empty() {
        return None;
    }
    let total: u64 = mine.iter().map(|i| i.size).sum();
    let n = mine.len();
    Some(format!("{n} image{}, {} MB (base layers shared)", if n == 1 { "" } else { "s" }, total / 1_000_000))
}

/// `slipway container-shim`: run the container its spec names, as a
/// process. Returns the container's exit code.
pub async fn shim_main() -> Result<i32> {
    let raw = std::env::var(SHIM_SPEC_VAR).with_context(|| format!("{SHIM_SPEC_VAR} is not set"))?;
    let spec: ShimSpec = serde_json::from_str(&raw).context("reading the shim spec")?;
    let engine = Engine::connect().await?;
    // The engine answers a wait only when the container ends, which may be
    // months away: no request deadline (bollard's default is 2 minutes,
    // after which the shim would give up on a healthy container).
    let docker = engine.docker().clone().with_timeout(Duration::from_secs(10 * 365 * 24 * 3600));
    let p = &spec.placement;

    let env = container_env(&spec.env, p);
    let binds: Vec<String> =
        binds(p).iter().map(|b| format!("{}:{}:{}", b.source.display(), b.target.display(), if b.read_only { "ro" } else { "rw" })).collect();
    let mut tmpfs = HashMap::from([("/tmp".to_string(), "rw,nosuid,nodev,size=256m".to_string())]);
    for m in masked(p) {
        tmpfs.insert(m.display().to_string(), "ro,size=4k".to_string());
    }
    let port: Option<u16> = spec.env.iter().find(|(k, _)| k == "PORT").and_then(|(_, v)| v.parse().ok());
    let (exposed, bindings) = match port {
        Some(port) => {
            let key = format!("{port}/tcp");
            // Loopback only: nothing but slipway's proxy reaches it.
            let b = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(port.to_string()) };
            (Some(vec![key.clone()]), Some(HashMap::from([(key, Some(vec![b]))])))
        }
        None => (None, None),
    };
    // SAFETY: geteuid/getegid have no preconditions.
    let user = spec.user.unwrap_or_else(|| unsafe { (libc::geteuid(), libc::getegid()) });
    let body = ContainerCreateBody {
        image: Some(p.image.clone()),
        cmd: Some(vec!["/bin/sh".into(), "-c".into(), exec_simple(&spec.command)]),
        env: Some(env),
        working_dir: Some(spec.cwd.display().to_string()),
        user: Some(format!("{}:{}", user.0, user.1)),
        labels: Some(p.labels.clone().into_iter().collect()),
        exposed_ports: exposed,
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(spec.stdin),
        open_stdin: Some(spec.stdin),
        stdin_once: Some(spec.stdin),
        tty: Some(false),
        host_config: Some(HostConfig {
            init: Some(true),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            memory: p.memory.map(|m| m as i64),
            nano_cpus: p.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: p.pids.map(i64::from),
            binds: Some(binds),
            port_bindings: bindings,
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            network_mode: p.network.clone(),
            auto_remove: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    let kind = p.labels.get(engine::LABEL_TYPE).map(String::as_str).unwrap_or("process");
    let app = p.labels.get(engine::LABEL_APP).map(String::as_str).unwrap_or("app");
    let name = format!("slipway-{app}-{kind}-{}", hex::encode(rand::random::<[u8; 4]>()));
    let created = docker
        .create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body)
        .await
        .with_context(|| format!("creating a container from {}", p.image))?;
    let id = created.id;
    let result = run_attached(&docker, &id, p, spec.stdin).await;
    let opts = RemoveContainerOptionsBuilder::default().force(true).build();
    let _ = docker.remove_container(&id, Some(opts)).await;
    result
}

async fn run_attached(docker: &bollard::Docker, id: &str, p: &ContainerPlacement, stdin: bool) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let attach = docker
        .attach_container(
            id,
            Some(AttachContainerOptionsBuilder::default().stdin(stdin).stdout(true).stderr(true).stream(true).logs(true).build()),
        )
        .await
        .context("attaching to the container")?;
    let mut output = attach.output;
    docker.start_container(id, None).await.context("starting the container")?;
    if stdin {
        // Its end (the client's EOF) half-closes the attach stream: the
        // engine then closes the container's stdin (`stdin_once`).
        let mut input = attach.input;
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut input).await;
            let _ = input.shutdown().await;
        });
    }

    let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    for s in forwarded {
        let mut stream = signal(SignalKind::from_raw(s)).with_context(|| format!("listening for signal {s}"))?;
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
    }
    drop(sig_tx);

    let mut wait = docker.wait_container(id, Some(WaitContainerOptionsBuilder::default().condition("not-running").build()));
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let far = Duration::from_secs(365 * 24 * 3600);
    let kill_at = tokio::time::sleep(far);
    tokio::pin!(kill_at);
    let mut output_open = true;
    let code = loop {
        tokio::select! {
            frame = output.next(), if output_open => match frame {
                Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                    let _ = stderr.write_all(&message).await;
                }
                Some(Ok(log)) => {
                    let _ = stdout.write_all(&log.into_bytes()).await;
                }
                Some(Err(_)) | None => output_open = false,
            },
            Some(s) = sig_rx.recv() => {
                let opts = KillContainerOptionsBuilder::default().signal(&s.to_string()).build();
                let _ = docker.kill_container(id, Some(opts)).await;
                if s == p.stop_signal {
                    // Kill it just before the supervisor's own deadline, so
                    // the shim is still here to remove it.
                    let grace = Duration::from_millis(p.stop_timeout_ms.saturating_sub(500).max(100));
                    kill_at.as_mut().reset(tokio::time::Instant::now() + grace);
                }
            }
            _ = &mut kill_at => {
                let opts = KillContainerOptionsBuilder::default().signal("KILL").build();
                let _ = docker.kill_container(id, Some(opts)).await;
                kill_at.as_mut().reset(tokio::time::Instant::now() + far);
            }
            w = wait.next() => break match w {
                Some(Ok(r)) => r.status_code,
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                Some(Err(e)) => return Err(anyhow!("waiting for the container: {e}")),
                None => return Err(anyhow!("the engine stopped reporting on the container")),
            },
        }
    };
    // Its last lines, for the crash report.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while output_open {
            match output.next().await {
                Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                    let _ = stderr.write_all(&message).await;
                }
                Some(Ok(log)) => {
                    let _ = stdout.write_all(&log.into_bytes()).await;
                }
                _ => output_open = false,
            }
        }
    })
    .await;
    let _ = stdout.flush().await;
    let _ = stderr.flush().await;
    Ok(code.clamp(0, 255) as i32)
}

/// The environment a container of `p` gets from its process's `env`: the
/// image's PATH and VIRTUAL_ENV hold its interpreter (the host's do not
/// exist inside), and the CA bundle is named where it is mounted.
pub(super) fn container_env(env: &[(String, String)], p: &ContainerPlacement) -> Vec<String> {
    let mut out: Vec<String> = env.iter().filter(|(k, _)| k != "PATH" && k != "VIRTUAL_ENV").map(|(k, v)| format!("{k}={v}")).collect();
    if p.ca_bundle.is_some() {
        for var in ["SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"] {
            out.push(format!("{var}={CA_INSIDE}"));
        }
    }
    out
}

/// A host path bound into a container.
pub(super) struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// What of the host a container of `p` sees: the app's dirs at their own
/// paths (the release tree read-only, the data dir writable) and the CA
/// bundle.
pub(super) fn binds(p: &ContainerPlacement) -> Vec<Bind> {
    let same = |d: &PathBuf, read_only| Bind { source: d.clone(), target: d.clone(), read_only };
    let mut out: Vec<Bind> = p.read_only.iter().map(|d| same(d, true)).chain(p.writable.iter().map(|d| same(d, false))).collect();
    if let Some(ca) = &p.ca_bundle {
        out.push(Bind { source: ca.clone(), target: PathBuf::from(CA_INSIDE), read_only: true });
    }
    out
}

/// The paths hidden under an empty read-only tmpfs (those that exist).
pub(super) fn masked(p: &ContainerPlacement) -> impl Iterator<Item = &PathBuf> {
    p.masked.iter().filter(|m| m.is_dir())
}

/// `exec CMD` for a simple command: the container's init forwards signals
/// to its one child only, so the app server must be that child, not a
/// shell around it (a shell dies of the HUP meant as a reload). Compound
/// commands stay as they are.
pub(super) fn exec_simple(command: &str) -> String {
    let compound = command.contains([';', '&', '|', '(', ')', '`', '\n', '<', '>']) || command.trim_start().starts_with("exec ");
    if compound {
        command.to_string()
    } else {
        format!("exec {command}")
    }
}
