//! Base images without a registry: `slipway images import-base` builds a
//! minimal Debian root with Python (debootstrap, from the host's own apt
//! mirror) and imports it into the engine as `slipway/python:SUITE`. The
//! result is cached by tag: a second call does nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;

use super::{Engine, LABEL_BASE};
use crate::progress::Progress;

/// The repository of the Python base image; the tag is the Debian suite.
pub const PYTHON_REPO: &str = "slipway/python";

/// What `[docker] image = "python"` builds on.
pub fn python_image(suite: &str) -> String {
    format!("{PYTHON_REPO}:{suite}")
}

/// The suite of the host (`VERSION_CODENAME`), else bookworm.
pub fn host_suite() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(|v| v.trim_matches('"').to_string()))
        })
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_lowercase()))
        .unwrap_or_else(|| "bookworm".into())
}

/// The first HTTP mirror the host's apt uses: the machine may reach no
/// other (no registry, maybe no internet past its mirror).
pub fn host_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        texts.extend(paths.iter().filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list")).filter_map(|p| std::fs::read_to_string(p).ok()));
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    for text in &texts {
        for line in text.lines() {
            let line = line.trim();
            let url = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.starts_with("http"))
            } else {
                None
            };
            if let Some(u) = url.filter(|u| u.starts_with("http") && !u.contains("security")) {
                return u.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

pub struct ImportBase {
    pub suite: String,
    pub mirror: String,
    /// Where debootstrap keeps downloaded packages between runs.
    pub cache: PathBuf,
    /// Scratch space for the root filesystem (removed afterwards).
    pub work: PathBuf,
    /// Build again even when the tag exists.
    pub force: bool,
}

/// Build and import the Python base image. Returns its tag.
pub async fn import_python(engine: &Engine, opts: &ImportBase, progress: &Progress) -> Result<String> {
    let tag = python_image(&opts.suite);
    if !opts.force {
        if let Some(existing) = engine.image(&tag).await? {
            progress.info(&format!("{tag} is already imported ({}); --force builds it again", short_id(&existing.id)));
            return Ok(tag);
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("building a base image needs root (debootstrap and chroot); run it as root, or load an image built elsewhere with `docker load`");
    }
    std::fs::create_dir_all(&opts.cache).with_context(|| format!("creating {}", opts.cache.display()))?;
    std::fs::create_dir_all(&opts.work).with_context(|| format!("creating {}", opts.work.display()))?;
    let rootfs = opts.work.join(format!("rootfs-{}", std::process::id()));
    let result = async {
        progress.step(&format!("debootstrap {} (minbase + python3) from {}", opts.suite, opts.mirror));
        let status = tokio::process::Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg("--include=python3,python3-venv,ca-certificates")
            .arg(format!("--cache-dir={}", opts.cache.canonicalize().unwrap_or(opts.cache.clone()).display()))
            .arg(&opts.suite)
            .arg(&rootfs)
            .arg(&opts.mirror)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("running debootstrap (is it installed? apt-get install debootstrap)")?;
        if !status.status.success() {
            let err = String::from_utf8_lossy(&status.stderr);
            let tail: Vec<&str> = err.lines().rev().take(10).collect();
            bail!("debootstrap failed: {}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        // Package caches and lists are a third of the image and never used
        // at run time.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            let d = rootfs.join(dir);
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        progress.step(&format!("importing into the engine as {tag}"));
        import_dir(engine, &rootfs, &tag).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&rootfs).await;
    let id = result?;
    progress.info(&format!("{tag} imported ({})", short_id(&id)));
    Ok(tag)
}

/// Import a root filesystem directory as image `tag` (what `docker import`
/// does), streaming a tar of it to the engine.
async fn import_dir(engine: &Engine, rootfs: &Path, tag: &str) -> Result<String> {
    let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
    // GNU tar keeps device nodes, hard links and ownership exactly; the
    // engine reads the stream as it comes.
    let mut tar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running tar")?;
    let out = tar.stdout.take().context("tar's output")?;
    let body = tokio_util::io::ReaderStream::new(out);
    let opts = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(t)
        .changes(vec![
            format!("ENV PATH={}", crate::runtime::SYSTEM_PATH),
            "ENV LANG=C.UTF-8".into(),
            format!("LABEL {LABEL_BASE}=python"),
        ])
        .build();
    let mut stream = engine.docker().create_image(Some(opts), Some(bollard::body_try_stream(body)), None);
    while let Some(item) = stream.next().await {
        item.context("importing the root filesystem")?;
    }
    let status = tar.wait().await.context("waiting for tar")?;
    if !status.success() {
        bail!("tar of the root filesystem failed");
    }
    let info = engine.image(tag).await?.with_context(|| format!("the engine did not keep {tag}"))?;
    Ok(info.id)
}

/// `sha256:3f2a…` → `3f2a1b2c3d4e`.
pub fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}
