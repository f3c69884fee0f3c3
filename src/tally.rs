//! In-process counters that `GET /metrics` (src/metrics.rs) renders: how
//! long deploys and other operations took, by outcome, and how often a
//! build found its dependency environment ready. A leaf module (it uses
//! nothing of slipway's), so the pipeline and the builder can count
//! without depending on the modules that render. Counts start at zero with
//! each daemon, as Prometheus counters may.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of a latency histogram's buckets: requests.
pub const REQUEST_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) for operations: a code push is under a second,
/// a cold build minutes.
pub const OPERATION_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A Prometheus histogram: one count per bucket (the last is +Inf); made
/// cumulative when rendered.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    pub fn observe(&mut self, seconds: f64) {
        let i = self.bounds.iter().position(|le| seconds <= *le).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }

    /// The `_bucket`, `_sum` and `_count` lines of series `name`, with
    /// `labels` (already escaped, `k="v",...`) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cumulative += n;
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// (app, action, outcome) -> durations.
static OPERATIONS: Mutex<BTreeMap<(String, String, String), Histogram>> = Mutex::new(BTreeMap::new());
static ENV_REUSED: AtomicU64 = AtomicU64::new(0);
static ENV_BUILT: AtomicU64 = AtomicU64::new(0);

/// An operation (deploy, rollback, promote, config, ...) of `app` ended.
pub fn operation(app: &str, action: &str, outcome: &str, seconds: f64) {
    let mut ops = OPERATIONS.lock().unwrap_or_else(|p| p.into_inner());
    ops.entry((app.to_string(), action.to_string(), outcome.to_string()))
        .or_insert_with(|| Histogram::new(OPERATION_BUCKETS))
        .observe(seconds);
}

/// A build needed a dependency environment: `reused` when one was ready.
pub fn environment(reused: bool) {
    let counter = if reused { &ENV_REUSED } else { &ENV_BUILT };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The operations' histogram and the environment counts.
pub fn render(out: &mut String, esc: impl Fn(&str) -> String) {
    let _ = writeln!(out, "# HELP slipway_operation_duration_seconds How long deploys, rollbacks, promotions and config changes took, by app, action and outcome (since the daemon started).");
    let _ = writeln!(out, "# TYPE slipway_operation_duration_seconds histogram");
    let ops = OPERATIONS.lock().unwrap_or_else(|p| p.into_inner());
    for ((app, action, outcome), h) in ops.iter() {
        let labels = format!("app=\"{}\",action=\"{}\",outcome=\"{}\"", esc(app), esc(action), esc(outcome));
        h.render(out, "slipway_operation_duration_seconds", &labels);
    }
    drop(ops);
    let _ = writeln!(out, "# HELP slipway_build_environments_total Builds that needed a dependency environment: reused (the build cache hit) or built.");
    let _ = writeln!(out, "# TYPE slipway_build_environments_total counter");
    let _ = writeln!(out, "slipway_build_environments_total{{result=\"reused\"}} {}", ENV_REUSED.load(Ordering::Relaxed));
    let _ = writeln!(out, "slipway_build_environments_total{{result=\"built\"}} {}", ENV_BUILT.load(Ordering::Relaxed));
}
