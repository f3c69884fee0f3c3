//! `GET /metrics`: Prometheus text behind an admin token, with operation
//! counts and durations by outcome, build cache hits, the supervisor's
//! restarts and states, and the proxy's requests per app by status class
//! with a latency histogram.

mod util;

use std::time::{Duration, Instant};

use util::*;

fn metrics(server: &TestServer, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
    http_request(&server.api, "GET", "localhost", "/metrics", &headers, "")
}

#[test]
fn metrics_count_deploys_and_restarts_for_admins_only() {
    let server = TestServer::start();
    let repo = AppRepo::hello("measured");
    repo.deploy(&server, "measured");
    repo.write("Procfile", "web: exit 3\n");
    repo.commit("broken");
    repo.deploy_rejected(&server, "measured");

    let (code, text) = metrics(&server, Some(&server.token));
    assert_eq!(code, 200, "{text}");
    for needle in [
        "# TYPE slipway_operations_total counter",
        "slipway_operations_total{app=\"measured\",action=\"deploy\",outcome=\"ok\"} 1",
        "slipway_operations_total{app=\"measured\",action=\"deploy\",outcome=\"failed\"} 1",
        "slipway_processes{app=\"measured\",state=\"running\"} 1",
        "slipway_process_restarts_total{app=\"measured\",process=\"web.1\"} 0",
        "# TYPE slipway_operation_duration_seconds histogram",
        "slipway_operation_duration_seconds_count{app=\"measured\",action=\"deploy\",outcome=\"ok\"} 1",
        "slipway_operation_duration_seconds_count{app=\"measured\",action=\"deploy\",outcome=\"failed\"} 1",
        // The first deploy built the environment, the second reused it.
        "slipway_build_environments_total{result=\"built\"} 1",
        "slipway_build_environments_total{result=\"reused\"} 1",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    // The daemon's log has one structured line per operation.
    let log = server.server_log();
    for outcome in ["ok", "failed"] {
        assert!(
            log.lines().any(|l| l.contains(" operation ") && l.contains("action=\"deploy\"") && l.contains(&format!("outcome=\"{outcome}\""))),
            "no {outcome} deploy line in the daemon's log:\n{log}"
        );
    }

    // Requests through the proxy: counted by status class, timed.
    for _ in 0..5 {
        assert_eq!(server.get("measured", "/").0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let count = |text: &str, series: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    loop {
        let (_, text) = metrics(&server, Some(&server.token));
        let ok = count(&text, "slipway_http_requests_total{app=\"measured\",code=\"2xx\"}");
        if ok >= 5 {
            assert!(text.contains("# TYPE slipway_http_request_duration_seconds histogram"), "{text}");
            let total = count(&text, "slipway_http_request_duration_seconds_count{app=\"measured\"}");
            let inf = count(&text, "slipway_http_request_duration_seconds_bucket{app=\"measured\",le=\"+Inf\"}");
            let classes: u64 = (1..=5).map(|c| count(&text, &format!("slipway_http_requests_total{{app=\"measured\",code=\"{c}xx\"}}"))).sum();
            assert_eq!((total, inf), (classes, classes), "every request in one bucket and one class:\n{text}");
            break;
        }
        assert!(Instant::now() < deadline, "the requests were never counted:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A crash is restarted, and counted.
    let pid = server.pids("measured")[0];
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, text) = metrics(&server, Some(&server.token));
        if text.contains("slipway_process_restarts_total{app=\"measured\",process=\"web.1\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the restart was never counted:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // No token, no metrics; an app's token sees no other app's figures.
    assert_eq!(metrics(&server, None).0, 401);
    // A wrong token is refused, and the daemon's log says so.
    assert_eq!(metrics(&server, Some("not-a-token")).0, 401);
    let log = server.server_log();
    assert!(log.lines().any(|l| l.contains("auth failure") && l.contains("via=\"api\"")), "no auth failure line:\n{log}");
    let scoped = server.ok(&["tokens", "create", "one", "--app", "measured"]).trim().to_string();
    assert_eq!(metrics(&server, Some(&scoped)).0, 403);
}
