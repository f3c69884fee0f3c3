//! Progress of a long operation (deploy, rollback, config change), as
//! lines for a person: the push prints them as `remote:` lines, the CLI
//! prints them as they come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

/// Lines that may wait for a slow client before some are dropped.
pub const QUEUE: usize = 1024;

/// A cheap, cloneable sink of progress lines. A detached one (the
/// daemon restoring apps at start-up) drops them.
#[derive(Clone, Default)]
pub struct Progress {
    tx: Option<Sender<String>>,
    /// Lines dropped since the last one delivered: said in the stream.
    dropped: Arc<AtomicU64>,
    /// history track: every line also goes to the release's kept output.
    record: Option<Arc<crate::deploy_output::Recorder>>,
}

impl Progress {
    /// Over a bounded queue (see [`QUEUE`]): a client reading slower than
    /// a build prints loses lines, told how many, rather than the daemon
    /// buffering them without end.
    pub fn new(tx: Sender<String>) -> Progress {
        Progress { tx: Some(tx), dropped: Arc::default(), record: None }
    }

    /// The same sink, also recording every line (a release's deploy
    /// output, whether or not a client still reads).
    pub fn recording(&self, record: crate::deploy_output::Recorder) -> Progress {
        Progress { record: Some(Arc::new(record)), ..self.clone() }
    }

    /// A step heading, Heroku style.
    pub fn step(&self, text: &str) {
        self.send(format!("-----> {text}"));
    }

    /// Detail under the current step.
    pub fn info(&self, text: &str) {
        self.send(format!("       {text}"));
    }

    /// A line of a child process's output.
    pub fn output(&self, text: &str) {
        self.send(format!("       | {text}"));
    }

    /// The failure line the client prints itself (`!` in a push): kept in
    /// the recorded output only, so it reads as the pusher saw it.
    pub fn record_failure(&self, text: &str) {
        if let Some(r) = &self.record {
            r.line(&format!("!      {text}"));
        }
    }

    fn send(&self, line: String) {
        if let Some(r) = &self.record {
            r.line(&line);
        }
        let Some(tx) = &self.tx else { return };
        // The receiver going away (client disconnected) must not stop the
        // deploy: it completes or rolls back regardless.
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            match tx.try_send(format!("       ({dropped} lines dropped: the client reads too slowly)")) {
                Ok(()) => {
                    self.dropped.fetch_sub(dropped, Ordering::Relaxed);
                }
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
