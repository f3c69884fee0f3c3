//! The container engine, reached through its API (bollard), never by
//! running the `docker` client: images (imported base images, app images
//! built from a context that holds only their inputs) and the clean-up of
//! what slipway left in the engine, found by label.
//!
//! What runs in a container, and how it is supervised, is `runtime`'s
//! business (`runtime::container`); this module knows the engine and the
//! image inputs, not processes.

pub mod base;
pub mod inputs;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, TagImageOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::progress::Progress;

/// Labels on everything slipway creates in the engine. `server` names the
/// daemon (its data directory), so two daemons on one engine never touch
/// each other's containers.
pub const LABEL_APP: &str = "slipway.app";
pub const LABEL_RELEASE: &str = "slipway.release";
pub const LABEL_TYPE: &str = "slipway.type";
pub const LABEL_INDEX: &str = "slipway.index";
pub const LABEL_SERVER: &str = "slipway.server";
/// On app images: the hash of each input, so the next push can say which
/// input changed.
pub const LABEL_INPUTS: &str = "slipway.inputs";
/// On base images `slipway images import-base` made.
pub const LABEL_BASE: &str = "slipway.base";

/// A connection to the engine, with the API version negotiated (the engine
/// here speaks 1.41; bollard defaults to a newer one).
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
}

/// The identity of the daemon whose data directory is `root`, for labels.
pub fn server_id(root: &Path) -> String {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    hex::encode(&Sha256::digest(root.as_os_str().as_encoded_bytes())[..8])
}

/// The repository part of `app`'s image tags.
pub fn image_repo(app: &str) -> String {
    format!("slipway/{app}")
}

/// `app`'s image of the inputs `key` on the server `server`:
/// `slipway/APP:SERVER-KEY`. The server's id is in the tag so that two
/// daemons on one engine, each with an app of that name and the same
/// inputs, never share (and never remove) each other's tag.
pub fn app_image_tag(app: &str, server: &str, key: &str) -> String {
    format!("{}:{server}-{key}", image_repo(app))
}

/// The tag an older daemon gave the same image (`slipway/APP:KEY`, no
/// server): found, it is retagged, not rebuilt.
pub fn legacy_image_tag(app: &str, key: &str) -> String {
    format!("{}:{key}", image_repo(app))
}

/// The inputs' key of an app image tag, either style.
pub fn image_key(tag: &str) -> &str {
    let t = tag.rsplit_once(':').map(|(_, t)| t).unwrap_or(tag);
    t.rsplit_once('-').map(|(_, k)| k).unwrap_or(t)
}

/// An image the engine holds.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub id: String,
    pub tags: Vec<String>,
    pub size: u64,
    pub labels: HashMap<String, String>,
}

impl ImageInfo {
    /// The tags of this image that belong to the server `server` (of `app`
    /// only, or of any app): its server-scoped tags, and tags without a
    /// server (an older daemon's) on an image it labelled as its own.
    /// Another server's tags on the same image are never among them.
    pub fn tags_of_server(&self, server: &str, app: Option<&str>) -> Vec<String> {
        let labelled_mine = self.labels.get(LABEL_SERVER).is_some_and(|s| s == server);
        self.tags
            .iter()
            .filter(|t| {
                let Some((repo, tag)) = t.rsplit_once(':') else { return false };
                let Some(name) = repo.strip_prefix("slipway/") else { return false };
                if app.is_some_and(|a| a != name) {
                    return false;
                }
                match tag.split_once('-') {
                    Some((s, _)) => s == server,
                    None => labelled_mine,
                }
            })
            .cloned()
            .collect()
    }
}

impl Engine {
    pub async fn connect() -> Result<Engine> {
        let docker = Docker::connect_with_local_defaults()
            .context("the docker engine is unreachable (is dockerd running and its socket readable?)")?
            .negotiate_version()
            .await
            .context("the docker engine is unreachable (is dockerd running and its socket readable?)")?;
        Ok(Engine { docker })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The image's id, or `None` when the engine does not hold it.
    pub async fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        match self.docker.inspect_image(name).await {
            Ok(i) => Ok(Some(ImageInfo {
                id: i.id.unwrap_or_default(),
                tags: i.repo_tags.unwrap_or_default(),
                size: i.size.unwrap_or(0).max(0) as u64,
                labels: i.config.and_then(|c| c.labels).unwrap_or_default(),
            })),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("inspecting image {name}")),
        }
    }

    /// Images carrying `label` (`key` or `key=value`).
    pub async fn images(&self, label: &str) -> Result<Vec<ImageInfo>> {
        let filters = HashMap::from([("label", vec![label])]);
        let list = self
            .docker
            .list_images(Some(ListImagesOptionsBuilder::default().filters(&filters).build()))
            .await
            .context("listing images")?;
        Ok(list
            .into_iter()
            .map(|i| ImageInfo { id: i.id, tags: i.repo_tags, size: i.size.max(0) as u64, labels: i.labels })
            .collect())
    }

    /// Remove an image; an image a container still uses is kept (`false`).
    pub async fn remove_image(&self, name: &str) -> Result<bool> {
        match self.docker.remove_image(name, Some(RemoveImageOptionsBuilder::default().build()), None).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409 | 404, .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing image {name}")),
        }
    }

    /// Give the image `source` (a tag or an id) the tag `repo:tag` too: the
    /// same image under a second name, nothing built.
    pub async fn tag_image(&self, source: &str, repo: &str, tag: &str) -> Result<()> {
        let opts = TagImageOptionsBuilder::default().repo(repo).tag(tag).build();
        self.docker.tag_image(source, Some(opts)).await.with_context(|| format!("tagging image {source} as {repo}:{tag}"))
    }

    /// Create the network `name` (`driver`: `bridge` for local containers,
    /// `overlay` for swarm services) with `labels` unless it exists. The
    /// engine allows two networks of one name (API 1.41 does not check), so
    /// callers serialise this per name (the app's lock).
    pub async fn ensure_network(&self, name: &str, driver: &str, labels: &HashMap<String, String>) -> Result<()> {
        match self.docker.inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("inspecting network {name}")),
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some(driver.into()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        self.docker.create_network(request).await.with_context(|| {
            // Without `default-address-pools`, the engine has about 30
            // bridge subnets to hand out: one per app with containers.
            format!("creating network {name} (if the engine ran out of address pools, give it more, smaller ones: `default-address-pools` in /etc/docker/daemon.json)")
        })?;
        Ok(())
    }

    /// Remove every network carrying all of `labels` (`key=value`) that no
    /// container uses any more. Returns how many went.
    pub async fn remove_networks(&self, labels: &[String]) -> Result<usize> {
        let filters = HashMap::from([("label".to_string(), labels.to_vec())]);
        let list = self
            .docker
            .list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filters).build()))
            .await
            .context("listing networks")?;
        let mut n = 0;
        for net in list {
            let Some(id) = net.id else { continue };
            match self.docker.remove_network(&id).await {
                Ok(()) => n += 1,
                // Gone already, or still in use (a container being removed).
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 404 | 403 | 409, .. }) => {}
                Err(e) => return Err(e).with_context(|| format!("removing network {id}")),
            }
        }
        Ok(n)
    }

    /// The containers (running or not) carrying all of `labels` (`key=value`).
    async fn labelled(&self, labels: &[String]) -> Result<Vec<bollard::models::ContainerSummary>> {
        let filters = HashMap::from([("label".to_string(), labels.to_vec())]);
        self.docker
            .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))
            .await
            .context("listing containers")
    }

    /// Names of the containers (running or not) carrying all of `labels`
    /// (`key=value`).
    pub async fn containers(&self, labels: &[String]) -> Result<Vec<String>> {
        let list = self.labelled(labels).await?;
        Ok(list.into_iter().filter_map(|c| c.names.and_then(|n| n.into_iter().next())).collect())
    }

    /// Remove (force) every container carrying all of `labels`
    /// (`key=value`). Returns how many there were.
    pub async fn remove_containers(&self, labels: &[String]) -> Result<usize> {
        let list = self.labelled(labels).await?;
        let mut n = 0;
        for c in list {
            let Some(id) = c.id else { continue };
            let opts = RemoveContainerOptionsBuilder::default().force(true).build();
            match self.docker.remove_container(&id, Some(opts)).await {
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => n += 1,
                Err(e) => return Err(e).with_context(|| format!("removing container {id}")),
            }
        }
        Ok(n)
    }

    /// Build `tag` from an in-memory tar `context`, streaming the build's
    /// output to `progress`. Returns the image id.
    pub async fn build(
        &self,
        context: Vec<u8>,
        dockerfile: &str,
        tag: &str,
        labels: &HashMap<String, String>,
        progress: &Progress,
    ) -> Result<String> {
        let opts = BuildImageOptionsBuilder::default()
            .dockerfile(dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .labels(labels)
            .build();
        let mut stream = self.docker.build_image(opts, None, Some(bollard::body_full(context.into())));
        let mut tail: Vec<String> = Vec::new();
        // The image of each step (` ---> 3f2a1b2c3d4e`): a failed build
        // leaves them behind, untagged and unlabelled, for nobody.
        let mut steps: Vec<String> = Vec::new();
        let result = async {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(s) = info.stream {
                            for line in s.lines().filter(|l| !l.trim().is_empty()) {
                                progress.output(line);
                                if let Some(id) = line.trim().strip_prefix("---> ").filter(|i| i.len() == 12 && i.bytes().all(|b| b.is_ascii_hexdigit())) {
                                    steps.push(id.to_string());
                                }
                                tail.push(line.to_string());
                                if tail.len() > 20 {
                                    tail.remove(0);
                                }
                            }
                        }
                        if let Some(detail) = info.error_detail {
                            return Err(anyhow!("{}", detail.message.unwrap_or_else(|| "unknown error".into())));
                        }
                    }
                    Err(bollard::errors::Error::DockerStreamError { error }) => return Err(anyhow!("{error}")),
                    Err(e) => return Err(e).context("building the image"),
                }
            }
            let built = self.image(tag).await?.ok_or_else(|| anyhow!("the build ended without an image; its last output:\n{}", tail.join("\n")))?;
            Ok(built.id)
        }
        .await;
        if result.is_err() {
            self.remove_dangling(&steps).await;
        }
        result
    }

    /// Remove the step images a failed build made, newest first, as long
    /// as nothing else holds them: no tag (a step can be another image's
    /// last one) and no child (the engine refuses those).
    async fn remove_dangling(&self, steps: &[String]) {
        for id in steps.iter().rev() {
            if let Ok(Some(i)) = self.image(id).await {
                if i.tags.is_empty() {
                    let _ = self.remove_image(&i.id).await;
                }
            }
        }
    }

    /// The Python version (`3.11.2`) of `image`'s `python3`, asked of a
    /// throwaway container (no network, removed at once) and remembered by
    /// image id: a base image never changes under its id.
    pub async fn python_version(&self, image_id: &str, labels: &HashMap<String, String>) -> Result<String> {
        static KNOWN: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
        let known = |k: &std::sync::Mutex<Vec<(String, String)>>| {
            k.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(id, _)| id == image_id).map(|(_, v)| v.clone())
        };
        if let Some(v) = known(&KNOWN) {
            return Ok(v);
        }
        let body = bollard::models::ContainerCreateBody {
            image: Some(image_id.to_string()),
            cmd: Some(["python3", "-c", "import platform; print(platform.python_version())"].map(String::from).to_vec()),
            labels: Some(labels.clone()),
            network_disabled: Some(true),
            host_config: Some(bollard::models::HostConfig {
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self.docker.create_container(None::<bollard::query_parameters::CreateContainerOptions>, body).await.context("creating a container to read the base image's python version")?.id;
        let result = async {
            self.docker.start_container(&id, None::<bollard::query_parameters::StartContainerOptions>).await?;
            let mut wait = self.docker.wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
            while let Some(w) = wait.next().await {
                w?;
            }
            let opts = bollard::query_parameters::LogsOptionsBuilder::default().stdout(true).stderr(true).build();
            let mut logs = self.docker.logs(&id, Some(opts));
            let mut out = String::new();
            while let Some(chunk) = logs.next().await {
                out.push_str(&String::from_utf8_lossy(&chunk?.into_bytes()));
            }
            Ok::<_, bollard::errors::Error>(out)
        }
        .await;
        let _ = self.docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await;
        let out = result.context("reading the base image's python version")?;
        let version = out.trim().to_string();
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(anyhow!("the base image's python3 did not say its version: {}", out.trim()));
        }
        KNOWN.lock().unwrap_or_else(|e| e.into_inner()).push((image_id.to_string(), version.clone()));
        Ok(version)
    }

    /// Free bytes on the filesystem that holds the engine's images.
    pub async fn free_disk(&self) -> Result<u64> {
        let info = self.docker.info().await.context("asking the engine for its root directory")?;
        let root = info.docker_root_dir.unwrap_or_else(|| "/var/lib/docker".into());
        free_bytes(Path::new(&root)).with_context(|| format!("reading free space of {root}"))
    }
}

/// Free bytes (for unprivileged users) of the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid
    // NUL-terminated path for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_owns_its_scoped_tags_and_its_own_legacy_ones_only() {
        let mine = "aaaa";
        let img = |tags: &[&str], server: &str| ImageInfo {
            id: "sha256:1".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            size: 0,
            labels: HashMap::from([(LABEL_SERVER.to_string(), server.to_string())]),
        };
        let shared = img(&["slipway/web:aaaa-k1", "slipway/web:bbbb-k1", "slipway/api:aaaa-k1"], "bbbb");
        assert_eq!(shared.tags_of_server(mine, Some("web")), vec!["slipway/web:aaaa-k1"]);
        assert_eq!(shared.tags_of_server(mine, None), vec!["slipway/web:aaaa-k1", "slipway/api:aaaa-k1"]);
        // Tags without a server: an older daemon's, owned by the image's label.
        assert_eq!(img(&["slipway/web:k1"], mine).tags_of_server(mine, None), vec!["slipway/web:k1"]);
        assert!(img(&["slipway/web:k1"], "bbbb").tags_of_server(mine, None).is_empty());
        assert!(img(&["other/web:aaaa-k1"], mine).tags_of_server(mine, None).is_empty());
        assert_eq!(image_key("slipway/web:aaaa-k1"), "k1");
        assert_eq!(image_key("slipway/web:k1"), "k1");
        assert_eq!(app_image_tag("web", mine, "k1"), "slipway/web:aaaa-k1");
    }
}
