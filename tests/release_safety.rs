//! Release safety: a deploy either completes fully, with no failed
//! request, or changes nothing (issue 3).

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use util::*;

/// What must hold after a rejected deploy: the same process serves the
/// same body, the release list and the trees on disk are as before, and
/// no environment was left half-built.
struct Before {
    pids: Vec<i32>,
    body: String,
    releases: serde_json::Value,
    trees: Vec<String>,
    envs: Vec<String>,
}

fn snapshot(server: &TestServer, app: &str) -> Before {
    Before {
        pids: server.pids(app),
        body: server.get(app, "/").1,
        releases: server.json(&["releases", app, "--json"]),
        trees: ls(&server.data().join(format!("apps/{app}/releases"))),
        envs: ls(&server.data().join("envs")),
    }
}

fn assert_unchanged(server: &TestServer, app: &str, before: &Before) {
    let after = snapshot(server, app);
    assert_eq!(after.body, before.body, "the old release must keep serving");
    assert_eq!(after.pids, before.pids, "the old process must be the one serving, and alone");
    // history track (issue 15 #4): a failed deploy stays on record as
    // `failed`; nothing else in the list may change.
    let settled = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array().into_iter().flatten().filter(|r| r["status"] != "failed").cloned().collect()
    };
    assert_eq!(settled(&after.releases), settled(&before.releases), "no release may go live or change");
    assert_eq!(after.trees, before.trees, "no release tree may be left behind");
    assert_eq!(after.envs, before.envs, "no environment may be left behind");
    for pid in &before.pids {
        assert!(alive(*pid));
    }
}

/// Deploy the hello app, then push `change` on top; it must be rejected
/// with `reason`, leaving everything as it was.
fn rejected_with(app: &str, change: impl FnOnce(&AppRepo), reason: &str) -> String {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.deploy(&server, app);
    let before = snapshot(&server, app);
    change(&repo);
    repo.commit("broken change");
    let out = repo.deploy_rejected(&server, app);
    assert!(out.contains(reason), "expected {reason:?} in:\n{out}");
    assert!(out.contains("nothing changed: the previous release keeps serving"), "{out}");
    assert_unchanged(&server, app, &before);
    // The repo's ref still names the live commit.
    let releases = server.json(&["releases", app, "--json"]);
    let live = releases.as_array().and_then(|a| a.iter().find(|r| r["status"] == "live")).map(|r| r["commit"].clone()).unwrap_or_default();
    let ls_remote = std::process::Command::new("git")
        .args(["ls-remote", &server.git_url(app), "refs/heads/main"])
        .output()
        .expect("ls-remote");
    assert!(String::from_utf8_lossy(&ls_remote.stdout).starts_with(live.as_str().unwrap_or("?")));
    out
}

#[test]
fn uninstallable_dependency_keeps_old_release() {
    let out = rejected_with(
        "deps",
        |r| r.write("requirements.txt", "gunicorn==27.0.1\nslipway-no-such-package-xyz==9.9.9\n"),
        "dependency install failed",
    );
    assert!(out.contains("slipway-no-such-package-xyz"), "the failing line must be shown:\n{out}");
}

#[test]
fn failing_test_gate_keeps_old_release() {
    let out = rejected_with(
        "gate",
        |r| r.write("slipway.toml", "[test]\ncommand = \"python -c 'import sys; print(\\\"assertion boom\\\"); sys.exit(1)'\"\n"),
        "test gate failed",
    );
    assert!(out.contains("assertion boom"), "{out}");
}

#[test]
fn failing_release_phase_keeps_old_release() {
    let out = rejected_with(
        "migrate",
        |r| r.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT\nrelease: echo migration exploded; exit 3\n"),
        "release phase failed",
    );
    assert!(out.contains("exited with code 3") && out.contains("migration exploded"), "{out}");
}

#[test]
fn crash_on_boot_keeps_old_release() {
    let out = rejected_with(
        "crashy",
        |r| r.write("app.py", "raise RuntimeError('bad import at boot')\n"),
        "web.1 crashed on boot",
    );
    assert!(out.contains("bad import at boot"), "the crash's own output must be shown:\n{out}");
}

#[test]
fn never_healthy_keeps_old_release() {
    let out = rejected_with(
        "sick",
        |r| {
            r.write(
                "app.py",
                "def app(environ, start_response):\n    start_response('500 Internal Server Error', [])\n    return [b'sick']\n",
            );
            r.write("slipway.toml", "[healthcheck]\npath = \"/ready\"\ntimeout = \"2s\"\n");
        },
        "did not pass its health check (GET /ready, Host sick.localhost) within 2s: GET /ready answered 500",
    );
    assert!(out.contains("deploy failed"), "{out}");
}

#[test]
fn missing_interpreter_is_refused_and_keeps_old_release() {
    rejected_with(
        "pinned",
        |r| r.write(".python-version", "3.99\n"),
        "python 3.99 is not available on this server",
    );
}

#[test]
fn broken_slipway_toml_is_refused_with_the_key() {
    rejected_with("tomlish", |r| r.write("slipway.toml", "[healthcheck]\npaht = \"/\"\n"), "unknown key \"paht\" on line 2; did you mean \"path\"?");
}

#[test]
fn health_check_uses_the_apps_own_host_header() {
    // Like Django's ALLOWED_HOSTS: anything but the app's host gets 400.
    let app = "def app(environ, start_response):\n    ok = environ.get('HTTP_HOST', '').split(':')[0] == 'strict.localhost'\n    start_response('200 OK' if ok else '400 Bad Request', [])\n    return [b'strict ok\\n' if ok else b'bad host']\n";
    let server = TestServer::start();
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT\n"),
        ("app.py", app),
        ("slipway.toml", "[healthcheck]\ntimeout = \"5s\"\n"),
    ]);
    repo.deploy(&server, "strict");
    assert_eq!(server.get("strict", "/"), (200, "strict ok\n".to_string()));
}

/// The hello app, plus `/slow`, which takes 400 ms: requests in flight
/// when the route switches must finish on the old process.
fn slow_hello(text: &str) -> String {
    format!(
        "import time\n{}\nhello = app\ndef app(environ, start_response):\n    if environ['PATH_INFO'] == '/slow':\n        time.sleep(0.4)\n    return hello(environ, start_response)\n",
        hello_app(text)
    )
}

#[test]
fn no_request_fails_during_deploys_under_load() {
    let server = Arc::new(TestServer::start());
    let repo = AppRepo::hello("v0");
    repo.write("app.py", &slow_hello("v0"));
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 2 --threads 4\n");
    repo.commit("slow endpoint");
    repo.deploy(&server, "busy");
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for i in 0..5 {
        let (server, stop, total, failed, failures) =
            (server.clone(), stop.clone(), total.clone(), failed.clone(), failures.clone());
        clients.push(std::thread::spawn(move || {
            // Two clients keep one connection open across deploys; one asks
            // for the slow page, so requests are always in flight at a switch.
            let mut conn = (i % 2 == 0).then(|| KeepAlive::new(&server.http));
            let path = if i == 4 { "/slow" } else { "/" };
            while !stop.load(Ordering::Relaxed) {
                let (code, body) = match conn.as_mut() {
                    Some(c) => c.get("busy.localhost", path),
                    None => server.get("busy", path),
                };
                total.fetch_add(1, Ordering::Relaxed);
                if code != 200 || !body.ends_with("world\n") {
                    failed.fetch_add(1, Ordering::Relaxed);
                    failures.lock().expect("lock").push(format!("{code} {body:?}"));
                }
            }
        }));
    }
    for n in 1..=5 {
        repo.write("app.py", &slow_hello(&format!("v{n}")));
        repo.commit(&format!("v{n}"));
        repo.deploy(&server, "busy");
        assert_eq!(server.get("busy", "/").1, format!("v{n} world\n"));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let (total, failed) = (total.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(total > 50, "the load was too light to mean anything: {total} requests");
    assert_eq!(failed, 0, "{failed} of {total} requests failed: {:?}", failures.lock().expect("lock"));
}

#[test]
fn pushes_to_other_refs_are_stored_not_deployed() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.deploy(&server, "policy");
    repo.git(&["checkout", "-q", "-b", "feature"]);
    repo.write("app.py", &hello_app("feature"));
    repo.commit("feature work");
    let (ok, out) = repo.push(&server.git_url("policy"), "feature");
    assert!(ok, "{out}");
    assert!(out.contains("refs/heads/feature stored, not deployed"), "{out}");
    assert_eq!(server.get("policy", "/").1, "hello world\n");
    assert_eq!(server.json(&["releases", "policy", "--json"]).as_array().map(Vec::len), Some(1));

    // Deleting the branch that is live is refused; deleting another is fine.
    let (ok, out) = repo.push(&server.git_url("policy"), ":main");
    assert!(!ok && out.contains("refusing to delete refs/heads/main"), "{out}");
    let (ok, out) = repo.push(&server.git_url("policy"), ":feature");
    assert!(ok, "{out}");
}

#[test]
fn master_deploys_when_there_is_no_main() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.git(&["branch", "-m", "main", "master"]);
    let (ok, out) = repo.push(&server.git_url("legacy"), "master");
    assert!(ok && out.contains("v1 is live"), "{out}");
}

#[test]
fn tag_policy_deploys_matching_tags_only() {
    let server = TestServer::start();
    let repo = AppRepo::hello("tagged");
    repo.write("slipway.toml", "[deploy]\nrefs = [\"refs/tags/release-*\"]\n");
    repo.commit("deploy tags only");
    let (ok, out) = repo.push(&server.git_url("tags"), "main");
    assert!(ok && out.contains("stored, not deployed (this app deploys refs/tags/release-*)"), "{out}");
    assert_eq!(server.get("tags", "/").0, 503);
    repo.git(&["tag", "v1-beta"]);
    let (ok, out) = repo.push(&server.git_url("tags"), "v1-beta");
    assert!(ok && out.contains("stored, not deployed"), "{out}");
    repo.git(&["tag", "-a", "-m", "first release", "release-1"]);
    let (ok, out) = repo.push(&server.git_url("tags"), "release-1");
    assert!(ok && out.contains("v1 is live"), "{out}");
    assert_eq!(server.get("tags", "/").1, "tagged world\n");
    // An annotated tag can be deleted again (it is not the live ref now
    // that a later tag deploys).
    repo.write("app.py", &hello_app("second tag"));
    repo.commit("second");
    repo.git(&["tag", "-a", "-m", "second release", "release-2"]);
    let (ok, out) = repo.push(&server.git_url("tags"), "release-2");
    assert!(ok && out.contains("v2 is live"), "{out}");
    let (ok, out) = repo.push(&server.git_url("tags"), ":refs/tags/release-1");
    assert!(ok, "{out}");
}

#[test]
fn concurrent_pushes_to_one_app_are_serialized() {
    let server = Arc::new(TestServer::start());
    let base = AppRepo::hello("base");
    base.write("slipway.toml", "[test]\ncommand = \"sleep 2\"\n");
    base.commit("slow gate");
    base.deploy(&server, "race");
    // Two clones, each one commit ahead of what is live.
    let clones: Vec<AppRepo> = ["left", "right"]
        .iter()
        .map(|name| {
            let r = AppRepo { dir: tempfile::tempdir().expect("dir") };
            let out = std::process::Command::new("git")
                .args(["clone", "-q", &server.git_url("race"), "."])
                .current_dir(r.path())
                .output()
                .expect("clone");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            r.write("app.py", &hello_app(name));
            r.commit(name);
            r
        })
        .collect();
    let handles: Vec<_> = clones
        .into_iter()
        .map(|r| {
            let url = server.git_url("race");
            std::thread::spawn(move || {
                let res = r.push(&url, "main");
                (res, r.head())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("push thread")).collect();
    let winners: Vec<_> = results.iter().filter(|((ok, _), _)| *ok).collect();
    let losers: Vec<_> = results.iter().filter(|((ok, _), _)| !*ok).collect();
    assert_eq!(winners.len(), 1, "exactly one push wins: {results:#?}");
    let loser_out = &losers[0].0 .1;
    assert!(loser_out.contains("in progress; waiting"), "the second push must say it waits:\n{loser_out}");
    assert!(loser_out.contains("moved while this push waited"), "{loser_out}");
    // The ref and the live release agree on the winner.
    let live = server.json(&["releases", "race", "--json"])[0]["commit"].as_str().unwrap_or("").to_string();
    assert_eq!(live, winners[0].1);
    assert_eq!(server.json(&["releases", "race", "--json"]).as_array().map(Vec::len), Some(2));
}

#[test]
fn different_apps_deploy_in_parallel() {
    let server = Arc::new(TestServer::start());
    let handles: Vec<_> = ["par-a", "par-b", "par-c"]
        .iter()
        .map(|app| {
            let server = server.clone();
            std::thread::spawn(move || {
                let repo = AppRepo::hello(app);
                repo.deploy(&server, app);
                server.get(app, "/").1
            })
        })
        .collect();
    let bodies: Vec<String> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    assert_eq!(bodies, vec!["par-a world\n", "par-b world\n", "par-c world\n"]);
}

#[test]
fn rollback_restores_code_and_config() {
    let server = TestServer::start();
    let repo = AppRepo::hello("one");
    repo.deploy(&server, "back");
    repo.write("app.py", &hello_app("two"));
    repo.commit("two");
    repo.deploy(&server, "back");
    server.ok(&["config", "set", "back", "GREETING=config"]);
    assert_eq!(server.get("back", "/").1, "two config\n");

    let out = server.ok(&["rollback", "back"]);
    assert!(out.contains("rolling back to v2 as v4"), "{out}");
    assert_eq!(server.get("back", "/").1, "two world\n");
    assert!(server.json(&["config", "show", "back", "--json"]).get("GREETING").is_none());

    server.ok(&["rollback", "back", "v1"]);
    assert_eq!(server.get("back", "/").1, "one world\n");
    let releases = server.json(&["releases", "back", "--json"]);
    assert_eq!(releases[0]["version"], "v5");
    assert_eq!(releases[0]["live"], true);
    assert_eq!(releases[0]["description"], "rollback to v1");

    let bad = server.cli(&["rollback", "back", "v99"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("back has no release v99"));
    assert_eq!(server.get("back", "/").1, "one world\n");
}

#[test]
fn old_releases_and_unused_environments_are_collected() {
    let server = TestServer::start_with(&["--keep-releases", "2"]);
    let repo = AppRepo::hello("r");
    for n in 1..=4 {
        repo.write("app.py", &hello_app(&format!("r{n}")));
        // Alternate the dependencies, so environments change too.
        let extra = if n % 2 == 0 { "six==1.16.0\n" } else { "" };
        repo.write("requirements.txt", &format!("gunicorn==27.0.1\n{extra}"));
        repo.commit(&format!("r{n}"));
        repo.deploy(&server, "gc");
    }
    assert_eq!(ls(&server.data().join("apps/gc/releases")), vec!["v3", "v4"]);
    // history track (issue 15 #4): the records stay, marked collected.
    let releases = server.json(&["releases", "gc", "--json"]);
    let collected: Vec<bool> = releases.as_array().into_iter().flatten().map(|r| r["collected"] == true).collect();
    assert_eq!(collected, vec![false, false, true, true], "{releases}");
    // v3 and v4 use different environments; the older duplicates are gone.
    assert_eq!(ls(&server.data().join("envs")).len(), 2);
    let out = server.cli(&["rollback", "gc", "v1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("slipway deploy gc --ref"), "{}", String::from_utf8_lossy(&out.stderr));
    server.ok(&["rollback", "gc", "v3"]);
    assert_eq!(server.get("gc", "/").1, "r3 world\n");
}

#[test]
fn a_push_abandoned_mid_deploy_leaves_ref_and_live_release_in_agreement() {
    let server = TestServer::start();
    let repo = AppRepo::hello("old");
    repo.deploy(&server, "abandon");
    repo.write("app.py", &hello_app("new"));
    repo.write("slipway.toml", "[test]\ncommand = \"sleep 2\"\n");
    repo.commit("slow gate");
    let new_commit = repo.head();
    // The pusher goes away while the deploy runs (git push and its
    // git-remote-http child, as one process group).
    use std::os::unix::process::CommandExt;
    let mut push = std::process::Command::new("git")
        .args(["push", &server.git_url("abandon"), "main"])
        .current_dir(repo.path())
        .process_group(0)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git push");
    std::thread::sleep(std::time::Duration::from_millis(800));
    signal(-(push.id() as i32), libc::SIGKILL);
    let _ = push.wait();
    // The deploy goes on without its pusher; wait until it has ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.ok(&["events", "abandon"]).contains("v2") {
        assert!(std::time::Instant::now() < deadline, "the deploy never ended: {}", server.ok(&["events", "abandon"]));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Once settled, the ref, the live release and the served code agree:
    // either git finished the push (all new) or it did not (all old).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ls = std::process::Command::new("git").args(["ls-remote", &server.git_url("abandon"), "refs/heads/main"]).output().expect("ls-remote");
        let ref_commit = String::from_utf8_lossy(&ls.stdout).split_whitespace().next().unwrap_or("").to_string();
        let body = server.get("abandon", "/").1;
        let releases = server.json(&["releases", "abandon", "--json"]);
        let live = releases.as_array().and_then(|r| r.iter().find(|x| x["live"] == true).cloned());
        let live_commit = live.map(|l| l["commit"].as_str().unwrap_or("").to_string()).unwrap_or_default();
        let expected_body = if ref_commit == new_commit { "new world\n" } else { "old world\n" };
        if ref_commit == live_commit && body == expected_body {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ref {ref_commit}, live {live_commit}, body {body:?}\n{}",
            server.ok(&["logs", "abandon", "-n", "30"])
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

// ---- integrity track (issue 10 #12): a crash mid-switch, settled at start ----

fn server_ref(server: &TestServer, app: &str, name: &str) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(server.data().join(format!("repos/{app}.git")))
        .args(["rev-parse", "--verify", "--quiet", &format!("{name}^{{commit}}")])
        .output()
        .expect("git rev-parse");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Store, `current`, proxy and refs name one release: the one whose code serves.
fn assert_agree(server: &TestServer, app: &str, commit: &str, body: &str) {
    let releases = server.json(&["releases", app, "--json"]);
    let live: Vec<&serde_json::Value> = releases.as_array().into_iter().flatten().filter(|r| r["live"] == true).collect();
    assert_eq!(live.len(), 1, "one live release: {releases}");
    assert_eq!(live[0]["commit"], commit, "the store's live release: {releases}");
    assert!(
        !releases.as_array().into_iter().flatten().any(|r| r["status"] == "pending"),
        "no pending release: {releases}"
    );
    let tree = std::fs::read_link(server.data().join(format!("apps/{app}/current"))).expect("current link");
    let version = live[0]["version"].as_str().unwrap_or("").to_string();
    assert!(tree.ends_with(&version), "current {} is not the live {version}", tree.display());
    assert_eq!(server.get(app, "/").1, body, "the proxy serves the live release");
    assert_eq!(server_ref(server, app, "refs/heads/main"), commit, "main");
    assert_eq!(server_ref(server, app, "refs/tags/LIVE"), commit, "LIVE");
}

fn reconcile_event(server: &TestServer, app: &str) -> String {
    let events = server.json(&["events", app, "--json"]);
    events
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["action"] == "reconcile")
        .map(|e| e["detail"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no reconcile event: {events}"))
}

/// Deploy "old", then push "new" with the daemon set to abort at `point`;
/// restart it without the hook. Returns (old commit, new commit).
fn crash_during_push(server: &mut TestServer, repo: &AppRepo, app: &str, point: &str) -> (String, String) {
    repo.deploy(server, app);
    let old = repo.head();
    assert!(server.stop(), "server stops");
    server.set_env("SLIPWAY_TEST_CRASH_AT", Some(point));
    server.restart();
    repo.write("app.py", &hello_app("new"));
    repo.commit("new code");
    let new = repo.head();
    let _ = repo.push(&server.git_url(app), "main");
    assert!(server.wait_exit(std::time::Duration::from_secs(60)), "the test hook aborted the daemon");
    server.set_env("SLIPWAY_TEST_CRASH_AT", None);
    server.restart();
    (old, new)
}

#[test]
fn a_crash_right_after_the_switch_rolls_back_to_what_the_repo_names() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("old");
    let (old, _new) = crash_during_push(&mut server, &repo, "crashback", "after-switch");
    // git never took the push: the repo names the old commit, so the
    // store goes back to it and everything else follows.
    assert_agree(&server, "crashback", &old, "old world\n");
    let detail = reconcile_event(&server, "crashback");
    assert!(detail.contains("rolled back to v1"), "{detail}");
    // A later deploy of the branch does not bring back anything else.
    server.ok(&["deploy", "crashback"]);
    assert_agree(&server, "crashback", &old, "old world\n");
    // And the push, tried again, deploys.
    repo.deploy(&server, "crashback");
    assert_eq!(server.get("crashback", "/").1, "new world\n");
    // Tagged once git has ended, just after the push returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server_ref(&server, "crashback", "refs/tags/LIVE") != repo.head() {
        assert!(std::time::Instant::now() < deadline, "LIVE never moved to the new push");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_crash_after_git_took_the_push_rolls_forward_to_it() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("old");
    let (_old, new) = crash_during_push(&mut server, &repo, "crashfwd", "before-tag");
    // git moved main before the crash: the new release stands, and the
    // tags catch up with it.
    assert_agree(&server, "crashfwd", &new, "new world\n");
    let detail = reconcile_event(&server, "crashfwd");
    assert!(detail.contains("rolled forward to v2"), "{detail}");
    server.ok(&["deploy", "crashfwd"]);
    assert_agree(&server, "crashfwd", &new, "new world\n");
}

// ---- integrity track (issue 10 #4): a full disk mid-deploy ----

/// A tmpfs mounted over a path for one test; unmounted (lazily: the
/// server may still hold it) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0711"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Processes whose working directory is inside `dir`.
fn processes_in(dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(dir)))
        .collect()
}

#[test]
fn a_disk_filled_during_the_release_phase_fails_the_deploy_and_changes_nothing() {
    let mut server = TestServer::start();
    assert!(server.stop(), "server stops");
    // The data dir on a small file system of its own, fresh.
    let _fs = Tmpfs::mount(&server.data(), "200M");
    server.set_env("SLIPWAY_MIN_FREE_SPACE", Some("8M"));
    server.restart();
    let repo = AppRepo::hello("old");
    repo.deploy(&server, "full");
    let pids = server.pids("full");
    let releases_before = server.json(&["releases", "full", "--json"]);

    // The release phase fills the disk, and succeeds.
    repo.write("app.py", &hello_app("new"));
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nrelease: dd if=/dev/zero of=$SLIPWAY_DATA_DIR/fill bs=1M 2>/dev/null; true\n");
    repo.commit("fills the disk");
    let out = repo.deploy_rejected(&server, "full");
    assert!(out.contains("disk is full"), "the refusal says why: {out}");
    // The old release serves, from the same processes; nothing of v2 runs
    // or stays (no tree, no pending record).
    assert_eq!(server.get("full", "/").1, "old world\n");
    assert_eq!(server.pids("full"), pids);
    let v2 = server.data().join("apps/full/releases/v2");
    assert!(!v2.exists(), "the failed release's tree is removed");
    assert_eq!(processes_in(&v2), Vec::<i32>::new(), "no process runs in the failed release");
    // History is honest (issue 15): the failed release stays on record as
    // `failed`, saying why; everything before it is as it was.
    let after = server.json(&["releases", "full", "--json"]);
    assert_eq!(after[0]["status"], "failed", "{after}");
    assert!(after[0]["description"].as_str().unwrap_or_default().contains("disk is full"), "{after}");
    assert_eq!(after.as_array().map(|a| a[1..].to_vec()), releases_before.as_array().cloned(), "live unchanged");

    // While the disk is full, a deploy does not start, and says why.
    let out = repo.deploy_rejected(&server, "full");
    assert!(out.contains("free on the server's data disk"), "{out}");
    assert_eq!(server.get("full", "/").1, "old world\n");

    // Space freed: the same push deploys.
    std::fs::remove_file(server.data().join("apps/full/data/fill")).expect("remove fill");
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n");
    repo.commit("no fill");
    repo.deploy(&server, "full");
    assert_eq!(server.get("full", "/").1, "new world\n");
    server.stop();
}

// integrity track (issue 10, low): concurrent first pushes to a new app
// do not race in creating its repo (once HTTP 500 "could not lock config
// file"): one deploys, the others are refused with a reason, none fails.
#[test]
fn concurrent_first_pushes_to_a_new_app_do_not_race_in_repo_creation() {
    let server = TestServer::start();
    let repos: Vec<AppRepo> = (0..4).map(|i| AppRepo::hello(&format!("racer{i}"))).collect();
    let url = server.git_url("firstrace");
    let results: Vec<(bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = repos.iter().map(|r| s.spawn(|| r.push(&url, "main"))).collect();
        handles.into_iter().map(|h| h.join().expect("push thread")).collect()
    });
    for (_, out) in &results {
        // git says "HTTP 500" / "returned error: 500"; a bare "500" would
        // match a commit hash (it did: e68be500).
        let server_error = out.contains("HTTP 500") || out.contains("error: 500");
        assert!(!out.contains("could not lock") && !server_error, "a push hit the race:\n{out}");
    }
    let won: Vec<usize> = results.iter().enumerate().filter(|(_, (ok, _))| *ok).map(|(i, _)| i).collect();
    assert!(!won.is_empty(), "no push deployed: {results:?}");
    for (ok, out) in &results {
        if !ok {
            assert!(out.contains("[remote rejected]") || out.contains("[rejected]"), "a refusal with a reason:\n{out}");
        }
    }
    let body = server.get("firstrace", "/").1;
    assert!(won.iter().any(|i| body == format!("racer{i} world\n")), "serves a pushed app: {body:?}");
}
