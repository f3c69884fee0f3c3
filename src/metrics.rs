//! `GET /metrics` on the API address: Prometheus text format (0.0.4),
//! behind an admin token. Operation counts come from the audit trail, so
//! they survive a daemon restart and agree with `slipway events`; process
//! figures come from the supervisor's live state; request counts and
//! latencies from the proxy's router lines (src/proxy/access.rs).
//!
//! Architecture invariant: rendering only reads (store, supervisor); it
//! never blocks a deploy or takes an app lock.

use std::fmt::Write;

use anyhow::Result;

use crate::platform::Platform;
use crate::supervisor::State;

/// The whole exposition, in one string.
pub async fn render(p: &Platform) -> Result<String> {
    let counts = p.store.call(|s| s.operation_counts()).await?;
    let mut out = String::new();
    header(&mut out, "slipway_operations_total", "counter", "Deploys, rollbacks, promotions, config changes, restarts, scalings and webhook deliveries, by app, action and outcome (from the event log).");
    for (app, action, outcome, n) in &counts {
        let _ = writeln!(out, "slipway_operations_total{{app=\"{}\",action=\"{}\",outcome=\"{}\"}} {n}", esc(app), esc(action), esc(outcome));
    }

    header(&mut out, "slipway_process_restarts_total", "counter", "Restarts of each process instance by the supervisor since the instance was started.");
    let mut states = Vec::new();
    let mut apps = p.supervisor.apps();
    apps.sort();
    for app in apps {
        for i in p.supervisor.instances(&app) {
            let st = i.status();
            let _ = writeln!(out, "slipway_process_restarts_total{{app=\"{}\",process=\"{}.{}\"}} {}", esc(&app), esc(&i.spec.ptype), i.spec.index, st.restarts);
            states.push((app.clone(), st.state));
        }
    }
    header(&mut out, "slipway_processes", "gauge", "Process instances by app and state (crashed: given up on after restarting too often).");
    let names = [
        (State::Starting, "starting"),
        (State::Running, "running"),
        (State::Backoff, "backoff"),
        (State::Exited, "exited"),
        (State::Crashed, "crashed"),
        (State::Stopped, "stopped"),
    ];
    let mut seen: Vec<&String> = states.iter().map(|(a, _)| a).collect();
    seen.dedup();
    for app in seen {
        for (state, name) in names {
            let n = states.iter().filter(|(a, s)| a == app && *s == state).count();
            let _ = writeln!(out, "slipway_processes{{app=\"{}\",state=\"{name}\"}} {n}", esc(app));
        }
    }
    crate::proxy::access::render_metrics(&mut out, esc);
    crate::tally::render(&mut out, esc);
    Ok(out)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
