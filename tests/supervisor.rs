//! The process supervisor (issue 5): restart policies, crash loops,
//! reloads in place, scaling, surviving the daemon, logs, one-offs.

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::*;

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn ps_rows(server: &TestServer, app: &str) -> Vec<serde_json::Value> {
    server.json(&["ps", app, "--json"]).as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [serde_json::Value], ptype: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["type"] == ptype).unwrap_or_else(|| panic!("no {ptype} in {rows:?}"))
}

#[test]
fn killed_web_process_comes_back() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "phoenix");
    let pid = server.pids("phoenix")[0];
    signal(pid, libc::SIGKILL);
    wait_until("a new web process", Duration::from_secs(10), || {
        let rows = ps_rows(&server, "phoenix");
        rows[0]["pid"].as_i64().is_some_and(|p| p as i32 != pid) && rows[0]["state"] == "running"
    });
    server.wait_body("phoenix", "hello world", Duration::from_secs(10));
    let rows = ps_rows(&server, "phoenix");
    assert_eq!(rows[0]["restarts"], 1);
    assert_eq!(rows[0]["last_exit"], "signal 9");
    let logs = server.ok(&["logs", "phoenix"]);
    assert!(logs.contains("web.1 exited with signal 9") && logs.contains("web.1 restarting"), "{logs}");
}

#[test]
fn one_shot_program_runs_exactly_once_and_crash_loop_ends_crashed() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT\n\
         once: echo ran >> $SLIPWAY_DATA_DIR/once.txt\n\
         flaky: echo about to fail; exit 4\n",
    );
    repo.write("slipway.toml", "[processes.once]\nrestart = \"never\"\n[processes.flaky]\nrestart = \"always\"\n");
    repo.commit("one-shot and a crash loop");
    repo.deploy(&server, "jobs");
    wait_until("the crash loop to be detected", Duration::from_secs(20), || {
        row(&ps_rows(&server, "jobs"), "flaky")["state"] == "crashed"
    });
    let rows = ps_rows(&server, "jobs");
    assert_eq!(row(&rows, "once")["state"], "exited");
    assert_eq!(row(&rows, "flaky")["last_exit"], "code 4");
    assert_eq!(row(&rows, "web")["state"], "running");
    let ran = std::fs::read_to_string(server.data().join("apps/jobs/data/once.txt")).expect("one-shot output");
    assert_eq!(ran, "ran\n", "the one-shot must run exactly once");
    assert!(row(&rows, "flaky")["last_lines"].to_string().contains("about to fail"), "{rows:?}");
    let table = server.ok(&["ps", "jobs"]);
    assert!(table.contains("flaky.1 crashed; its last output:") && table.contains("    about to fail"), "{table}");
    let logs = server.ok(&["logs", "jobs", "--type", "flaky", "-n", "50"]);
    assert!(logs.contains("flaky.1: about to fail"), "{logs}");
    let events = server.ok(&["logs", "jobs", "-n", "200"]);
    assert!(events.contains("flaky.1 crashed: exited 5 times in a row"), "{events}");
}

#[test]
fn hup_reload_keeps_the_gunicorn_master_and_serves_new_code() {
    let server = TestServer::start();
    let repo = AppRepo::hello("before");
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 2\n");
    repo.write("slipway.toml", "[processes.web]\nreload = \"signal:HUP\"\n");
    repo.commit("hup");
    repo.deploy(&server, "hup");
    let master = server.pids("hup");
    assert_eq!(master.len(), 1);

    repo.write("app.py", &hello_app("after"));
    repo.commit("new code");
    let out = repo.deploy(&server, "hup");
    assert!(out.contains("canary") && out.contains("reloading web.1 with signal 1"), "{out}");
    server.wait_body("hup", "after world", Duration::from_secs(10));
    assert_eq!(server.pids("hup"), master, "the master must stay");
    assert_eq!(ps_rows(&server, "hup")[0]["release"], "v2");

    // A broken release never reaches the master: the canary fails first.
    repo.write("app.py", "raise RuntimeError('broken at import')\n");
    repo.commit("broken");
    let out = repo.deploy_rejected(&server, "hup");
    assert!(out.contains("crashed on boot"), "{out}");
    assert_eq!(server.get("hup", "/").1, "after world\n");
    assert_eq!(server.pids("hup"), master);
}

#[test]
fn touch_reload_with_uwsgi_serves_new_code_without_restarting_the_master() {
    let server = TestServer::start();
    let app = |text: &str| {
        format!("def application(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'{text}\\n']\n")
    };
    let repo = AppRepo::new(&[
        ("app.py", &app("uwsgi one")),
        (
            "uwsgi.ini",
            "[uwsgi]\nplugins = python3\nhttp-socket = 127.0.0.1:$(PORT)\nwsgi-file = app.py\nmaster = true\nprocesses = 1\n\
             touch-reload = uwsgi.ini\ndie-on-term = true\nneed-app = true\n",
        ),
        ("Procfile", "web: uwsgi --ini uwsgi.ini\n"),
        ("slipway.toml", "[processes.web]\nreload = \"touch:uwsgi.ini\"\nstop_signal = \"INT\"\n"),
    ]);
    repo.deploy(&server, "uw");
    assert_eq!(server.get("uw", "/").1, "uwsgi one\n");
    let master = server.pids("uw");
    repo.write("app.py", &app("uwsgi two"));
    repo.commit("two");
    let out = repo.deploy(&server, "uw");
    assert!(out.contains("reloading web.1 by touching uwsgi.ini"), "{out}");
    server.wait_body("uw", "uwsgi two", Duration::from_secs(15));
    assert_eq!(server.pids("uw"), master);
}

#[test]
fn scaling_up_and_down_never_interrupts_serving() {
    let server = Arc::new(TestServer::start());
    AppRepo::hello("hello").deploy(&server, "elastic");
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (server, stop, total, failed) = (server.clone(), stop.clone(), total.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (code, _) = server.get("elastic", "/");
                    total.fetch_add(1, Ordering::Relaxed);
                    if code != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    server.ok(&["ps", "scale", "elastic", "web=3"]);
    let rows = ps_rows(&server, "elastic");
    assert_eq!(rows.len(), 3);
    let mut ports: Vec<i64> = rows.iter().filter_map(|r| r["port"].as_i64()).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3, "each instance has its own port: {rows:?}");
    std::thread::sleep(Duration::from_millis(500));
    server.ok(&["scale", "elastic", "web=1"]);
    assert_eq!(ps_rows(&server, "elastic").len(), 1);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    assert!(total.load(Ordering::Relaxed) > 20);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed while scaling");
    // The scale is remembered: a deploy keeps one instance.
    let bad = server.cli(&["scale", "elastic", "web=500"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("above the limit"));
    let bad = server.cli(&["scale", "elastic", "nosuch=1"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no process type \"nosuch\""));
}

#[test]
fn daemon_killed_hard_restarts_with_exactly_one_web_master() {
    let mut server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "survivor");
    let old = server.pids("survivor")[0];
    server.kill9();
    assert!(alive(old), "apps keep running while the daemon is down");
    assert_eq!(server.get("survivor", "/").0, 0, "nothing listens while the daemon is down");
    server.restart();
    server.wait_body("survivor", "hello world", Duration::from_secs(15));
    let pids = server.pids("survivor");
    assert_eq!(pids.len(), 1);
    // upgrade track: the restarted daemon adopts the master that survived it.
    assert_eq!(pids[0], old, "the running master is adopted, not restarted");
    // Exactly one gunicorn master for the app runs now: ours.
    let masters: Vec<i32> = all_pids()
        .into_iter()
        .filter(|p| cmdline(*p).contains("gunicorn app:app") && cwd_of(*p).contains(&format!("{}", server.data().display())))
        .filter(|p| !cmdline(ppid(*p)).contains("gunicorn"))
        .collect();
    assert_eq!(masters, pids, "one master, the supervised one");
}

#[test]
fn logs_follow_sees_a_restarted_process() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "tailing");
    let mut follower = Command::new(BIN)
        .args(["logs", "tailing", "-f", "-n", "0"])
        .env("SLIPWAY_URL", format!("http://{}", server.api))
        .env("SLIPWAY_TOKEN", &server.token)
        .stdout(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.pids("tailing")[0];
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let mut booted_again = false;
    while Instant::now() < deadline && !booted_again {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            booted_again = seen.iter().any(|l: &String| l.contains("web.1 started")) && line.contains("web.1: ") && line.contains("Booting worker");
            seen.push(line);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(booted_again, "logs -f did not show the restarted process:\n{}", seen.join("\n"));
    assert!(seen.iter().any(|l| l.contains("web.1 exited with signal 9")), "{seen:?}");
}

#[test]
fn one_off_run_streams_output_and_propagates_the_exit_code() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "oneoff");
    server.ok(&["config", "set", "oneoff", "GREETING=from-config"]);
    let out = server.cli(&["run", "oneoff", "--", "sh", "-c", "echo $GREETING $SLIPWAY_RELEASE; python -c 'import gunicorn; print(gunicorn.__name__)'; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("from-config v2"), "{stdout}");
    assert!(stdout.contains("gunicorn"), "the release's environment is on PATH: {stdout}");
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_string_lossy().parse().ok()).collect())
        .unwrap_or_default()
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

fn cwd_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.display().to_string()).unwrap_or_default()
}

fn ppid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn restart_of_one_type_leaves_the_others_and_stop_survives_a_daemon_restart() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT\nworker: sleep 600\n");
    repo.commit("worker");
    repo.deploy(&server, "typed");
    let before = ps_rows(&server, "typed");
    let (web_pid, worker_pid) = (row(&before, "web")["pid"].clone(), row(&before, "worker")["pid"].clone());
    server.ok(&["restart", "typed", "worker"]);
    let after = ps_rows(&server, "typed");
    assert_eq!(row(&after, "web")["pid"], web_pid, "web untouched");
    assert_ne!(row(&after, "worker")["pid"], worker_pid, "worker restarted");
    assert_eq!(server.get("typed", "/").1, "hello world\n");
    let bad = server.cli(&["restart", "typed", "nosuch"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no process type \"nosuch\""));

    server.ok(&["stop", "typed"]);
    server.stop();
    server.restart();
    assert_eq!(server.get("typed", "/").0, 503, "a stopped app stays stopped across a daemon restart");
    assert!(ps_rows(&server, "typed").is_empty());
    server.ok(&["start", "typed"]);
    assert_eq!(server.get("typed", "/").1, "hello world\n");
}

/// issue 9 #9: uWSGI takes SIGTERM as "reload", so without `die-on-term`
/// a TERM-stopped uWSGI never exits. slipway stops it with INT; a process
/// told to stop with a signal it ignores is killed at its stop timeout,
/// and the push output says so.
#[test]
fn uwsgi_stops_without_die_on_term_and_an_ignored_stop_signal_is_reported() {
    let server = TestServer::start();
    let ini = "[uwsgi]\nplugins = python3\nhttp-socket = 127.0.0.1:$(PORT)\nwsgi-file = app.py\nmaster = true\nprocesses = 2\nneed-app = true\n";
    let app = |body: &str| {
        format!(
            "def application(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'{body}']\n"
        )
    };
    let repo = AppRepo::new(&[("app.py", &app("one")), ("uwsgi.ini", ini), ("Procfile", "web: uwsgi --ini uwsgi.ini\n")]);
    repo.deploy(&server, "uw");
    let first = server.pids("uw");

    // The default stop (INT) ends uWSGI: nothing is reported as ignored.
    repo.write("app.py", &app("two"));
    repo.commit("two");
    let out = repo.deploy(&server, "uw");
    assert!(!out.contains("ignored"), "uWSGI stopped by INT must not need SIGKILL:\n{out}");
    assert_eq!(server.get("uw", "/"), (200, "two".to_string()));
    assert!(first.iter().all(|&p| !std::path::Path::new(&format!("/proc/{p}")).exists()), "the old uWSGI exited");

    // With TERM forced, the next switch finds it ignored: killed, and said.
    repo.write("slipway.toml", "[processes.web]\nstop_signal = \"TERM\"\nstop_timeout = \"2s\"\n");
    repo.commit("stop with TERM");
    repo.deploy(&server, "uw");
    repo.write("app.py", &app("four"));
    repo.commit("four");
    let out = repo.deploy(&server, "uw");
    assert!(out.contains("web.1 ignored SIGTERM for 2s and was killed"), "{out}");
    assert!(out.contains("set stop_signal in [processes.web]"), "{out}");
    assert_eq!(server.get("uw", "/"), (200, "four".to_string()));
    let log = server.ok(&["logs", "uw", "-n", "200", "--type", "slipway"]);
    assert!(log.contains("ignored SIGTERM"), "{log}");
}
