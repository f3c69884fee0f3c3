//! Staging → live: promotion gated by functional checks, release tags,
//! the audit trail and webhooks (issue 6).

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use util::*;

/// A functional check: fetch TARGET_URL as the app's own host, want `needle`.
fn check_script(needle: &str) -> String {
    format!(
        "import os, sys, urllib.request\n\
         req = urllib.request.Request(os.environ['TARGET_URL'], headers={{'Host': os.environ['TARGET_HOST']}})\n\
         body = urllib.request.urlopen(req, timeout=10).read().decode()\n\
         print('functional check saw:', body.strip())\n\
         sys.exit(0 if {needle:?} in body else 1)\n"
    )
}

fn staging_repo(text: &str, needle: &str) -> AppRepo {
    let repo = AppRepo::hello(text);
    repo.write("slipway.toml", "[promote]\ncheck = \"python check.py\"\n");
    repo.write("check.py", &check_script(needle));
    repo.commit("with a promote check");
    repo
}

fn tags(server: &TestServer, app: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("git").args(["ls-remote", "--tags", &server.git_url(app)]).output().expect("ls-remote");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t').map(|(c, r)| (r.trim_start_matches("refs/tags/").to_string(), c.to_string())))
        .collect()
}

fn wait_tags(server: &TestServer, app: &str, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = tags(server, app);
        if t.iter().filter(|(n, _)| n.starts_with("DEPLOYED-")).count() >= n {
            return t;
        }
        assert!(Instant::now() < deadline, "tags never appeared: {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn passing_check_promotes_the_same_build_with_the_live_config() {
    let server = TestServer::start();
    AppRepo::hello("old live").deploy(&server, "live");
    let staging = staging_repo("staged", "staged");
    staging.deploy(&server, "staging");
    server.ok(&["config", "set", "live", "GREETING=production"]);
    let envs_before = ls(&server.data().join("envs"));

    let out = server.ok(&["promote", "staging", "--to", "live"]);
    assert!(out.contains("promote check against http://127.0.0.1:"), "{out}");
    assert!(out.contains("functional check saw: staged world"), "{out}");
    assert!(!out.contains("installing with") && !out.contains("building environment"), "promotion must not rebuild:\n{out}");
    assert_eq!(server.get("live", "/").1, "staged production\n", "staging's build with live's config");
    assert_eq!(ls(&server.data().join("envs")), envs_before, "the same environment serves both");

    // The live repo has the promoted commit, on its branch and under LIVE.
    let releases = server.json(&["releases", "live", "--json"]);
    assert_eq!(releases[0]["commit"], staging.head().as_str());
    assert_eq!(releases[0]["description"], "promote staging v1");
    let t = wait_tags(&server, "live", 2);
    let live_tag = t.iter().find(|(n, _)| n == "LIVE").expect("LIVE tag");
    assert_eq!(live_tag.1, staging.head());
    let clone = tempfile::tempdir().expect("dir");
    let out = std::process::Command::new("git").args(["clone", "-q", &server.git_url("live"), "."]).current_dir(clone.path()).output().expect("clone");
    assert!(out.status.success());
    let head = std::process::Command::new("git").args(["rev-parse", "HEAD"]).current_dir(clone.path()).output().expect("rev-parse");
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), staging.head());
}

#[test]
fn failing_check_leaves_live_untouched() {
    let server = TestServer::start();
    AppRepo::hello("old live").deploy(&server, "prod");
    staging_repo("staged", "something else entirely").deploy(&server, "stage");
    let before = server.json(&["releases", "prod", "--json"]);
    let out = server.cli(&["promote", "stage", "--to", "prod"]);
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("functional check saw: staged world"), "the check's output is shown:\n{text}");
    assert!(text.contains("promote check failed: nothing was promoted"), "{text}");
    assert_eq!(server.get("prod", "/").1, "old live world\n");
    assert_eq!(server.json(&["releases", "prod", "--json"]), before);
}

#[test]
fn every_deploy_tags_live_and_a_dated_deployed_tag() {
    let server = TestServer::start();
    let repo = AppRepo::hello("first");
    repo.deploy(&server, "tagme");
    let first = repo.head();
    let t = wait_tags(&server, "tagme", 1);
    assert_eq!(t.iter().find(|(n, _)| n == "LIVE").map(|x| x.1.clone()), Some(first.clone()));
    repo.write("app.py", &hello_app("second"));
    repo.commit("second");
    repo.deploy(&server, "tagme");
    let t = wait_tags(&server, "tagme", 2);
    let deployed: Vec<&(String, String)> = t.iter().filter(|(n, _)| n.starts_with("DEPLOYED-")).collect();
    assert_eq!(deployed.len(), 2, "{t:?}");
    // DEPLOYED-YYYY-MM-DD/HHMM, and -2 when a second deploy lands in the same minute.
    let names: Vec<&str> = deployed.iter().map(|(n, _)| n.as_str()).collect();
    for n in &names {
        let stamp = n.trim_start_matches("DEPLOYED-");
        assert!(stamp.len() >= 15 && &stamp[4..5] == "-" && &stamp[10..11] == "/", "{n}");
    }
    let (a, b) = (names[0].split('-').take(4).collect::<Vec<_>>().join("-"), names[1].split('-').take(4).collect::<Vec<_>>().join("-"));
    if a == b {
        assert!(names.iter().any(|n| n.ends_with("-2")), "same minute needs a -2 suffix: {names:?}");
    }
    assert_eq!(t.iter().find(|(n, _)| n == "LIVE").map(|x| x.1.clone()), Some(repo.head()));
    // A rollback moves LIVE back.
    server.ok(&["rollback", "tagme"]);
    let t = wait_tags(&server, "tagme", 3);
    assert_eq!(t.iter().find(|(n, _)| n == "LIVE").map(|x| x.1.clone()), Some(first));
}

#[test]
fn events_record_who_did_what() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "audited"]);
    let alice = server.ok(&["tokens", "create", "alice", "--app", "audited"]).trim().to_string();
    AppRepo::hello("hello").push(&server.git_url_with("audited", &alice), "main");
    let out = server.cli_with_token(&alice, &["config", "set", "audited", "K=v"]);
    assert!(out.status.success());
    let events = server.json(&["events", "audited", "--json"]);
    let rows: Vec<(String, String, String)> = events
        .as_array()
        .expect("rows")
        .iter()
        .map(|e| (e["actor"].as_str().unwrap_or("").into(), e["action"].as_str().unwrap_or("").into(), e["outcome"].as_str().unwrap_or("").into()))
        .collect();
    assert!(rows.contains(&("alice".into(), "deploy".into(), "ok".into())), "{rows:?}");
    assert!(rows.contains(&("alice".into(), "config".into(), "ok".into())), "{rows:?}");
    assert!(rows.contains(&("admin".into(), "tokens:create".into(), "ok".into())), "{rows:?}");
    assert!(rows.contains(&("admin".into(), "create".into(), "ok".into())), "{rows:?}");
    // A scoped token sees only its app's events.
    let mine = server.cli_with_token(&alice, &["events", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&mine.stdout).expect("json");
    assert!(v.as_array().expect("rows").iter().all(|e| e["app"] == "audited"));
}

#[test]
fn webhook_receives_success_and_failure() {
    let receiver = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = receiver.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for stream in receiver.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let _ = reader.get_mut().write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            if let Ok(v) = serde_json::from_slice(&body) {
                let _ = tx.send(v);
            }
        }
    });
    let server = TestServer::start();
    server.ok(&["apps", "create", "hooked"]);
    let bad = server.cli(&["webhook", "set", "hooked", "ftp://nowhere"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must start with http://"));
    server.ok(&["webhook", "set", "hooked", &format!("http://{addr}/deploys")]);
    let repo = AppRepo::hello("hello");
    repo.deploy(&server, "hooked");
    let ok = rx.recv_timeout(Duration::from_secs(10)).expect("webhook for the deploy");
    assert_eq!((ok["app"].as_str(), ok["outcome"].as_str(), ok["release"].as_str()), (Some("hooked"), Some("ok"), Some("v1")));
    assert_eq!(ok["commit"], repo.head().as_str());
    repo.write("app.py", "raise RuntimeError('no')\n");
    repo.commit("broken");
    repo.deploy_rejected(&server, "hooked");
    let failed = rx.recv_timeout(Duration::from_secs(10)).expect("webhook for the failure");
    assert_eq!(failed["outcome"], "failed");
    assert_eq!(failed["commit"], repo.head().as_str(), "the failed commit is named");
    assert!(failed["detail"].as_str().unwrap_or("").contains("crashed on boot"), "{failed}");
}
