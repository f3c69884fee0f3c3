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
    /// Its last stop took SIGKILL: it ignored its stop signal (issue 9 #9).
    #[serde(skip)]
    pub ignored_stop: bool,
    #[serde(skip)]
    pub since: Option<Instant>,
}

pub struct Instance {
    pub spec: InstanceSpec,
    status: watch::Sender<Status>,
    stop: watch::Sender<bool>,
    /// upgrade track: let go of the process without stopping it (a
    /// hand-over to the next daemon, which adopts it).
    detach: watch::Sender<bool>,
    /// upgrade track: a second read end of its output pipes, so the pipes
    /// keep a reader (and the app no EPIPE) until this daemon exits, even
    /// after its pumps let go at a hand-over.
    held: Mutex<Vec<std::os::fd::OwnedFd>>,
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
    /// Stop it and wait; `Some(what happened)` when it ignored its stop
    /// signal and was killed at the end of its stop timeout.
    pub async fn stop(&self) -> Option<String> {
        let _ = self.stop.send(true);
        let mut rx = self.status.subscribe();
        let s = rx.wait_for(|s| matches!(s.state, State::Stopped | State::Exited | State::Crashed)).await.ok()?;
        s.ignored_stop.then(|| s.last_exit.clone()).flatten()
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
    adoptable: Mutex<Vec<Leftover>>,
}

/// upgrade track: one process a previous daemon left, as its pid file
/// (`TYPE.INDEX.PID.pid`: "pid start-time release port") records it.
#[derive(Debug, Clone)]
pub struct Leftover {
    pub app: String,
    pub ptype: String,
    pub index: u32,
    pub pid: i32,
    pub start: u64,
    pub release: Option<u32>,
    pub port: Option<u16>,
}

impl Leftover {
    fn parse(app: &str, file: &str, recorded: &str) -> Option<Leftover> {
        let mut name = file.strip_suffix(".pid")?.rsplitn(3, '.');
        let (_, index, ptype) = (name.next()?, name.next()?.parse().ok()?, name.next()?.to_string());
        let mut it = recorded.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        let release = it.next().and_then(|r| r.parse().ok());
        let port = it.next().and_then(|p| p.parse().ok());
        Some(Leftover { app: app.to_string(), ptype, index, pid, start, release, port })
    }
}

impl Supervisor {
    pub fn new(run_dir: PathBuf) -> Supervisor {
        Supervisor { run_dir, apps: Mutex::new(HashMap::new()), adoptable: Mutex::new(Vec::new()) }
    }

    /// Start one instance under supervision. It is not yet part of the
    /// app's set: the pipeline adopts it with [`Supervisor::replace`] once
    /// it has proven healthy.
    pub fn start(&self, spec: InstanceSpec, log: Arc<AppLog>) -> Arc<Instance> {
        self.launch(spec, log, None)
    }

    fn launch(&self, spec: InstanceSpec, log: Arc<AppLog>, adopted: Option<(i32, u64)>) -> Arc<Instance> {
        let (status, _) = watch::channel(Status {
            state: State::Starting,
            release: spec.release,
            pid: None,
            restarts: 0,
            last_exit: None,
            ignored_stop: false,
            since: None,
        });
        let (stop, stop_rx) = watch::channel(false);
        let (detach, detach_rx) = watch::channel(false);
        let inst = Arc::new(Instance { spec, status, stop, detach, held: Mutex::new(Vec::new()), tail: Mutex::new(VecDeque::new()) });
        // One file per process, named by its pid: two instances of the same
        // name (a restart's new web.1 beside the old) never share one.
        let pid_dir = self.run_dir.join(&inst.spec.app);
        tokio::spawn(supervise(inst.clone(), stop_rx, detach_rx, log, pid_dir, adopted));
        inst
    }

    /// upgrade track: supervise `pid`, a process a previous daemon started
    /// for this spec (verified by the caller), as if this one had: its
    /// output, its stop, its restart when it dies.
    pub fn adopt_running(&self, spec: InstanceSpec, log: Arc<AppLog>, pid: i32, start: u64) -> Arc<Instance> {
        self.launch(spec, log, Some((pid, start)))
    }

    /// upgrade track: let go of every instance without stopping any (the
    /// next daemon adopts them). Their pid files stay. The returned
    /// instances hold the output pipes open: keep them until exit.
    pub async fn detach_all(&self) -> Vec<Arc<Instance>> {
        let all: Vec<Arc<Instance>> = {
            let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
            apps.drain().flat_map(|(_, v)| v).collect()
        };
        for inst in &all {
            let _ = inst.detach.send(true);
        }
        for inst in &all {
            let mut rx = inst.status.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.pid.is_none())).await;
        }
        all
    }

    /// upgrade track: the instances a previous daemon left running, by
    /// their pid files, whose process is still the one recorded (same
    /// start time). The caller verifies the rest before adopting.
    pub fn leftovers(&self) -> Vec<Leftover> {
        let mut found = Vec::new();
        let Ok(apps) = std::fs::read_dir(&self.run_dir) else { return found };
        for app in apps.flatten() {
            let Some(app_name) = app.file_name().to_str().map(str::to_string) else { continue };
            let Ok(files) = std::fs::read_dir(app.path()) else { continue };
            for f in files.flatten() {
                let Some(name) = f.file_name().to_str().map(str::to_string) else { continue };
                let recorded = std::fs::read_to_string(f.path()).unwrap_or_default();
                if let Some(l) = Leftover::parse(&app_name, &name, &recorded) {
                    if runtime::start_time(l.pid) == Some(l.start) {
                        found.push(l);
                    }
                }
            }
        }
        found
    }

    /// upgrade track: remember the verified leftovers for the restore.
    pub fn set_adoptable(&self, leftovers: Vec<Leftover>) {
        *self.adoptable.lock().unwrap_or_else(|e| e.into_inner()) = leftovers;
    }

    /// upgrade track: the adoptable leftovers of one app (taken: asked once).
    pub fn take_adoptable(&self, app: &str) -> Vec<Leftover> {
        let mut all = self.adoptable.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, rest) = std::mem::take(&mut *all).into_iter().partition(|l| l.app == app);
        *all = rest;
        mine
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
    /// unrelated process and is left alone, and so are the process groups
    /// in `keep` (adopted instead; upgrade track), whose pid files stay.
    pub async fn reap_leftovers(&self, keep: &[i32]) -> usize {
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
                if pid.is_some_and(|p| keep.contains(&p)) {
                    continue;
                }
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

/// A running process of an instance: this daemon's child, or one a
/// previous daemon started and this one adopted (upgrade track), which is
/// not its child and is watched through a pidfd instead.
enum Proc {
    Child(tokio::process::Child),
    Adopted(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
}

impl Proc {
    /// Wait for it to end; how it ended, as far as this daemon can know.
    async fn wait(&mut self) -> String {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(s) => runtime::describe_exit(s),
                Err(e) => format!("wait failed: {e}"),
            },
            Proc::Adopted(fd) => match fd.readable().await {
                // Not our child: its status went to whoever reaps it.
                Ok(_) => "an unknown status (adopted process)".into(),
                Err(e) => format!("wait failed: {e}"),
            },
        }
    }
}

/// How the watch of one run ended.
enum Ended {
    Exited(bool),
    Stop,
    Detach,
}

async fn supervise(
    inst: Arc<Instance>,
    mut stop_rx: watch::Receiver<bool>,
    mut detach_rx: watch::Receiver<bool>,
    log: Arc<AppLog>,
    pid_dir: PathBuf,
    mut adopted: Option<(i32, u64)>,
) {
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
        let mut outputs: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(runtime::LINE_QUEUE);
        let mut held = Vec::new();
        let adopt = adopted.take().and_then(|(pid, start)| match runtime::watch_process(pid, start) {
            Ok(fd) => Some((pid, fd)),
            Err(e) => {
                log.write("slipway", &format!("{name} (pid {pid}) could not be adopted ({e}); starting it afresh"));
                None
            }
        });
        let (mut proc, pid) = match adopt {
            Some((pid, fd)) => {
                // Its pipes, reopened through /proc: the previous daemon
                // holds them open until it exits, so nothing is lost between.
                for stream in [1, 2] {
                    if let Some(r) = runtime::reopen_output(pid, stream) {
                        if let Ok(fd) = std::os::fd::AsFd::as_fd(&r).try_clone_to_owned() {
                            held.push(fd);
                        }
                        outputs.push(tokio::spawn(runtime::pump_lines(r, tx.clone())));
                    }
                }
                log.write("slipway", &format!("{name} adopted (pid {pid}, release v{})", spec.release));
                (Proc::Adopted(fd), pid)
            }
            None => {
                let mut child = match runtime::spawn(&spec.command) {
                    Ok(c) => c,
                    Err(e) => {
                        log.write("slipway", &format!("{name} could not start: {e}"));
                        set_state(&inst, State::Crashed, Some(format!("spawn failed: {e}")));
                        return;
                    }
                };
                let pid = child.id().map(|p| p as i32).unwrap_or(0);
                if let Some(out) = child.stdout.take() {
                    held.extend(std::os::fd::AsFd::as_fd(&out).try_clone_to_owned());
                    outputs.push(tokio::spawn(runtime::pump_lines(out, tx.clone())));
                }
                if let Some(err) = child.stderr.take() {
                    held.extend(std::os::fd::AsFd::as_fd(&err).try_clone_to_owned());
                    outputs.push(tokio::spawn(runtime::pump_lines(err, tx.clone())));
                }
                log.write("slipway", &format!("{name} started (pid {pid}, release v{})", spec.release));
                (Proc::Child(child), pid)
            }
        };
        drop(tx);
        *inst.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        let pidfile = pid_dir.join(format!("{}.{pid}.pid", name));
        // integrity track (issue 10 #4): a process without its pid file
        // could outlive a crash of the daemon unseen (a full disk): it
        // does not run.
        if let Err(e) = write_pidfile(&pidfile, pid, spec) {
            runtime::signal_group(pid, libc::SIGKILL);
            let _ = proc.wait().await;
            let _ = std::fs::remove_file(&pidfile);
            log.write("slipway", &format!("{name} stopped: its pid file could not be written: {e}"));
            set_state(&inst, State::Crashed, Some(format!("pid file: {e}")));
            return;
        }
        let started = Instant::now();
        inst.status.send_modify(|s| {
            s.state = State::Running;
            s.pid = Some(pid);
            s.since = Some(started);
        });

        let log2 = log.clone();
        let source = name.clone();
        let inst2 = inst.clone();
        let mut pump = tokio::spawn(async move {
            let mut budget = LogBudget::new();
            while let Some(line) = rx.recv().await {
                budget.spend(line.len()).await;
                inst2.remember(&line);
                log2.write(&source, &line);
            }
        });

        let ended = tokio::select! {
            desc = proc.wait() => {
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
                Ended::Exited(clean)
            }
            _ = stop_requested(&mut stop_rx) => Ended::Stop,
            _ = stop_requested(&mut detach_rx) => Ended::Detach,
        };

        let clean = match ended {
            Ended::Exited(clean) => clean,
            Ended::Stop => {
                // Stop requested: signal, grace period, then SIGKILL.
                runtime::signal_group(pid, spec.stop_signal);
                let graceful = tokio::time::timeout(spec.stop_timeout, proc.wait()).await.is_ok();
                runtime::signal_group(pid, libc::SIGKILL);
                let _ = std::fs::remove_file(&pidfile);
                pump.abort();
                if !graceful {
                    let _ = proc.wait().await;
                    let sig = nix::sys::signal::Signal::try_from(spec.stop_signal).map(|s| s.as_str()).unwrap_or("its stop signal");
                    let what = format!(
                        "{name} ignored {sig} for {}s and was killed: if it stops on another signal, set stop_signal in [processes.{}]",
                        spec.stop_timeout.as_secs(),
                        spec.ptype
                    );
                    log.write("slipway", &what);
                    inst.status.send_modify(|s| {
                        s.state = State::Stopped;
                        s.pid = None;
                        s.last_exit = Some(what);
                        s.ignored_stop = true;
                    });
                } else {
                    log.write("slipway", &format!("{name} stopped"));
                    set_state(&inst, State::Stopped, None);
                }
                return;
            }
            Ended::Detach => {
                // upgrade track: the process runs on for the next daemon;
                // its pid file stays, our reading of its output ends (the
                // `held` descriptors keep its pipes open until we exit).
                for o in &outputs {
                    o.abort();
                }
                pump.abort();
                set_state(&inst, State::Stopped, None);
                return;
            }
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
            _ = stop_requested(&mut detach_rx) => {
                // upgrade track: nothing runs; the next daemon starts it.
                set_state(&inst, State::Stopped, None);
                return;
            }
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// How fast one process may write to its app's log: 1 MiB/s after a
/// 4 MiB burst, each line costing at least 64 bytes (so a `yes` is held to
/// ~16k lines/s). Past it the reader pauses, the pipe fills and the
/// process waits in `write`: its output is slowed, never dropped, and it
/// cannot spend the daemon's CPU and disk at the other apps' expense.
struct LogBudget {
    tokens: f64,
    at: Instant,
}

const LOG_RATE: f64 = 1024.0 * 1024.0;
const LOG_BURST: f64 = 4.0 * 1024.0 * 1024.0;
const LOG_LINE_COST: usize = 64;

impl LogBudget {
    fn new() -> LogBudget {
        LogBudget { tokens: LOG_BURST, at: Instant::now() }
    }

    async fn spend(&mut self, bytes: usize) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * LOG_RATE).min(LOG_BURST);
        self.at = now;
        self.tokens -= bytes.max(LOG_LINE_COST) as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / LOG_RATE)).await;
        }
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

fn write_pidfile(path: &PathBuf, pid: i32, spec: &InstanceSpec) -> std::io::Result<()> {
    let start = runtime::start_time(pid).unwrap_or(0);
    // upgrade track: the release and port too, for the next daemon to adopt it.
    let port = spec.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(path, format!("{pid} {start} {} {port}\n", spec.release)).inspect_err(|e| {
        tracing::warn!(path = %path.display(), error = %e, "writing pid file failed");
    })
}
