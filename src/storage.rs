//! `[storage]`: release paths kept across releases (DESIGN.md).
//!
//! Each item is DIR/apps/APP/data/storage/NAME, owned by the app's user.
//! A release sees it at its path through a symlink placed in the release
//! tree before the tree is sealed, so every process, one-off, build and
//! release phase that runs in the tree (or any later rollback to it) reads
//! and writes the same persistent item. SQLite resolves a symlinked
//! database path, so its journal and WAL files live beside the real file.
//!
//! Whether an item is a directory or a single file is fixed the first time
//! it is mounted: what the storage already holds wins; else what the pushed
//! tree has at that path (which then seeds the storage); else a name with an
//! extension (`db.sqlite3`) is a file and anything else a directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::layout::Layout;
use crate::manifest::StorageMount;
use crate::names::AppName;
use crate::runtime::AppUser;

/// Place the symlinks of every `[storage]` item of `app` in `tree`,
/// creating (and, from the tree, seeding) the items that do not exist yet.
/// Whatever the tree has at a storage path is replaced by the link; safe to
/// repeat (after a build phase, or on a tree copied from another app).
pub async fn mount(layout: &Layout, app: &AppName, tree: &Path, mounts: &[StorageMount], user: Option<AppUser>) -> Result<()> {
    if mounts.is_empty() {
        return Ok(());
    }
    let (root, tree, mounts) = (layout.storage(app), tree.to_path_buf(), mounts.to_vec());
    tokio::task::spawn_blocking(move || -> Result<()> {
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        give(&root, user, 0o700)?;
        for m in &mounts {
            mount_one(&root, &tree, m, user).with_context(|| format!("[storage] {:?} = {:?}", m.path, m.name))?;
        }
        Ok(())
    })
    .await
    .context("storage task")?
}

fn mount_one(root: &Path, tree: &Path, m: &StorageMount, user: Option<AppUser>) -> Result<()> {
    let at = in_tree(tree, &m.path)?;
    let item = root.join(&m.name);
    let existing = std::fs::symlink_metadata(&at).ok();
    if std::fs::symlink_metadata(&item).is_err() {
        match &existing {
            // The pushed tree seeds the storage the first time (a `media/`
            // with its `.gitkeep`, a committed demo database).
            Some(meta) if meta.is_dir() || meta.is_file() => {
                std::fs::rename(&at, &item).with_context(|| format!("moving {} into storage", m.path))?;
                give_tree(&item, user)?;
            }
            _ if looks_like_file(&m.name) => {}
            _ => {
                std::fs::create_dir(&item).with_context(|| format!("creating {}", item.display()))?;
                give(&item, user, 0o700)?;
            }
        }
    }
    match std::fs::symlink_metadata(&at) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&at),
        Ok(_) => std::fs::remove_file(&at),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("clearing {} in the release", m.path))?;
    std::os::unix::fs::symlink(&item, &at).with_context(|| format!("linking {} to storage", m.path))
}

/// `rel` inside `tree`, with every parent a real directory (created when
/// missing), never a symlink: a pushed repo decides what the tree holds.
fn in_tree(tree: &Path, rel: &str) -> Result<PathBuf> {
    let mut path = tree.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!("{} must be a directory in the release, not a file or symlink", path.strip_prefix(tree).unwrap_or(&path).display()),
            Err(_) => std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?,
        }
    }
    path.push(parts.last().copied().unwrap_or_default());
    Ok(path)
}

/// `db.sqlite3`, `data.json`: a single file; `media`, `uploads`: a directory.
fn looks_like_file(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stem, ext)| !stem.is_empty() && !ext.is_empty())
}

fn give(path: &Path, user: Option<AppUser>, mode: u32) -> Result<()> {
    match user {
        Some(u) => crate::build::chown(path, u, mode),
        None => Ok(()),
    }
}

/// Hand a seeded item (moved out of a root-owned tree) to the app's user,
/// without following symlinks.
pub(crate) fn give_tree(path: &Path, user: Option<AppUser>) -> Result<()> {
    let Some(u) = user else { return Ok(()) };
    let out = std::process::Command::new("chown")
        .args(["-R", "-P", "-h", &format!("{}:{}", u.uid, u.gid)])
        .arg(path)
        .output()
        .context("running chown")?;
    if !out.status.success() {
        bail!("chown {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_or_directory_by_name() {
        assert!(looks_like_file("db.sqlite3"));
        assert!(looks_like_file("a.json"));
        assert!(!looks_like_file("media"));
        assert!(!looks_like_file("uploads."));
    }
}
