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
/// Lines kept for `logs -f` followers that lag: with 64 KiB lines, 8 MiB
/// per followed app; a follower further behind is told how many it lost.
const LIVE_LINES: usize = 128;
/// The longest line a tail reads whole (an app line is at most 64 KiB).
const MAX_LINE: u64 = 128 * 1024;
/// Bytes sent to a tail's client per chunk, and chunks queued for it.
const CHUNK: usize = 16 * 1024;
const CHUNKS_QUEUED: usize = 2;
/// Tails scanning the files at once; more wait their turn, so 40 clients
/// asking for 10,000 lines cost disk time, not memory.
static SCANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

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
                    live: broadcast::channel(LIVE_LINES).0,
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
        self.write_lines(source, &[text]);
    }

    /// Append several lines from `source` at once, under one timestamp and
    /// in one write (the router's lines, a batch at a time).
    pub fn write_lines(&self, source: &str, texts: &[impl AsRef<str>]) {
        if texts.is_empty() {
            return;
        }
        // RFC 3339 with milliseconds, as `%Y-%m-%dT%H:%M:%S%.3fZ` gives it,
        // without parsing a format string per call.
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut lines = String::with_capacity(texts.iter().map(|t| ts.len() + source.len() + t.as_ref().len() + 4).sum());
        // Followers get each line without its newline; none, no copy (the
        // router writes a line per request).
        let followed = self.live.receiver_count() > 0;
        for text in texts {
            let start = lines.len();
            lines.push_str(&ts);
            lines.push(' ');
            lines.push_str(source);
            lines.push_str(": ");
            lines.push_str(text.as_ref());
            if followed {
                let _ = self.live.send(lines[start..].to_string());
            }
            lines.push('\n');
        }
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.append(&mut guard, &lines) {
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
            // One write per call (newlines included): appends from the
            // daemon's threads stay whole lines, and a batch of lines
            // costs one syscall.
            f.write_all(line.as_bytes())?;
            *size += line.len() as u64;
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

    /// The last `n` lines that `keep` accepts, from the current file and,
    /// when it is short, the rotated ones before it, streamed in small
    /// chunks as the client reads them: memory stays a few chunks per
    /// client whatever `n` and the line lengths.
    pub fn tail_stream<F>(&self, n: usize, keep: F) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<bytes::Bytes>>
    where
        F: Fn(&str) -> bool + Send + Sync + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_QUEUED);
        let dir = self.dir.clone();
        tokio::spawn(async move {
            let segments = {
                let Ok(_permit) = SCANS.acquire().await else { return };
                let dir = dir.clone();
                let keep = &keep;
                // Scanning reads whole files: off the async threads.
                match tokio::task::block_in_place(move || tail_segments(&dir, n, keep)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            };
            let _ = stream_segments(segments, &keep, &tx).await;
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// One line (at most [`MAX_LINE`] bytes, a longer one comes in pieces)
/// into `buf`; 0 at the end.
fn read_line(r: &mut BufReader<File>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::io::Read;
    buf.clear();
    r.by_ref().take(MAX_LINE).read_until(b'\n', buf)
}

/// Where the last `n` kept lines start: (file, from offset, to length),
/// oldest first. Each file is read forward keeping only the offsets of
/// the last `n` kept lines.
fn tail_segments(dir: &std::path::Path, n: usize, keep: &dyn Fn(&str) -> bool) -> std::io::Result<Vec<(File, u64, u64)>> {
    use std::io::Seek;
    let mut need = n;
    let mut segments = Vec::new();
    let mut files = vec![dir.join("app.log")];
    files.extend((1..=KEEP_ROTATED).map(|i| dir.join(format!("app.log.{i}"))));
    let mut buf = Vec::new();
    for path in files {
        if need == 0 {
            break;
        }
        let Ok(f) = File::open(&path) else { continue };
        // Lines appended after this point reach followers live instead.
        let len = f.metadata()?.len();
        let mut starts: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
        let mut r = BufReader::new(f);
        let mut at = 0u64;
        while at < len {
            let read = read_line(&mut r, &mut buf)?;
            if read == 0 {
                break;
            }
            if keep(String::from_utf8_lossy(&buf).trim_end_matches('\n')) {
                if starts.len() == need {
                    starts.pop_front();
                }
                starts.push_back(at);
            }
            at += read as u64;
        }
        if let Some(&from) = starts.front() {
            need -= starts.len();
            let mut f = r.into_inner();
            f.seek(std::io::SeekFrom::Start(from))?;
            segments.push((f, from, len));
        }
    }
    segments.reverse();
    Ok(segments)
}

async fn stream_segments(
    segments: Vec<(File, u64, u64)>,
    keep: &(dyn Fn(&str) -> bool + Sync),
    tx: &tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) -> Result<(), ()> {
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut buf = Vec::new();
    for (f, from, len) in segments {
        let mut r = BufReader::with_capacity(CHUNK, f);
        let mut at = from;
        while at < len {
            // Small reads of a file the daemon just wrote (page cache).
            let read = read_line(&mut r, &mut buf).map_err(|_| ())?;
            if read == 0 {
                break;
            }
            at += read as u64;
            if !keep(String::from_utf8_lossy(&buf).trim_end_matches('\n')) {
                continue;
            }
            // Send what is gathered before a line would take the chunk past
            // CHUNK: a chunk is then at most one long line, not CHUNK plus one.
            if !chunk.is_empty() && chunk.len() + buf.len() > CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                tx.send(Ok(bytes::Bytes::from(full))).await.map_err(|_| ())?;
            }
            chunk.extend_from_slice(&buf);
            if !buf.ends_with(b"\n") {
                chunk.push(b'\n');
            }
        }
    }
    if !chunk.is_empty() {
        tx.send(Ok(bytes::Bytes::from(chunk))).await.map_err(|_| ())?;
    }
    Ok(())
}
