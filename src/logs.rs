//! Per-app logs: every process's stdout and stderr, and deploy and
//! supervisor events, as timestamped lines in DIR/apps/APP/logs/app.log,
//! rotated by size, and broadcast live to `logs -f` followers.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::layout::Layout;
use crate::names::AppName;

const ROTATE_BYTES: u64 = 10 * 1024 * 1024;
const KEEP_ROTATED: u32 = 3;

#[derive(Clone)]
pub struct Logs {
    layout: Layout,
    apps: Arc<Mutex<HashMap<String, Arc<AppLog>>>>,
}

pub struct AppLog {
    dir: PathBuf,
    file: Mutex<Option<(File, u64)>>,
    live: broadcast::Sender<String>,
}

impl Logs {
    pub fn new(layout: Layout) -> Logs {
        Logs { layout, apps: Arc::default() }
    }

    pub fn app(&self, app: &AppName) -> Arc<AppLog> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.entry(app.to_string())
            .or_insert_with(|| {
                Arc::new(AppLog {
                    dir: self.layout.logs(app),
                    file: Mutex::new(None),
                    live: broadcast::channel(1024).0,
                })
            })
            .clone()
    }

    pub fn forget(&self, app: &AppName) {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).remove(app.as_str());
    }
}

impl AppLog {
    /// Append one line from `source` (`web.1`, `slipway`, ...).
    pub fn write(&self, source: &str, text: &str) {
        let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let line = format!("{ts} {source}: {text}");
        let _ = self.live.send(line.clone());
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.append(&mut guard, &line) {
            // Logging must never take an app down; the next write retries.
            *guard = None;
            tracing::warn!(dir = %self.dir.display(), error = %e, "writing app log failed");
        }
    }

    fn append(&self, guard: &mut Option<(File, u64)>, line: &str) -> std::io::Result<()> {
        if guard.as_ref().is_some_and(|(_, size)| *size >= ROTATE_BYTES) {
            *guard = None;
            self.rotate()?;
        }
        if guard.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            // Apps may traverse their app dir; their logs are the daemon's.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
            let f = OpenOptions::new().create(true).append(true).open(self.dir.join("app.log"))?;
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

    fn rotate(&self) -> std::io::Result<()> {
        for i in (1..KEEP_ROTATED).rev() {
            let from = self.dir.join(format!("app.log.{i}"));
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("app.log.{}", i + 1)))?;
            }
        }
        std::fs::rename(self.dir.join("app.log"), self.dir.join("app.log.1"))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.live.subscribe()
    }

    /// The last `n` lines, from the current file and, when it is short,
    /// the rotated ones before it.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut files = vec![self.dir.join("app.log")];
        files.extend((1..=KEEP_ROTATED).map(|i| self.dir.join(format!("app.log.{i}"))));
        for path in files {
            if out.len() >= n {
                break;
            }
            let Ok(f) = File::open(&path) else { continue };
            let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            let need = n - out.len();
            let start = lines.len().saturating_sub(need);
            let mut chunk = lines[start..].to_vec();
            chunk.append(&mut out);
            out = chunk;
        }
        out
    }
}
