//! Supervised processes: one task per process instance that starts it,
//! captures its output into the app's log, restarts it by policy with
//! capped exponential backoff, marks a crash loop `crashed`, and stops its
//! whole process group with the type's stop signal and grace period.
//!
//! The supervisor knows processes, not deploys: the release pipeline asks
//! it for instances, decides which serve, and tells it which to stop.
//! Every live instance leaves a pid file (pid and start time) under
//! DIR/run/APP so that a restarted daemon can stop what a crashed one left
//! behind instead of running a duplicate.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::logs::AppLog;
use crate::manifest::RestartPolicy;
use crate::runtime::{self, ProcessCommand};

/// What to run for one instance of a process type.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub app: String,
    pub release: u32,
    pub ptype: String,
    pub index: u32,
    pub command: ProcessCommand,
    pub port: Option<u16>,
    pub restart: RestartPolicy,
    pub stop_signal: i32,
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Running,
    /// Waiting to be restarted after an exit.
    Backoff,
    /// Ended and, by its policy, not restarted (a finished one-shot).
    Exited,
    /// Restarted too often in too little time; given up on.
    Crashed,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: State,
    /// The release it serves: its start release, or a later one it was
    /// reloaded onto in place.
    pub release: u32,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    #[serde(skip)]
    pub since: Option<Instant>,
}

pub struct Instance {
    pub spec: InstanceSpec,
    status: watch::Sender<Status>,
    stop: watch::Sender<bool>,
    /// The last lines it printed, for crash reports.
    tail: Mutex<VecDeque<String>>,
}

impl Instance {
    pub fn name(&self) -> String {
        format!("{}.{}", self.spec.ptype, self.spec.index)
    }
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }
    /// Record that a reload in place moved it onto `release`.
    pub fn set_release(&self, release: u32) {
        self.status.send_modify(|s| s.release = release);
    }
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
    fn remember(&self, line: &str) {
        let mut t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_string());
    }

    /// Stop it: stop signal to the group, SIGKILL after the stop timeout.
    /// Returns once nothing of it runs.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let mut rx = self.status.subscribe();
        let _ = rx
            .wait_for(|s| matches!(s.state, State::Stopped | State::Exited | State::Crashed))
            .await;
    }
}

/// Restart backoff: 100 ms doubling to 10 s; a run of 10 s or more counts
/// as healthy and resets it. Five quick failures in a row is a crash loop.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
const HEALTHY_RUN: Duration = Duration::from_secs(10);
const CRASH_LOOP: u32 = 5;
const TAIL_LINES: usize = 20;

pub struct Supervisor {
    run_dir: PathBuf,
    apps: Mutex<HashMap<String, Vec<Arc<Instance>>>>,
}

impl Supervisor {
    pub fn new(run_dir: PathBuf) -> Supervisor {
        Supervisor { run_dir, apps: Mutex::new(HashMap::new()) }
    }

    /// Start one instance under supervision. It is not yet part of the
    /// app's set: the pipeline adopts it with [`Supervisor::replace`] once
    /// it has proven healthy.
    pub fn start(&self, spec: InstanceSpec, log: Arc<AppLog>) -> Arc<Instance> {
        let (status, _) = watch::channel(Status {
            state: State::Starting,
            release: spec.release,
            pid: None,
            restarts: 0,
            last_exit: None,
            since: None,
        });
        let (stop, stop_rx) = watch::channel(false);
        let inst = Arc::new(Instance { spec, status, stop, tail: Mutex::new(VecDeque::new()) });
        // One file per process, named by its pid: two instances of the same
        // name (a restart's new web.1 beside the old) never share one.
        let pid_dir = self.run_dir.join(&inst.spec.app);
        tokio::spawn(supervise(inst.clone(), stop_rx, log, pid_dir));
        inst
    }

    /// Make `new` the app's whole set of instances; return the ones it
    /// replaces, for the caller to drain and stop.
    pub fn swap(&self, app: &str, new: Vec<Arc<Instance>>) -> Vec<Arc<Instance>> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(apps.entry(app.to_string()).or_default(), new)
    }

    /// Add instances to the app's set (scaling up).
    pub fn adopt(&self, app: &str, new: Vec<Arc<Instance>>) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.entry(app.to_string()).or_default().extend(new);
    }

    /// Take these instances out of the app's set (scaling down).
    pub fn remove(&self, app: &str, gone: &[Arc<Instance>]) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = apps.get_mut(app) {
            set.retain(|i| !gone.iter().any(|g| Arc::ptr_eq(g, i)));
        }
    }

    /// Remove and return all of an app's instances.
    pub fn take_all(&self, app: &str) -> Vec<Arc<Instance>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).remove(app).unwrap_or_default()
    }

    pub fn instances(&self, app: &str) -> Vec<Arc<Instance>> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = apps.get(app).cloned().unwrap_or_default();
        v.sort_by(|a, b| (&a.spec.ptype, a.spec.index).cmp(&(&b.spec.ptype, b.spec.index)));
        v
    }

    pub fn apps(&self) -> Vec<String> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Stop every process a previous daemon left running, found through
    /// the pid files. A pid whose start time differs was reused by an
    /// unrelated process and is left alone.
    pub async fn reap_leftovers(&self) -> usize {
        let mut groups = Vec::new();
        let Ok(apps) = std::fs::read_dir(&self.run_dir) else { return 0 };
        for app in apps.flatten() {
            let Ok(files) = std::fs::read_dir(app.path()) else { continue };
            for f in files.flatten() {
                let path = f.path();
                let recorded = std::fs::read_to_string(&path).unwrap_or_default();
                let mut it = recorded.split_whitespace();
                let pid: Option<i32> = it.next().and_then(|s| s.parse().ok());
                let start: Option<u64> = it.next().and_then(|s| s.parse().ok());
                if let (Some(pid), Some(start)) = (pid, start) {
                    if runtime::start_time(pid) == Some(start) {
                        runtime::signal_group(pid, libc::SIGTERM);
                        groups.push(pid);
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while groups.iter().any(|g| runtime::group_alive(*g)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for g in &groups {
            runtime::signal_group(*g, libc::SIGKILL);
        }
        groups.len()
    }
}

async fn supervise(inst: Arc<Instance>, mut stop_rx: watch::Receiver<bool>, log: Arc<AppLog>, pid_dir: PathBuf) {
    let name = inst.name();
    let spec = &inst.spec;
    let mut backoff = BACKOFF_START;
    let mut quick_failures = 0u32;
    let mut restarts = 0u32;
    loop {
        if *stop_rx.borrow() {
            set_state(&inst, State::Stopped, None);
            return;
        }
        let mut child = match runtime::spawn(&spec.command) {
            Ok(c) => c,
            Err(e) => {
                log.write("slipway", &format!("{name} could not start: {e}"));
                set_state(&inst, State::Crashed, Some(format!("spawn failed: {e}")));
                return;
            }
        };
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let pidfile = pid_dir.join(format!("{}.{pid}.pid", name));
        write_pidfile(&pidfile, pid);
        let started = Instant::now();
        inst.status.send_modify(|s| {
            s.state = State::Running;
            s.pid = Some(pid);
            s.since = Some(started);
        });
        log.write("slipway", &format!("{name} started (pid {pid}, release v{})", spec.release));

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(runtime::pump_lines(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(runtime::pump_lines(err, tx));
        }
        let log2 = log.clone();
        let source = name.clone();
        let inst2 = inst.clone();
        let mut pump = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                inst2.remember(&line);
                log2.write(&source, &line);
            }
        });

        let stopped = tokio::select! {
            status = child.wait() => {
                let desc = match status {
                    Ok(s) => runtime::describe_exit(s),
                    Err(e) => format!("wait failed: {e}"),
                };
                // The group leader is gone; take whatever it forked with it,
                // so a restart finds its port free.
                runtime::signal_group(pid, libc::SIGKILL);
                // Let its last lines reach the log and the tail before the
                // exit is published: a crash report should show them.
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut pump).await;
                let clean = desc == "code 0";
                log.write("slipway", &format!("{name} exited with {desc}"));
                inst.status.send_modify(|s| {
                    s.last_exit = Some(desc);
                    s.pid = None;
                });
                Some(clean)
            }
            _ = stop_requested(&mut stop_rx) => None,
        };

        let Some(clean) = stopped else {
            // Stop requested: signal, grace period, then SIGKILL.
            runtime::signal_group(pid, spec.stop_signal);
            let graceful = tokio::time::timeout(spec.stop_timeout, child.wait()).await.is_ok();
            runtime::signal_group(pid, libc::SIGKILL);
            if !graceful {
                let _ = child.wait().await;
                log.write("slipway", &format!("{name} killed after {}s stop timeout", spec.stop_timeout.as_secs()));
            } else {
                log.write("slipway", &format!("{name} stopped"));
            }
            let _ = std::fs::remove_file(&pidfile);
            pump.abort();
            set_state(&inst, State::Stopped, None);
            return;
        };
        let _ = std::fs::remove_file(&pidfile);

        match spec.restart {
            RestartPolicy::Never => {
                set_state(&inst, State::Exited, None);
                return;
            }
            RestartPolicy::OnFailure if clean => {
                set_state(&inst, State::Exited, None);
                return;
            }
            _ => {}
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = BACKOFF_START;
            quick_failures = 0;
        } else {
            quick_failures += 1;
        }
        if quick_failures >= CRASH_LOOP {
            log.write("slipway", &format!("{name} crashed: exited {quick_failures} times in a row within {}s of starting; not restarting", HEALTHY_RUN.as_secs()));
            set_state(&inst, State::Crashed, None);
            return;
        }
        restarts += 1;
        inst.status.send_modify(|s| {
            s.state = State::Backoff;
            s.restarts = restarts;
        });
        log.write("slipway", &format!("{name} restarting in {} ms", backoff.as_millis()));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop_requested(&mut stop_rx) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Resolves once a stop is asked for. (The guard `wait_for` returns must
/// not live across an await, or the task would not be `Send`.)
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn set_state(inst: &Instance, state: State, last_exit: Option<String>) {
    inst.status.send_modify(|s| {
        s.state = state;
        s.pid = None;
        if last_exit.is_some() {
            s.last_exit = last_exit;
        }
    });
}

fn write_pidfile(path: &PathBuf, pid: i32) {
    let start = runtime::start_time(pid).unwrap_or(0);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(path, format!("{pid} {start}\n")) {
        tracing::warn!(path = %path.display(), error = %e, "writing pid file failed");
    }
}
