//! Property-based fuzzing of every parser that takes input from outside:
//! Procfile, slipway.toml, names, refs, durations, ref patterns, webhook
//! URLs, SSH keys and SSH command lines, and the API's JSON bodies against
//! a live daemon. None may panic; what they accept must be safe to use.
//! Scale with PROPTEST_CASES (bench/fuzz.sh runs 100k per target).

mod util;

use proptest::prelude::*;
use slipway::{manifest, names, notify, ssh};

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Text biased towards the syntax the parsers care about.
fn syntaxy() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("web".to_string()),
            Just(":".to_string()),
            Just("\n".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("=".to_string()),
            Just("\"".to_string()),
            Just("processes.web".to_string()),
            Just("reload".to_string()),
            Just("touch:".to_string()),
            Just("signal:".to_string()),
            Just("../".to_string()),
            Just("/".to_string()),
            Just("#".to_string()),
            Just("release".to_string()),
            Just("healthcheck".to_string()),
            Just("timeout".to_string()),
            Just("refs/tags/".to_string()),
            Just("*".to_string()),
            any::<char>().prop_map(|c| c.to_string()),
            "[ -~]{0,8}",
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn procfile_parser(text in syntaxy()) {
        if let Ok(entries) = manifest::parse_procfile(&text) {
            for (name, command) in entries {
                prop_assert!(name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-'));
                prop_assert!(!command.is_empty());
            }
        }
    }

    #[test]
    fn manifest_parser(procfile in syntaxy(), toml in syntaxy()) {
        if let Ok(m) = manifest::Manifest::parse(&procfile, &toml) {
            prop_assert!(m.health_path.starts_with('/'));
            for p in &m.processes {
                if let manifest::Reload::Touch(path) = &p.reload {
                    prop_assert!(!path.starts_with('/') && !path.split('/').any(|c| c == ".."));
                }
            }
        }
    }

    #[test]
    fn app_names_are_safe_path_segments(s in any::<String>()) {
        if let Ok(app) = names::AppName::parse(&s) {
            let a = app.as_str();
            prop_assert!(!a.contains('/') && !a.contains("..") && !a.is_empty() && a.len() <= 63);
            prop_assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        }
    }

    #[test]
    fn config_keys_hosts_refs_labels(s in any::<String>(), t in syntaxy()) {
        for input in [&s, &t] {
            if names::check_config_key(input).is_ok() {
                prop_assert!(!input.contains('=') && !input.contains('\0'));
            }
            if let Ok(h) = names::parse_host(input) {
                prop_assert!(!h.contains('/') && !h.contains(' ') && h.len() <= 253);
            }
            if names::check_ref(input).is_ok() {
                prop_assert!(!input.contains("..") && (input.starts_with("refs/heads/") || input.starts_with("refs/tags/")));
            }
            if names::check_label(input).is_ok() {
                prop_assert!(!input.contains('/'));
            }
        }
    }

    #[test]
    fn durations_and_patterns(s in "[0-9a-z ]{0,12}", pat in syntaxy(), r in syntaxy()) {
        if let Some(d) = manifest::parse_duration(&s) {
            prop_assert!(d <= std::time::Duration::from_secs(3600));
        }
        let _ = manifest::ref_matches(&pat, &r);
        prop_assert!(manifest::ref_matches(&r, &r) || r.contains('*'));
    }

    #[test]
    fn webhook_urls(s in any::<String>(), t in "http://[ -~]{0,40}") {
        for input in [&s, &t] {
            if let Ok(u) = notify::WebhookUrl::parse(input) {
                prop_assert!(u.0.host_str().is_some_and(|h| !h.is_empty()) && u.0.path().starts_with('/'));
            }
        }
    }

    #[test]
    fn ssh_public_keys(s in any::<String>(), t in "ssh-(ed25519|rsa) [A-Za-z0-9+/=]{0,120}( [a-z@]{0,10})?") {
        for input in [&s, &t] {
            if let Ok((stored, fp)) = ssh::parse_public_key(input) {
                prop_assert!(fp.starts_with("SHA256:") && !stored.contains('\n'));
            }
        }
    }

    /// What the CLI quotes, the SSH server splits back into the same words.
    #[test]
    fn ssh_command_lines_round_trip(words in proptest::collection::vec(any::<String>(), 1..6), raw in any::<String>()) {
        let line = words.iter().map(|w| slipway::build::shell_quote(w)).collect::<Vec<_>>().join(" ");
        prop_assert_eq!(ssh::split_words(&line).ok(), Some(words));
        let _ = ssh::split_words(&raw);
    }
}

/// Random JSON bodies against every body-taking endpoint of a live daemon:
/// each gets an answer (never a hang, a dropped connection or a 5xx), and
/// the daemon keeps serving.
#[test]
fn api_json_bodies_against_a_live_daemon() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let server = util::TestServer::start();
    server.ok(&["apps", "create", "target"]);
    let endpoints = [
        ("POST", "/api/apps"),
        ("POST", "/api/apps/target/config"),
        ("POST", "/api/apps/target/scale"),
        ("POST", "/api/apps/target/rollback"),
        ("POST", "/api/apps/target/deploy"),
        ("POST", "/api/apps/target/domains"),
        ("POST", "/api/apps/target/promote"),
        ("PUT", "/api/apps/target/webhook"),
        ("POST", "/api/apps/target/run"),
        ("POST", "/api/tokens"),
        ("POST", "/api/keys"),
    ];
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        syntaxy().prop_map(serde_json::Value::from),
    ];
    let body = prop_oneof![
        proptest::collection::btree_map(prop_oneof![Just("name".to_string()), Just("set".to_string()), Just("web".to_string()), Just("to".to_string()), Just("url".to_string()), Just("key".to_string()), Just("version".to_string()), "[a-z]{1,6}"], value, 0..4)
            .prop_map(|m| serde_json::to_string(&m).unwrap_or_default()),
        syntaxy(),
    ];
    let per_endpoint: u32 = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).map(|n: u32| (n / 10).max(50)).unwrap_or(60);
    let mut runner = TestRunner::deterministic();
    let auth = format!("Bearer {}", server.token);
    let mut sent = 0;
    for (method, path) in endpoints {
        for _ in 0..per_endpoint {
            let b = body.new_tree(&mut runner).map(|t| t.current()).unwrap_or_default();
            let (code, resp) = util::http_request(&server.api, method, "localhost", path, &[("Authorization", &auth), ("Content-Type", "application/json")], &b);
            sent += 1;
            assert!(code != 0 && code < 500, "{method} {path} with {b:?} -> {code} {resp}");
        }
    }
    eprintln!("api fuzz: {sent} bodies, all answered without a server error");
    assert_eq!(server.get("target", "/").0, 503, "the daemon still routes");
    assert!(!server.server_log().contains("panicked"));
}
