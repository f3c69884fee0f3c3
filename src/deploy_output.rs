//! Each release's full deploy output (every progress line the client
//! saw, the steps' own output included), kept in DIR/apps/APP/logs/
//! deploys for `slipway logs APP --deploy [vN]`, failed deploys included.
//!
//! Bounded: the file is cut over to `vN.log.1` once it passes [`LIMIT`],
//! so a release keeps at most twice that on disk and shows the last
//! [`LIMIT`] bytes; only the newest [`KEPT`] releases keep theirs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes of a deploy's output shown (the last ones).
pub const LIMIT: u64 = 1024 * 1024;
/// Releases whose output is kept.
pub const KEPT: u32 = 50;

/// The writer one deploy's progress tees into.
pub struct Recorder {
    path: PathBuf,
    file: Mutex<Option<(File, u64)>>,
}

impl Recorder {
    /// Start recording into `path` (a fresh file: a release number is
    /// never reused, but a leftover of a crashed daemon may be there).
    pub fn create(path: PathBuf) -> Recorder {
        let _ = std::fs::remove_file(rotated(&path));
        let _ = std::fs::remove_file(&path);
        Recorder { path, file: Mutex::new(None) }
    }

    /// Append one line. Errors are dropped: recording must never fail a
    /// deploy (the line still reached the client and the app's log).
    pub fn line(&self, line: &str) {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.append(&mut guard, line).is_err() {
            *guard = None;
        }
    }

    fn append(&self, guard: &mut Option<(File, u64)>, line: &str) -> std::io::Result<()> {
        if guard.as_ref().is_some_and(|(_, size)| *size >= LIMIT) {
            *guard = None;
            std::fs::rename(&self.path, rotated(&self.path))?;
        }
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            let size = f.metadata()?.len();
            *guard = Some((f, size));
        }
        if let Some((f, size)) = guard.as_mut() {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
            *size += line.len() as u64 + 1;
        }
        Ok(())
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The last [`LIMIT`] bytes of the output recorded at `path`, from a
/// whole line on; `None` when none was recorded.
pub fn read(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut found = false;
    for p in [rotated(path), path.to_path_buf()] {
        match File::open(&p) {
            Ok(mut f) => {
                found = true;
                // Never more than LIMIT from one file: the current one is
                // cut over past it, the rotated one was.
                let len = f.metadata()?.len();
                f.seek(SeekFrom::Start(len.saturating_sub(LIMIT)))?;
                f.take(LIMIT).read_to_end(&mut out)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !found {
        return Ok(None);
    }
    if out.len() as u64 > LIMIT {
        let cut = out.len() - LIMIT as usize;
        let from = out[cut..].iter().position(|b| *b == b'\n').map_or(cut, |i| cut + i + 1);
        out.drain(..from);
    }
    Ok(Some(out))
}

/// Remove the output of releases older than the newest [`KEPT`] in `dir`.
pub fn prune(dir: &Path, newest: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let version = name.strip_prefix('v').and_then(|n| n.split('.').next()).and_then(|n| n.parse::<u32>().ok());
        if version.is_some_and(|v| v.saturating_add(KEPT) <= newest) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_limit_bytes_from_a_whole_line() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("deploys/v1.log");
        let rec = Recorder::create(path.clone());
        let line = "x".repeat(999);
        for _ in 0..3000 {
            rec.line(&line);
        }
        rec.line("the end");
        let out = read(&path)?.unwrap_or_default();
        assert!(out.len() as u64 <= LIMIT);
        assert!(out.len() as u64 > LIMIT - 2000);
        assert!(out.starts_with(line.as_bytes()));
        assert!(out.ends_with(b"the end\n"));
        assert!(read(&dir.path().join("deploys/v2.log"))?.is_none());
        Ok(())
    }
}
