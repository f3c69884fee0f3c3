//! Zero-downtime restart and upgrade of the daemon (issue 14 #1): the
//! listening sockets are handed over to a new daemon on SIGUSR2, which
//! adopts the running apps; after `kill -9` a new daemon adopts them too.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
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

/// A gunicorn app that prints a line per request (its log must keep
/// flowing through the hand-over).
fn chatty(text: &str) -> AppRepo {
    let repo = AppRepo::hello(text);
    repo.write(
        "app.py",
        &format!(
            "import os, sys\n\
             def app(environ, start_response):\n\
             \x20   print('served ' + environ.get('PATH_INFO', ''), flush=True)\n\
             \x20   body = ('{text} ' + os.environ.get('GREETING', 'world') + '\\n').encode()\n\
             \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
             \x20   return [body]\n"
        ),
    );
    repo.commit("chatty");
    repo
}

#[test]
fn sigusr2_hands_over_under_load_without_a_failed_request_or_an_app_restart() {
    let mut server = TestServer::start();
    let one = chatty("one");
    one.deploy(&server, "one");
    AppRepo::hello("two").deploy(&server, "two");
    AppRepo::hello("three").deploy(&server, "three");
    let before = (server.pids("one"), server.pids("two"), server.pids("three"));
    let old_daemon = server.pid() as i32;

    // 8 keep-alive clients across 3 apps (the issue's load).
    let load = Load::start(&server, &["one", "two", "three"], 8);
    std::thread::sleep(Duration::from_millis(500));
    let new_daemon = server.upgrade();
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed, firsts) = load.finish();
    assert!(ok > 0, "the load ran");
    assert_eq!(failed, 0, "requests failed during the hand-over: {firsts:?}\n{}", server.server_log());

    assert_ne!(new_daemon, old_daemon);
    assert!(!alive(old_daemon), "the old daemon exited");
    assert_eq!((server.pids("one"), server.pids("two"), server.pids("three")), before, "the apps were adopted, not restarted");
    // slipway's own lines: under load, router lines fill the default tail.
    let log = server.ok(&["logs", "one", "--type", "slipway"]);
    assert!(log.contains("web.1 adopted"), "{log}");

    // The app's output reaches the new daemon's log.
    server.get("one", "/after-handover");
    wait_until("a line printed after the hand-over", Duration::from_secs(10), || {
        server.ok(&["logs", "one", "--type", "web"]).contains("served /after-handover")
    });

    // The new daemon deploys, and a second hand-over works from it.
    one.write("app.py", &hello_app("updated"));
    one.commit("after the hand-over");
    one.deploy(&server, "one");
    server.wait_body("one", "updated world", Duration::from_secs(10));
    let pids = server.pids("one");
    let third = server.upgrade();
    assert_ne!(third, new_daemon);
    assert_eq!(server.pids("one"), pids);
    assert_eq!(server.get("one", "/").1, "updated world\n");
    assert!(server.stop(), "the last daemon stops");
    assert!(pids.iter().all(|p| !alive(*p)), "a TERM still stops the apps");
}

#[test]
fn changes_during_a_hand_over_are_refused_with_a_clear_503_and_taken_after_it() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("steady");
    repo.deploy(&server, "steady");
    // A client changing the server without pause (creating tokens, the
    // cheapest change) while the daemon hands over: each answer is the
    // change made, or the clear refusal; never a dropped connection or
    // another error.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, api, auth) = (stop.clone(), server.api.clone(), format!("Bearer {}", server.token));
        std::thread::spawn(move || {
            let (mut made, mut refused, mut other) = (0usize, 0usize, Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let body = format!(r#"{{"name":"t{i}"}}"#);
                let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
                match http_request(&api, "POST", "localhost", "/api/tokens", &headers, &body) {
                    (201, _) => made += 1,
                    (503, b) if b.contains("server restarting") => refused += 1,
                    (code, b) => other.push(format!("{code} {b}")),
                }
            }
            (made, refused, other)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    server.upgrade();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (made, refused, other) = writer.join().expect("writer");
    eprintln!("during the hand-over: {made} changes made, {refused} refused with 503");
    assert_eq!(other, Vec::<String>::new(), "answers other than the change or the clear refusal");
    assert!(made > 0, "changes were made around the hand-over");
    // After it, the new daemon takes changes, a deploy included.
    repo.write("app.py", &hello_app("after"));
    repo.commit("after the hand-over");
    repo.deploy(&server, "steady");
    assert_eq!(server.get("steady", "/").1, "after world\n");
    assert!(server.stop());
}

#[test]
fn after_kill_9_the_apps_serve_on_and_the_next_daemon_adopts_them() {
    let mut server = TestServer::start();
    chatty("steady").deploy(&server, "steady");
    let pids = server.pids("steady");
    server.kill9();
    assert!(pids.iter().all(|p| alive(*p)), "apps outlive the daemon");
    server.restart();
    assert_eq!(server.pids("steady"), pids, "adopted, not restarted");
    assert_eq!(server.get("steady", "/").1, "steady world\n");
    wait_until("the adopted process's output in the log", Duration::from_secs(10), || {
        server.get("steady", "/after-crash");
        server.ok(&["logs", "steady"]).contains("served /after-crash")
    });
    // An adopted process that dies is restarted under the normal policy.
    signal(pids[0], libc::SIGKILL);
    wait_until("a new web process", Duration::from_secs(15), || {
        server.pids("steady").first().is_some_and(|p| *p != pids[0])
    });
    server.wait_body("steady", "steady world", Duration::from_secs(15));
}
