//! POSIX access ACLs on a directory: who besides root may enter it.
//!
//! Dependency environments are shared by more than one app user (a
//! promotion runs the staging app's environment as the live app's user),
//! so neither the owner nor the group bits can say "these apps and no
//! other". An access ACL can: `user:UID:r-x` per app that uses the
//! environment, nothing for others.
//!
//! Why not a crate: the ACL crates (`posix-acl`, `exacl`) link libacl,
//! which would make `libacl1-dev` a build dependency of every checkout and
//! of the demo. The kernel's xattr form is a fixed little-endian layout
//! (linux/posix_acl_xattr.h): a version word, then (tag, perm, id) entries
//! sorted by tag and id. That is all this module writes and reads.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const NAME: &[u8] = b"system.posix_acl_access\0";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;
const RWX: u16 = 7;
const RX: u16 = 5;

/// The xattr value of: owner rwx, each of `uids` r-x, owning group and
/// others nothing (mode 0750 with the mask at r-x).
fn encode(uids: &[u32]) -> Vec<u8> {
    let mut uids = uids.to_vec();
    uids.sort_unstable();
    uids.dedup();
    let mut entries = vec![(USER_OBJ, RWX, UNDEFINED_ID)];
    entries.extend(uids.iter().map(|&u| (USER, RX, u)));
    entries.extend([(GROUP_OBJ, 0, UNDEFINED_ID), (MASK, RX, UNDEFINED_ID), (OTHER, 0, UNDEFINED_ID)]);
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    out
}

/// The named users of an ACL value (those given any permission).
fn decode_users(value: &[u8]) -> Result<Vec<u32>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || value[..4] != VERSION.to_le_bytes() {
        bail!("unrecognised ACL ({} bytes)", value.len());
    }
    Ok(value[4..]
        .chunks_exact(8)
        .filter(|e| u16::from_le_bytes([e[0], e[1]]) == USER && u16::from_le_bytes([e[2], e[3]]) != 0)
        .map(|e| u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
        .collect())
}

fn c_path(dir: &Path) -> Result<CString> {
    CString::new(dir.as_os_str().as_bytes()).with_context(|| format!("{} has a NUL byte", dir.display()))
}

/// The users `dir`'s access ACL names; empty when it has none.
pub fn users(dir: &Path) -> Result<Vec<u32>> {
    let path = c_path(dir)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both pointers are valid for the lengths given; the names are NUL-terminated.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), NAME.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(Vec::new());
        }
        return Err(e).with_context(|| format!("reading the ACL of {}", dir.display()));
    }
    buf.truncate(n as usize);
    decode_users(&buf).with_context(|| format!("reading the ACL of {}", dir.display()))
}

/// Let `uid` (with the users already named) enter and read `dir`, and no
/// one else but its owner. Never follows a symlink.
pub fn grant(dir: &Path, uid: u32) -> Result<()> {
    let mut named = users(dir)?;
    if named.contains(&uid) && (std::fs::symlink_metadata(dir)?.permissions().mode() & 0o007) == 0 {
        return Ok(());
    }
    named.push(uid);
    let value = encode(&named);
    let path = c_path(dir)?;
    // SAFETY: both pointers are valid for the lengths given; the names are NUL-terminated.
    let rc = unsafe { libc::lsetxattr(path.as_ptr(), NAME.as_ptr().cast(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setting the ACL of {}", dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_acls_are_sorted_and_read_back() {
        let v = encode(&[300, 200, 300]);
        assert_eq!(v.len(), 4 + 8 * 6, "owner, two users, group, mask, other");
        assert_eq!(decode_users(&v).expect("test"), vec![200, 300]);
        assert!(decode_users(&v[..7]).is_err());
    }

    #[test]
    fn grant_closes_the_directory_to_others() {
        let dir = tempfile::tempdir().expect("test");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("test");
        grant(dir.path(), 4242).expect("test");
        grant(dir.path(), 4343).expect("test");
        assert_eq!(users(dir.path()).expect("test"), vec![4242, 4343]);
        let mode = std::fs::metadata(dir.path()).expect("test").permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "the group bits show the mask; others get nothing");
    }
}
