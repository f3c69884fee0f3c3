//! App uids that belong to one server on the host and to no host user.
//!
//! Each server (data dir) claims a block of [`BLOCK`] uids in a host-wide
//! registry, /var/lib/slipway-uids (`SLIPWAY_UID_REGISTRY` moves it): one
//! file per block, named by its number, holding the data dir that owns
//! it; the data dir remembers its block in DIR/uid-block. Claims happen
//! under an flock on the registry, so two servers starting at once never
//! take the same block. A block whose data dir is gone, or no longer names
//! that block, is stale and may be claimed again. A block holding any uid
//! or gid of /etc/passwd or /etc/group is never claimed.
//!
//! Invariant: an app uid is used by exactly one app of one server, so
//! "every process of this uid" is exactly that app's processes; that is
//! what lets [`super::kill_user`] stop an app whatever it detached.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The first app uid on any host (above any distribution's range).
pub const FIRST: u32 = 200_000;
/// App uids per server.
pub const BLOCK: u32 = 10_000;
/// Blocks there may be (up to uid 1.2e9, below the 2^31 some tools take).
const MAX_BLOCKS: u32 = 100_000;

fn registry() -> PathBuf {
    std::env::var_os("SLIPWAY_UID_REGISTRY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/slipway-uids"))
}

/// This data dir's block's first uid, claiming a block if it has none.
/// `in_use`: a uid the data dir's apps already have (from before blocks),
/// whose block is then the one to claim.
pub fn claim(data: &Path, in_use: Option<u32>) -> Result<u32> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let data = std::fs::canonicalize(data).with_context(|| format!("resolving {}", data.display()))?;
    let reg = registry();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&reg)
        .with_context(|| format!("creating the uid registry {}", reg.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(reg.join(".lock"))
        .with_context(|| format!("opening {}", reg.join(".lock").display()))?;
    // SAFETY: flock on our own descriptor; it is released when `lock`
    // closes at the end of this function.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the uid registry");
    }
    let host_ids = host_ids();
    let mine = data.join("uid-block");
    let remembered: Option<u32> = std::fs::read_to_string(&mine).ok().and_then(|s| s.trim().parse().ok());
    let wanted = remembered.or_else(|| in_use.and_then(|u| u.checked_sub(FIRST)).map(|o| o / BLOCK));
    let block = match wanted {
        Some(b) => {
            match owner(&reg, b) {
                Some(other) if other != data && owns(&other, b) => bail!(
                    "app uids {}..{} of this data dir are claimed by the slipway server of {}; two servers must not share app users (is one data dir a copy of the other?)",
                    base(b),
                    base(b) + BLOCK,
                    other.display()
                ),
                _ => {}
            }
            if let Some(id) = host_ids.iter().find(|id| (base(b)..base(b) + BLOCK).contains(id)) {
                tracing::warn!(id, "a host user or group now has an id in this server's app uid block");
            }
            b
        }
        None => (0..MAX_BLOCKS)
            .find(|&b| {
                let free = match owner(&reg, b) {
                    None => true,
                    Some(other) => !owns(&other, b),
                };
                free && !host_ids.iter().any(|id| (base(b)..base(b) + BLOCK).contains(id))
            })
            .context("no free block of app uids is left on this host")?,
    };
    std::fs::write(reg.join(block.to_string()), format!("{}\n", data.display()))
        .with_context(|| format!("writing the uid registry {}", reg.display()))?;
    std::fs::write(&mine, format!("{block}\n")).with_context(|| format!("writing {}", mine.display()))?;
    Ok(base(block))
}

fn base(block: u32) -> u32 {
    FIRST + block * BLOCK
}

/// The data dir the registry names for `block`.
fn owner(reg: &Path, block: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(reg.join(block.to_string())).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Does `data` (still) hold `block`?
fn owns(data: &Path, block: u32) -> bool {
    std::fs::read_to_string(data.join("uid-block")).ok().and_then(|s| s.trim().parse::<u32>().ok()) == Some(block)
}

/// Every uid and gid the host's passwd and group files name.
fn host_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    for (file, field) in [("/etc/passwd", 2), ("/etc/passwd", 3), ("/etc/group", 2)] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        ids.extend(text.lines().filter_map(|l| l.split(':').nth(field)).filter_map(|id| id.parse::<u32>().ok()));
    }
    ids
}
