//! `slipway backup FILE` and `slipway restore FILE --data DIR` (issue 14 #6).
//!
//! A backup is a tar.gz of what cannot be rebuilt: the database (SQLite's
//! online backup API), the bare repos, each app's data dir (its `[storage]`
//! items included), DIR/tls, the admin token and the SSH host key. Release
//! trees, environments, caches, images, logs and pid files are left out: a
//! server started on a restored dir rebuilds each live release's tree and
//! environment from its recorded commit (`release::restore_all`), without
//! running its release phase again (the restored data already went
//! through it).
//!
//! Consistency: the database and the repos are taken while every app's
//! lock is held, so no push, deploy or config change is half-way through
//! and every live release's commit is in its repo. The apps keep serving
//! meanwhile; their data dirs are copied after the locks are released, as
//! the apps write them anyway, and each SQLite database found there is
//! copied through the online backup API (never a torn page).
//!
//! The daemon writes the archive to DIR/tmp, unlinks it and streams it to
//! the CLI, which writes FILE through a temporary file and a rename after
//! checking the whole archive: a failure leaves no partial FILE.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::names::AppName;
use crate::platform::Platform;

/// The archive's first entry: what it is and which apps it holds.
const MANIFEST: &str = "slipway-backup.json";
/// Bumped when the layout of the archive changes incompatibly.
const FORMAT: u32 = 1;
/// Files at the top of the data dir that hold state (keys).
const ROOT_FILES: &[&str] = &["admin-token", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"];

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    slipway: String,
    created_at: String,
    apps: Vec<String>,
}

/// What a finished snapshot holds, for the CLI's summary.
#[derive(Debug)]
pub struct Summary {
    pub apps: usize,
    pub bytes: u64,
}

/// Daemon side: write a snapshot of the server to an unlinked temporary
/// file under DIR/tmp, rewound, ready to stream.
pub async fn snapshot(p: &Platform) -> Result<(File, u64)> {
    let mut names: Vec<AppName> = p.store.call(|s| s.apps()).await?.iter().filter_map(|a| AppName::parse(&a.name).ok()).collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    // In name order, as every taker of several locks must, so two never wait on each other.
    let mut guards = Vec::with_capacity(names.len());
    for app in &names {
        guards.push(p.app_lock(app).lock_owned().await);
    }
    let (layout, store) = (p.layout.clone(), p.store.clone());
    let apps = names.clone();
    let builder = tokio::task::spawn_blocking(move || -> Result<tar::Builder<flate2::write::GzEncoder<BufWriter<File>>>> {
        std::fs::create_dir_all(layout.tmp()).with_context(|| format!("creating {}", layout.tmp().display()))?;
        let file = tempfile::tempfile_in(layout.tmp()).context("creating the archive in DIR/tmp")?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::fast()));
        tar.follow_symlinks(false);
        let manifest = Manifest {
            format: FORMAT,
            slipway: env!("CARGO_PKG_VERSION").to_string(),
            created_at: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
        };
        append_bytes(&mut tar, MANIFEST, &serde_json::to_vec_pretty(&manifest).context("encoding the manifest")?)?;
        let db = tempfile::Builder::new().prefix("backup-db-").tempdir_in(layout.tmp()).context("creating a scratch dir")?;
        let copy = db.path().join("slipway.db");
        store.backup_to(&copy)?;
        tar.append_path_with_name(&copy, "slipway.db").context("adding the database")?;
        for app in &apps {
            let repo = layout.repo(app);
            if repo.is_dir() {
                tar.append_dir_all(format!("repos/{app}.git"), &repo).with_context(|| format!("adding {}", repo.display()))?;
            }
        }
        Ok(tar)
    })
    .await
    .context("backup task")??;
    drop(guards);

    let layout = p.layout.clone();
    tokio::task::spawn_blocking(move || -> Result<(File, u64)> {
        let mut tar = builder;
        let scratch = tempfile::Builder::new().prefix("backup-sqlite-").tempdir_in(layout.tmp()).context("creating a scratch dir")?;
        for app in &names {
            let data = layout.app_data(app);
            if data.is_dir() {
                add_tree(&mut tar, &data, &format!("apps/{app}/data"), scratch.path())?;
            }
        }
        if layout.tls().is_dir() {
            tar.append_dir_all("tls", layout.tls()).context("adding DIR/tls")?;
        }
        for name in ROOT_FILES {
            let f = layout.root().join(name);
            if f.is_file() {
                tar.append_path_with_name(&f, name).with_context(|| format!("adding {}", f.display()))?;
            }
        }
        let gz = tar.into_inner().context("finishing the archive")?;
        let mut file = gz.finish().context("finishing the compression")?.into_inner().map_err(|e| e.into_error()).context("writing the archive")?;
        let len = file.metadata().context("archive size")?.len();
        std::io::Seek::rewind(&mut file).context("rewinding the archive")?;
        Ok((file, len))
    })
    .await
    .context("backup task")?
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes).with_context(|| format!("adding {name}"))
}

/// Add `dir` as `name`, walking it by hand: a SQLite database is copied
/// through the online backup API (its `-wal`/`-shm`/`-journal` then left
/// out), and a file that vanishes while we walk is skipped, as the app
/// removed it.
fn add_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, name: &str, scratch: &Path) -> Result<()> {
    tar.append_path_with_name(dir, name).with_context(|| format!("adding {}", dir.display()))?;
    let mut entries: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    let mut databases: Vec<String> = Vec::new();
    let mut rest = Vec::new();
    for entry in entries {
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let inner = format!("{name}/{file_name}");
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            add_tree(tar, &path, &inner, scratch)?;
        } else if meta.is_file() {
            let copy = scratch.join("db");
            let _ = std::fs::remove_file(&copy);
            match crate::store::snapshot_foreign_db(&path, &copy) {
                Ok(true) => {
                    let mut header = tar::Header::new_gnu();
                    header.set_metadata(&meta);
                    let mut f = File::open(&copy).context("reading a database copy")?;
                    header.set_size(f.metadata().context("database copy size")?.len());
                    header.set_cksum();
                    tar.append_data(&mut header, &inner, &mut f).with_context(|| format!("adding {}", path.display()))?;
                    databases.push(file_name);
                    // Opening it may have made its -shm as root: hand it back.
                    give_back_sidecars(&path, &meta);
                }
                Ok(false) => rest.push((path, inner)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "online copy of a database failed; copying the file");
                    rest.push((path, inner));
                }
            }
        } else if meta.file_type().is_symlink() {
            rest.push((path, inner));
        }
        // Sockets, fifos and devices (gunicorn's control socket) are the
        // running processes' business: nothing to restore.
    }
    for (path, inner) in rest {
        let sidecar = ["-wal", "-shm", "-journal"]
            .iter()
            .any(|s| inner.strip_suffix(s).and_then(|base| base.rsplit('/').next()).is_some_and(|b| databases.iter().any(|d| d == b)));
        if sidecar {
            continue;
        }
        match tar.append_path_with_name(&path, &inner) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("adding {}", path.display())),
        }
    }
    Ok(())
}

fn give_back_sidecars(db: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    for suffix in ["-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{suffix}", db.display()));
        if f.exists() {
            let _ = std::os::unix::fs::lchown(&f, Some(meta.uid()), Some(meta.gid()));
        }
    }
}

/// Check a whole archive (every entry, the gzip checksum, the manifest
/// first and the database present) without writing anything.
pub fn verify(path: &Path) -> Result<Summary> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut manifest = None;
    let mut has_db = false;
    for entry in archive.entries().context("not a slipway backup (reading the archive)")? {
        let mut entry = entry.context("not a slipway backup, or truncated (reading the archive)")?;
        let name = entry.path().context("entry name")?.into_owned();
        check_entry(&name, manifest.is_some())?;
        if name == Path::new(MANIFEST) {
            manifest = Some(read_manifest(&mut entry)?);
        }
        has_db |= name == Path::new("slipway.db");
        std::io::copy(&mut entry, &mut std::io::sink()).context("truncated or corrupt backup")?;
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).context("truncated or corrupt backup (gzip)")?;
    let manifest = manifest.ok_or_else(|| anyhow!("not a slipway backup: no {MANIFEST}"))?;
    if !has_db {
        bail!("not a slipway backup: no database in it");
    }
    Ok(Summary { apps: manifest.apps.len(), bytes })
}

fn read_manifest(entry: &mut impl Read) -> Result<Manifest> {
    let mut text = String::new();
    entry.take(64 * 1024).read_to_string(&mut text).context("reading the backup's manifest")?;
    let m: Manifest = serde_json::from_str(&text).context("not a slipway backup (bad manifest)")?;
    if m.format != FORMAT {
        bail!("backup format {} is not supported by this slipway (it reads format {FORMAT})", m.format);
    }
    Ok(m)
}

/// Only what a backup holds may come out of one, and never outside DIR:
/// the first entry is the manifest; then the database, the root key files,
/// `tls/…`, `repos/APP.git/…`, `apps/APP/data/…`, by plain relative paths.
fn check_entry(name: &Path, after_manifest: bool) -> Result<()> {
    let parts: Vec<&str> = name
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().ok_or_else(|| anyhow!("not a slipway backup: a non-UTF-8 entry name")),
            _ => Err(anyhow!("not a slipway backup: entry {} is not a plain relative path", name.display())),
        })
        .collect::<Result<_>>()?;
    if !after_manifest {
        return if parts == [MANIFEST] { Ok(()) } else { bail!("not a slipway backup: it does not start with {MANIFEST}") };
    }
    let ok = match parts.as_slice() {
        ["slipway.db"] => true,
        [f] => ROOT_FILES.contains(f),
        ["tls", ..] => true,
        ["repos", repo, ..] => repo.strip_suffix(".git").is_some_and(|a| AppName::parse(a).is_ok()),
        ["apps", app, "data", ..] => AppName::parse(app).is_ok(),
        _ => false,
    };
    if !ok {
        bail!("not a slipway backup: unexpected entry {}", name.display());
    }
    Ok(())
}

/// `slipway restore FILE --data DIR`, offline: unpack into a scratch dir
/// beside DIR, check it, and only then rename it to DIR. DIR must not
/// exist or be empty; on any error DIR is left as it was.
pub fn restore(file: &Path, data: &Path) -> Result<Summary> {
    match std::fs::read_dir(data) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} is not empty: restore needs a fresh data dir", data.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", data.display())),
    }
    let summary = verify(file)?;
    let parent = match data.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let stage = tempfile::Builder::new().prefix(".slipway-restore-").tempdir_in(&parent).with_context(|| format!("creating a scratch dir in {}", parent.display()))?;
    unpack(file, stage.path())?;
    // The restored server claims its own block of app uids at start (the
    // recorded ones are the old server's); its data is handed to them then.
    crate::store::Store::open(&Layout::new(stage.path()).db())?.forget_app_users()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(stage.path(), std::fs::Permissions::from_mode(0o700)).context("chmod the restored dir")?;
    }
    let staged = stage.keep();
    // rename(2) replaces an empty directory; a non-empty one (filled since
    // the check) makes it fail, and the scratch dir goes.
    if let Err(e) = std::fs::rename(&staged, data) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("moving the restored data into {}", data.display()));
    }
    Ok(summary)
}

fn unpack(file: &Path, into: &Path) -> Result<()> {
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(root);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    let mut first = true;
    for entry in archive.entries().context("reading the backup")? {
        let mut entry = entry.context("reading the backup")?;
        let name = entry.path().context("entry name")?.into_owned();
        check_entry(&name, !first)?;
        first = false;
        if name == Path::new(MANIFEST) {
            continue;
        }
        // unpack_in refuses anything that would land outside `into`
        // (`..`, absolute paths, through a symlink unpacked before).
        if !entry.unpack_in(into).with_context(|| format!("unpacking {}", name.display()))? {
            bail!("not a slipway backup: entry {} escapes the data dir", name.display());
        }
    }
    Ok(())
}
