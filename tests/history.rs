//! Honest history (issue 15 #4, #7): failed deploys stay on record, numbers
//! are never reused, collected releases keep their records, every deploy's
//! output can be read back, and config changes say what they did without
//! ever showing a value.

mod util;

use util::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn release<'a>(releases: &'a serde_json::Value, v: &str) -> &'a serde_json::Value {
    releases.as_array().into_iter().flatten().find(|r| r["version"] == v).unwrap_or(&serde_json::Value::Null)
}

#[test]
fn failed_deploys_stay_on_record_numbers_are_never_reused_and_collected_code_can_be_rebuilt() {
    let server = TestServer::start_with(&["--keep-releases", "1"]);
    let repo = AppRepo::hello("one");
    repo.deploy(&server, "hist");
    let first = repo.head();

    // A release phase that fails: the deploy is refused, and recorded.
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nrelease: echo migration exploded; exit 3\n");
    repo.commit("broken migration");
    repo.deploy_rejected(&server, "hist");
    let releases = server.json(&["releases", "hist", "--json"]);
    let v2 = release(&releases, "v2");
    assert_eq!(v2["status"], "failed", "{releases}");
    assert!(v2["description"].as_str().unwrap_or("").contains("release phase failed"), "the reason is kept: {v2}");
    assert_eq!(release(&releases, "v1")["status"], "live", "{releases}");
    let table = server.ok(&["releases", "hist"]);
    assert!(table.contains("failed") && table.contains("release phase failed"), "{table}");

    // The failed deploy's whole output, and an earlier one's, read back.
    let latest = server.ok(&["logs", "hist", "--deploy"]);
    assert!(latest.contains("migration exploded"), "the step's own output:\n{latest}");
    assert!(latest.contains("deploy failed"), "{latest}");
    assert!(latest.contains("as v2"), "{latest}");
    let v1 = server.ok(&["logs", "hist", "--deploy", "v1"]);
    assert!(v1.contains("as v1") && v1.contains("v1 is live"), "{v1}");
    let missing = server.cli(&["logs", "hist", "--deploy", "v9"]);
    assert!(!missing.status.success() && text(&missing).contains("has no release v9"), "{}", text(&missing));

    // Fixed: the next release is v3, never a second v2.
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n");
    repo.write("app.py", &hello_app("two"));
    repo.commit("fixed");
    let out = repo.deploy(&server, "hist");
    assert!(out.contains("as v3"), "{out}");
    assert_eq!(server.get("hist", "/").1, "two world\n");

    // --keep-releases 1: v1's code was collected, its record was not.
    let releases = server.json(&["releases", "hist", "--json"]);
    assert_eq!(releases.as_array().map(Vec::len), Some(3), "{releases}");
    assert_eq!(release(&releases, "v1")["collected"], true, "{releases}");
    assert_eq!(release(&releases, "v2")["status"], "failed", "{releases}");
    assert!(!server.data().join("apps/hist/releases/v1").exists(), "v1's tree is gone");
    assert!(server.ok(&["releases", "hist"]).contains("(code collected)"));

    // Rolling back to it says so, and how to rebuild it.
    let out = server.cli(&["rollback", "hist", "v1"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("was collected"), "{said}");
    assert!(said.contains(&format!("slipway deploy hist --ref {first}")), "{said}");
    assert_eq!(server.get("hist", "/").1, "two world\n", "nothing changed");

    // ... and that command rebuilds it, as a new release.
    let out = server.ok(&["deploy", "hist", "--ref", &first]);
    assert!(out.contains("as v4"), "{out}");
    assert_eq!(server.get("hist", "/").1, "one world\n");
    let releases = server.json(&["releases", "hist", "--json"]);
    assert_eq!(release(&releases, "v4")["commit"], first.as_str(), "{releases}");
    let bad = server.cli(&["deploy", "hist", "--ref", "0123456789abcdef"]);
    assert!(!bad.status.success() && text(&bad).contains("has no commit 0123456789abcdef"), "{}", text(&bad));

    // events: -n, --since, and the table.
    let last_two = server.json(&["events", "hist", "-n", "2", "--json"]);
    assert_eq!(last_two.as_array().map(Vec::len), Some(2), "{last_two}");
    let recent = server.json(&["events", "hist", "--since", "1h", "--json"]);
    assert!(recent.as_array().is_some_and(|a| a.len() >= 4), "{recent}");
    assert!(recent.to_string().contains("\"failed\""), "the failed deploy is in the trail: {recent}");
    let table = server.ok(&["events", "hist", "--since", "10m"]);
    assert!(table.lines().next().is_some_and(|h| h.contains("WHEN") && h.contains("ACTION") && h.contains("OUTCOME")), "{table}");
}

#[test]
fn run_records_its_command_and_exit_code() {
    let server = TestServer::start();
    AppRepo::hello("hi").deploy(&server, "runs");
    let out = server.cli(&["run", "runs", "--", "sh", "-c", "echo out; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let table = server.ok(&["events", "runs", "-n", "1"]);
    assert!(table.contains("sh -c 'echo out; exit 3'") && table.contains("exit 3"), "{table}");
}

#[test]
fn config_changes_say_what_they_did_and_never_show_a_value() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.deploy(&server, "cfgh");
    let secret = "s3cr3t-v4lue";

    let out = server.ok(&["config", "set", "cfgh", &format!("GREETING={secret}")]);
    assert!(out.contains("v2 is live"), "{out}");
    assert!(!out.contains(secret), "the value is never printed:\n{out}");

    // The same value again: no release, said as such.
    let pids = server.pids("cfgh");
    let before = server.json(&["releases", "cfgh", "--json"]);
    let out = server.ok(&["config", "set", "cfgh", &format!("GREETING={secret}")]);
    assert!(out.contains("cfgh config unchanged"), "{out}");
    assert_eq!(server.json(&["releases", "cfgh", "--json"]), before);

    // --no-restart: stored for the next deploy, nothing released or restarted.
    let out = server.ok(&["config", "set", "--no-restart", "cfgh", "GREETING=later", "QUOTE=it's $HOME"]);
    assert!(out.contains("takes effect at the next deploy"), "{out}");
    assert_eq!(server.json(&["releases", "cfgh", "--json"]), before, "no release");
    assert_eq!(server.pids("cfgh"), pids, "nothing restarted");
    assert_eq!(server.get("cfgh", "/").1, format!("hello {secret}\n"));
    repo.commit("redeploy");
    let out = repo.deploy(&server, "cfgh");
    assert!(!out.contains(secret) && !out.contains("later"), "{out}");
    assert_eq!(server.get("cfgh", "/").1, "hello later\n", "the next deploy took it");

    // --shell: quoted so a shell reads the values back exactly.
    let shell = server.ok(&["config", "show", "cfgh", "--shell"]);
    assert!(shell.contains("export QUOTE='it'\\''s $HOME'"), "{shell}");
    let echoed = std::process::Command::new("sh")
        .args(["-c", &format!("{shell}\nprintf '%s|%s' \"$GREETING\" \"$QUOTE\"")])
        .output()
        .expect("sh");
    assert_eq!(String::from_utf8_lossy(&echoed.stdout), "later|it's $HOME");

    // Values appear in no listing, event or deploy output.
    for args in [&["releases", "cfgh", "--json"][..], &["events", "cfgh", "--json"], &["logs", "cfgh", "--deploy", "v2"], &["logs", "cfgh", "-n", "1000"]] {
        let out = server.ok(args);
        assert!(!out.contains(secret) && !out.contains("it's"), "{args:?} shows a value:\n{out}");
    }
}

/// Router access lines (issue 13 #5): every proxied request is a line in
/// its app's log, as Heroku's router writes them, read with `--type
/// router` and followed live with `-t` (an alias of `-f`).
#[test]
fn the_router_writes_one_access_line_per_request_to_its_app() {
    use std::io::BufRead;
    let server = TestServer::start();
    AppRepo::hello("routed").deploy(&server, "rt");
    AppRepo::hello("other").deploy(&server, "quiet");

    // Followed with -t from before the requests.
    let mut follow = std::process::Command::new(BIN)
        .args(["logs", "rt", "-t", "--type", "router", "-n", "0"])
        .env("SLIPWAY_URL", format!("http://{}", server.api))
        .env("SLIPWAY_TOKEN", &server.token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -t");
    std::thread::sleep(std::time::Duration::from_millis(500));

    assert_eq!(server.get("rt", "/some/path?x=1").0, 200);
    let (status, _) = http_request(&server.http, "POST", "rt.localhost", "/form\"quoted", &[], "a=1");
    assert_eq!(status, 200);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let lines = loop {
        let out = server.ok(&["logs", "rt", "--type", "router"]);
        if out.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let get = lines.lines().find(|l| l.contains("method=GET")).unwrap_or_else(|| panic!("no GET line:\n{lines}"));
    assert!(get.contains(" router: at=info method=GET path=\"/some/path?x=1\" host=rt.localhost status=200 bytes=13 service="), "{get}");
    assert!(get.ends_with("ms upstream=web.1"), "{get}");
    let post = lines.lines().find(|l| l.contains("method=POST")).unwrap_or_else(|| panic!("no POST line:\n{lines}"));
    assert!(post.contains("path=\"/form\\\"quoted\""), "quotes escaped, one line: {post}");
    assert!(lines.lines().all(|l| l.contains(" router: ")), "--type router shows router lines only:\n{lines}");

    // Another app's log has none of them.
    let quiet = server.ok(&["logs", "quiet", "--type", "router"]);
    assert!(quiet.trim().is_empty(), "{quiet}");

    // And the follower saw them as they came.
    let mut reader = std::io::BufReader::new(follow.stdout.take().expect("stdout"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("a followed line");
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(first.contains(" router: at=info method=GET"), "{first}");
}

/// A failed push says its cause once (issue 15 #6): the step's own output,
/// then one `!` line in words with what to do; no server path.
#[test]
fn a_health_check_nobody_answers_is_said_once_in_words() {
    let server = TestServer::start();
    let repo = AppRepo::hello("fine");
    repo.deploy(&server, "deaf");
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:9999 --workers 1\n");
    repo.write("slipway.toml", "[healthcheck]\ntimeout = \"0m3s\"\n");
    repo.commit("wrong port");
    let out = repo.deploy_rejected(&server, "deaf");
    eprintln!("{out}");
    let bangs: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("remote:")).filter(|l| l.trim_start().starts_with('!')).collect();
    assert_eq!(bangs.len(), 1, "one `!` line:\n{out}");
    let port = bangs[0].split("$PORT=").nth(1).and_then(|r| r.split(':').next()).unwrap_or("?");
    assert!(port.parse::<u16>().is_ok(), "{}", bangs[0]);
    assert!(bangs[0].contains(&format!("nothing listens on $PORT={port}: bind to 127.0.0.1:$PORT (it printed port 9999)")), "{}", bangs[0]);
    assert_eq!(out.matches("nothing listens on").count(), 1, "said once:\n{out}");
    assert_eq!(out.matches("Listening at: http://127.0.0.1:9999").count(), 1, "its output once:\n{out}");
    // The app's own output may name its data dir; slipway's lines do not.
    let ours = out.lines().filter(|l| !l.contains("[INFO]"));
    assert!(ours.clone().all(|l| !l.contains(&server.data().display().to_string())), "no server path:\n{out}");
    assert!(out.contains("nothing changed: the previous release keeps serving"), "{out}");
}
