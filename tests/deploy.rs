//! Push to deploy, end to end: the real binary, real git pushes over
//! HTTP, real gunicorn, through the real proxy.

mod util;

use std::time::Duration;

use util::*;

#[test]
fn push_deploys_and_code_only_push_reuses_the_environment() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    let out = repo.deploy(&server, "hello");
    assert!(out.contains("python 3."), "runtime not reported:\n{out}");
    assert!(out.contains("building environment"), "first push should build:\n{out}");
    assert!(out.contains("v1 is live at http://hello.localhost:"), "{out}");
    assert_eq!(server.get("hello", "/"), (200, "hello world\n".to_string()));

    repo.write("app.py", &hello_app("hi"));
    repo.commit("say hi");
    let out = repo.deploy(&server, "hello");
    assert!(out.contains("reusing environment"), "code-only push must not reinstall:\n{out}");
    assert!(!out.contains("installing with"), "code-only push ran an install:\n{out}");
    assert_eq!(server.get("hello", "/"), (200, "hi world\n".to_string()));

    // `current` names the live release; the repo's ref names its commit.
    let current = std::fs::read_link(server.data().join("apps/hello/current")).expect("current link");
    assert!(current.ends_with("releases/v2"), "{current:?}");
    let releases = server.json(&["releases", "hello", "--json"]);
    assert_eq!(releases[0]["version"], "v2");
    assert_eq!(releases[0]["live"], true);
    assert_eq!(releases[0]["commit"], repo.head().as_str());
    assert_eq!(releases[1]["status"], "superseded");
    // Exactly one web process runs after the switch: the old one is gone.
    assert_eq!(server.pids("hello").len(), 1);
}

#[test]
fn config_set_makes_a_release_the_app_sees() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "cfg");
    let out = server.ok(&["config", "set", "cfg", "GREETING=slipway", "OTHER=x y"]);
    assert!(out.contains("v2 is live"), "{out}");
    assert_eq!(server.get("cfg", "/").1, "hello slipway\n");
    assert_eq!(server.ok(&["config", "get", "cfg", "OTHER"]).trim(), "x y");
    assert_eq!(server.json(&["config", "show", "cfg", "--json"])["GREETING"], "slipway");

    server.ok(&["config:unset", "cfg", "GREETING"]);
    assert_eq!(server.get("cfg", "/").1, "hello world\n");
    let releases = server.json(&["releases", "cfg", "--json"]);
    assert_eq!(releases[0]["version"], "v3");
    // Values never appear in listings, only keys.
    assert!(!releases.to_string().contains("slipway\""), "{releases}");
}

#[test]
fn django_example_deploys_migrates_and_keeps_data_across_releases() {
    let server = TestServer::start();
    let repo = AppRepo::example("django-notes");
    let out = repo.deploy(&server, "notes");
    assert!(out.contains("running tests: python manage.py test"), "{out}");
    assert!(out.contains("release phase: python manage.py migrate"), "{out}");
    let body = server.wait_body("notes", "slipway notes", Duration::from_secs(5));
    assert!(body.contains("v1"), "{body}");

    let (code, _) = http_request(
        &server.http,
        "POST",
        "notes.localhost",
        "/add",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "text=first",
    );
    assert_eq!(code, 302);
    assert!(server.get("notes", "/").1.contains("<span id=\"count\">1</span>"));

    // A new release keeps the data: the DB lives in SLIPWAY_DATA_DIR.
    server.ok(&["config", "set", "notes", "SOME=thing"]);
    let body = server.get("notes", "/").1;
    assert!(body.contains("v2") && body.contains("<span id=\"count\">1</span>"), "{body}");
}

#[test]
fn destroy_leaves_no_process_repo_or_directory() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "doomed");
    let pids = server.pids("doomed");
    assert_eq!(pids.len(), 1);

    let refused = server.cli(&["apps", "destroy", "doomed"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--confirm doomed"));

    server.ok(&["apps", "destroy", "doomed", "--confirm", "doomed"]);
    for pid in pids {
        assert!(!alive(pid), "web process {pid} survived destroy");
    }
    assert!(!server.data().join("repos/doomed.git").exists());
    assert!(!server.data().join("apps/doomed").exists());
    assert_eq!(server.get("doomed", "/").0, 404);
    assert!(!server.ok(&["apps", "list"]).contains("doomed"));
    // Its environment is collected too: no app uses it now.
    assert!(ls(&server.data().join("envs")).is_empty(), "{:?}", ls(&server.data().join("envs")));
}

#[test]
fn push_with_bad_or_missing_token_is_refused_and_creates_nothing() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    let (ok, out) = repo.push(&server.git_url_with("intruder", "slw_wrong"), "main");
    assert!(!ok, "push with a wrong token succeeded:\n{out}");
    assert!(out.contains("Authentication failed"), "{out}");
    // Without credentials git asks for them; with no terminal it gives up.
    let (ok, out) = repo.push(&format!("http://{}/git/intruder.git", server.api), "main");
    assert!(!ok, "push without a token succeeded:\n{out}");
    assert!(out.contains("could not read Username"), "{out}");
    assert!(!server.data().join("repos/intruder.git").exists());
    assert!(!server.ok(&["apps", "list"]).contains("intruder"));
    let out = server.cli_with_token("slw_wrong", &["apps", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid or revoked token"));
}

#[test]
fn proxy_answers_404_for_unknown_hosts_503_when_stopped_and_forwards_headers() {
    let server = TestServer::start();
    let (code, body) = server.get("nobody", "/");
    assert_eq!(code, 404);
    assert!(body.contains("No app answers at nobody.localhost"), "{body}");

    let echo = r#"import json
def app(environ, start_response):
    keys = ['HTTP_HOST', 'HTTP_X_FORWARDED_FOR', 'HTTP_X_FORWARDED_PROTO', 'HTTP_X_FORWARDED_HOST', 'PATH_INFO', 'QUERY_STRING']
    body = json.dumps({k: environ.get(k) for k in keys}).encode()
    start_response('200 OK', [('Content-Type', 'application/json')])
    return [body]
"#;
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT\n"),
        ("app.py", echo),
    ]);
    repo.deploy(&server, "echo");
    let (code, body) = server.get("echo", "/some/path?q=1");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["HTTP_HOST"], "echo.localhost");
    assert_eq!(v["HTTP_X_FORWARDED_FOR"], "127.0.0.1");
    assert_eq!(v["HTTP_X_FORWARDED_PROTO"], "http");
    assert_eq!(v["HTTP_X_FORWARDED_HOST"], "echo.localhost");
    assert_eq!(v["PATH_INFO"], "/some/path");
    assert_eq!(v["QUERY_STRING"], "q=1");

    server.ok(&["stop", "echo"]);
    assert_eq!(server.get("echo", "/").0, 503);
    server.ok(&["start", "echo"]);
    assert_eq!(server.get("echo", "/").0, 200);
}

#[test]
fn sigterm_stops_the_server_and_every_app_process() {
    let mut server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "one");
    AppRepo::hello("hello").deploy(&server, "two");
    let mut pids = server.pids("one");
    pids.extend(server.pids("two"));
    assert_eq!(pids.len(), 2);
    assert!(server.stop(), "server did not exit on SIGTERM");
    for pid in pids {
        assert!(!alive(pid), "app process {pid} outlived the server");
    }
    assert!(server.server_log().contains("stopped"));
}

#[test]
fn logs_show_app_output_and_deploy_events() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "logged");
    server.get("logged", "/");
    let logs = server.ok(&["logs", "logged", "-n", "200"]);
    assert!(logs.contains("web.1: ") && logs.contains("Booting worker"), "{logs}");
    assert!(logs.contains("slipway: deploy: v1 is live"), "{logs}");
    let only_web = server.ok(&["logs", "logged", "--type", "web"]);
    assert!(!only_web.contains("slipway:"), "{only_web}");
}

#[test]
fn apps_create_info_and_local_socket_access() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "made"]);
    let again = server.cli(&["apps", "create", "made"]);
    assert!(!again.status.success());
    let info = server.json(&["apps", "info", "made", "--json"]);
    assert_eq!(info["name"], "made");
    assert!(info["release"].is_null());
    assert_eq!(server.get("made", "/").0, 503);

    // Without SLIPWAY_URL the CLI uses the owner-only socket.
    let out = std::process::Command::new(BIN)
        .args(["apps", "list", "--json"])
        .env_remove("SLIPWAY_URL")
        .env("SLIPWAY_DATA", server.data())
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"made\""));
    let mode = std::fs::metadata(server.data().join("admin-token")).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600));
}
