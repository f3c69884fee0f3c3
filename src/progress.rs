//! Progress of a long operation (deploy, rollback, config change), as
//! lines for a person: the push prints them as `remote:` lines, the CLI
//! prints them as they come.

use tokio::sync::mpsc::UnboundedSender;

/// A cheap, cloneable sink of progress lines. A detached one (the
/// daemon restoring apps at start-up) drops them.
#[derive(Clone, Default)]
pub struct Progress {
    tx: Option<UnboundedSender<String>>,
}

impl Progress {
    pub fn new(tx: UnboundedSender<String>) -> Progress {
        Progress { tx: Some(tx) }
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

    fn send(&self, line: String) {
        if let Some(tx) = &self.tx {
            // The receiver going away (client disconnected) must not stop
            // the deploy: it completes or rolls back regardless.
            let _ = tx.send(line);
        }
    }
}
