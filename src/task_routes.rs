//! The proxy's routes to apps on the swarm (swarm track, issue 12): one
//! task per app polls its services' tasks twice a second and sets the
//! app's upstreams to each running web task's published port on its node.
//!
//! Swarm reports a task with a health check `running` only once the check
//! passed; this module asks the app once more through the proxy's own
//! probe before a new task gets traffic. A task swarm marks for shutdown
//! leaves the route at the next poll; its stop signal is held
//! (`runtime::swarm::STOP_DELAY`) for longer than that, so no request is
//! sent to a task that is stopping, and the ones in flight finish. A task
//! being stopped keeps its place only while nothing else could serve.
//!
//! It also follows every task's output into the app's log, as `TYPE.SLOT`
//! lines, so `logs` reads the same for every kind of process.
//!
//! It knows the proxy and `runtime::swarm`, never the pipeline: deploys
//! tell it which services an app has ([`TaskRoutes::follow`]) and read
//! back what it routes to ([`Routed`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::logs::AppLog;
use crate::proxy::{Health, Proxy, Upstream};
use crate::runtime::swarm::{self, TaskInfo};

/// How often tasks are polled.
const POLL: Duration = Duration::from_millis(500);

/// What to follow for one app.
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    /// Every service of the app: their tasks' output goes to its log.
    pub services: Vec<String>,
    /// Whether the app has web tasks to route to.
    pub web: bool,
    /// The app's host and health check path, for the probe.
    pub host: String,
    pub health_path: String,
}

/// One task the proxy sends traffic to.
#[derive(Debug, Clone)]
pub struct Routed {
    pub task: String,
    pub release: String,
    pub addr: SocketAddr,
    pub upstream: Arc<Upstream>,
}

/// The apps whose routes follow their tasks.
#[derive(Default)]
pub struct TaskRoutes {
    apps: Mutex<HashMap<String, Follower>>,
}

struct Follower {
    spec: watch::Sender<RouteSpec>,
    routed: watch::Receiver<Vec<Routed>>,
    cancel: CancellationToken,
}

impl TaskRoutes {
    /// Follow `app`'s tasks (or, when it is followed already, switch to
    /// `spec`). The proxy's route is first set once a web task is
    /// routable: until then it stays as it was (the app's local processes
    /// while it moves onto the swarm). Returns what is routed, as it
    /// changes.
    pub fn follow(&self, proxy: Arc<Proxy>, log: Arc<AppLog>, app: &str, spec: RouteSpec) -> watch::Receiver<Vec<Routed>> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = apps.get(app).filter(|f| !f.cancel.is_cancelled()) {
            f.spec.send_replace(spec);
            return f.routed.clone();
        }
        let (spec_tx, spec_rx) = watch::channel(spec);
        let (routed_tx, routed_rx) = watch::channel(Vec::new());
        let cancel = CancellationToken::new();
        tokio::spawn(poll(proxy, log, app.to_string(), spec_rx, routed_tx, cancel.clone()));
        apps.insert(app.to_string(), Follower { spec: spec_tx, routed: routed_rx.clone(), cancel });
        routed_rx
    }

    /// Stop following `app`'s tasks; its route stays as it is.
    pub fn stop(&self, app: &str) {
        if let Some(f) = self.apps.lock().unwrap_or_else(|e| e.into_inner()).remove(app) {
            f.cancel.cancel();
        }
    }

    /// What `app`'s route holds, when it is followed.
    pub fn routed(&self, app: &str) -> Option<Vec<Routed>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).get(app).map(|f| f.routed.borrow().clone())
    }
}

async fn poll(
    proxy: Arc<Proxy>,
    log: Arc<AppLog>,
    app: String,
    spec: watch::Receiver<RouteSpec>,
    routed_tx: watch::Sender<Vec<Routed>>,
    cancel: CancellationToken,
) {
    let mut routed: Vec<Routed> = Vec::new();
    let mut outputs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut took_over = false;
    let mut failing = false;
    loop {
        let spec = spec.borrow().clone();
        match swarm::tasks(&spec.services).await {
            Ok(tasks) => {
                failing = false;
                follow_outputs(&log, &tasks, &mut outputs);
                if spec.web {
                    let next = next_route(&spec, &tasks, &routed).await;
                    let ids = |v: &[Routed]| v.iter().map(|r| r.task.clone()).collect::<Vec<_>>();
                    if ids(&next) != ids(&routed) {
                        if !next.is_empty() || took_over {
                            proxy.set_upstreams(&app, next.iter().map(|r| r.upstream.clone()).collect());
                            took_over = true;
                        }
                        routed = next;
                        routed_tx.send_replace(routed.clone());
                    }
                }
            }
            Err(e) => {
                // Said once per outage; the route stays as it was.
                if !failing {
                    tracing::warn!(app = %app, error = %format!("{e:#}"), "listing the app's swarm tasks failed");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    for (_, h) in outputs {
        h.abort();
    }
}

/// The web tasks to route to now: the running ones swarm wants running
/// (those already routed, and new ones that answer the probe); when there
/// is none, the routed ones still running (being stopped, they still
/// serve for a moment).
async fn next_route(spec: &RouteSpec, tasks: &[TaskInfo], routed: &[Routed]) -> Vec<Routed> {
    let mut next = Vec::new();
    for t in tasks.iter().filter(|t| t.ptype == "web" && t.running && t.wanted) {
        let Some(addr) = t.addr else { continue };
        if let Some(r) = routed.iter().find(|r| r.task == t.id && r.addr == addr) {
            next.push(r.clone());
            continue;
        }
        let probe = crate::proxy::health_check(addr, &spec.host, &spec.health_path, "http", Duration::from_secs(2)).await;
        if matches!(probe, Ok(Health::Healthy)) {
            next.push(Routed { task: t.id.clone(), release: t.release.clone(), addr, upstream: Upstream::new(addr) });
        }
    }
    if next.is_empty() {
        next = routed.iter().filter(|r| tasks.iter().any(|t| t.id == r.task && t.running)).cloned().collect();
    }
    next
}

/// Follow the output of every task that has started; stop following the
/// ones swarm no longer runs.
fn follow_outputs(log: &Arc<AppLog>, tasks: &[TaskInfo], outputs: &mut HashMap<String, tokio::task::JoinHandle<()>>) {
    for t in tasks.iter().filter(|t| t.wanted && matches!(t.state.as_str(), "starting" | "running")) {
        if outputs.contains_key(&t.id) {
            continue;
        }
        let (log, id, source) = (log.clone(), t.id.clone(), format!("{}.{}", t.ptype, t.slot));
        outputs.insert(
            t.id.clone(),
            tokio::spawn(async move {
                let Ok(stream) = swarm::task_output(&id).await else { return };
                futures_util::pin_mut!(stream);
                while let Some(Ok(out)) = stream.next().await {
                    let bytes = out.into_bytes();
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> = text.lines().collect();
                    log.write_lines(&source, &lines);
                }
            }),
        );
    }
    outputs.retain(|id, h| {
        let live = tasks.iter().any(|t| &t.id == id && !matches!(t.state.as_str(), "complete" | "shutdown" | "failed" | "rejected" | "orphaned" | "remove"));
        if !live {
            h.abort();
        }
        live
    });
}
