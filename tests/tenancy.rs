//! Tenants stay apart (issue 10) and one server owns its data dir
//! (issue 14 #2): each attack performed against the real binary, bounded
//! in time, on loopback.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::*;

/// The daemon's resident memory, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While `attack` runs: the daemon's peak RSS and how many requests to
/// the calm app failed (of how many).
fn during(server: &TestServer, attack: impl FnOnce()) -> (u64, usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let pid = server.pid();
    let http = server.http.clone();
    let stop2 = stop.clone();
    let watcher = std::thread::spawn(move || {
        let (mut peak, mut failed, mut total) = (0u64, 0usize, 0usize);
        let mut client = KeepAlive::new(&http);
        while !stop2.load(Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            let (code, body) = client.get("calm.localhost", "/");
            total += 1;
            if code != 200 || !body.contains("calm") {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (peak, failed, total)
    });
    attack();
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher")
}

/// An API request on a raw connection whose response is then read
/// slowly (`chunk` bytes per 20 ms) for `time`.
fn read_slowly(api: &str, token: &str, method: &str, path: &str, body: &str, chunk: usize, time: Duration) -> usize {
    let Ok(mut s) = TcpStream::connect(api) else { return 0 };
    // A small receive buffer, so the daemon sees the slowness soon.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let deadline = Instant::now() + time;
    let mut buf = vec![0u8; chunk];
    let mut got = 0;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    got
}

#[test]
fn output_storms_keep_the_daemon_bounded_and_other_apps_serving() {
    let server = TestServer::start();
    AppRepo::hello("calm").deploy(&server, "calm");
    let noisy = AppRepo::hello("noisy");
    noisy.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n\
         spam: exec yes\n\
         big: exec python3 big.py\n",
    );
    noisy.write("big.py", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536 + '\\n')\n");
    noisy.commit("an app that prints without end");
    noisy.deploy(&server, "noisy");
    let base = rss_mib(server.pid());

    // 1. A process type that prints as fast as it can (`yes`), and one
    //    printing 64 KiB lines.
    let (peak, failed, total) = during(&server, || std::thread::sleep(Duration::from_secs(8)));
    eprintln!("output storm: base {base} MiB, peak {peak} MiB, calm failed {failed}/{total}");
    assert!(peak < 64, "daemon RSS reached {peak} MiB during a `yes` process type");
    assert_eq!(failed, 0, "the calm app failed {failed} of {total} requests during the output storm");
    let logs = server.ok(&["logs", "noisy", "--type", "spam", "-n", "3"]);
    assert!(logs.contains("spam.1: y"), "its output still reaches the log: {logs}");

    // 2. 40 concurrent `logs -n 10000` of an app with 64 KiB lines, read
    //    slowly.
    let log_path = "/api/apps/noisy/logs?n=10000".to_string();
    let (peak, failed, total) = during(&server, || {
        let readers: Vec<_> = (0..40)
            .map(|_| {
                let (api, token, path) = (server.api.clone(), server.token.clone(), log_path.clone());
                std::thread::spawn(move || read_slowly(&api, &token, "GET", &path, "", 16 * 1024, Duration::from_secs(8)))
            })
            .collect();
        let got: usize = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(got > 40 * 64 * 1024, "the readers got their logs ({got} bytes)");
    });
    eprintln!("40 slow log tails: peak {peak} MiB, calm failed {failed}/{total}");
    assert!(peak < 64, "daemon RSS reached {peak} MiB during 40 slow `logs -n 10000`");
    assert_eq!(failed, 0, "the calm app failed {failed} of {total} requests during the log tails");

    // 3. A one-off `yes` whose client reads slowly, with an app-scoped token.
    let token = server.ok(&["tokens", "create", "noisy-deployer", "--app", "noisy"]).trim().to_string();
    let token = token.lines().last().unwrap_or_default().trim().to_string();
    let (peak, failed, total) = during(&server, || {
        let got = read_slowly(&server.api, &token, "POST", "/api/apps/noisy/run", r#"{"command":"yes"}"#, 1024, Duration::from_secs(8));
        assert!(got > 0, "the one-off ran and printed");
    });
    eprintln!("slow one-off: peak {peak} MiB, calm failed {failed}/{total}");
    assert!(peak < 64, "daemon RSS reached {peak} MiB during a slowly read one-off `yes`");
    assert_eq!(failed, 0, "the calm app failed {failed} of {total} requests during the slow one-off");
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_and_changes_nothing() {
    let server = TestServer::start();
    AppRepo::hello("solo").deploy(&server, "solo");
    let pids = server.pids("solo");
    let sock = server.data().join("slipway.sock");
    assert!(sock.exists());

    let out = std::process::Command::new(BIN)
        .args(["server", "--data"])
        .arg(server.data())
        .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ssh", "127.0.0.1:0", "--domain", "localhost"])
        .output()
        .expect("run a second server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second server must not start: {err}");
    assert!(err.contains(&format!("pid {}", server.pid())) && err.contains("already using the data dir"), "{err}");

    // Nothing of the first one was touched: same processes, socket there,
    // still serving.
    assert_eq!(server.pids("solo"), pids);
    assert!(sock.exists(), "the first server's socket must stay");
    wait_until("the first server to keep serving", Duration::from_secs(5), || server.get("solo", "/").0 == 200);
    assert!(server.ok(&["apps", "list"]).contains("solo"));
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next()).and_then(|u| u.parse().ok())
}

/// Live (not zombie) processes running as `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("Z").to_string();
            uid_of(pid) == Some(uid) && state != "Z" && state != "X"
        })
        .collect()
}

#[test]
fn processes_cannot_escape_stop_or_destroy_with_setsid() {
    if !is_root() {
        eprintln!("skipping: app users exist only when the daemon runs as root");
        return;
    }
    let server = TestServer::start();
    let repo = AppRepo::hello("escape");
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n\
         worker: setsid sleep 100000 < /dev/null > /dev/null 2>&1 & exec sleep 100000\n",
    );
    repo.commit("a worker whose child leaves its session");
    repo.deploy(&server, "escape");
    let uid = uid_of(server.pids("escape")[0]).expect("uid of web");
    let escaped = || -> Vec<i32> {
        processes_of(uid)
            .into_iter()
            .filter(|&pid| {
                // A session of its own: its session id is itself.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.rsplit(')').next().unwrap_or("").split_whitespace().nth(3).and_then(|s| s.parse::<i32>().ok()) == Some(pid)
                    && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().starts_with("sleep")
            })
            .collect()
    };
    // Until the detached child has exec'd `sleep`: counting processes
    // alone could catch it still being `setsid` (seen under load).
    let deadline = Instant::now() + Duration::from_secs(10);
    while escaped().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let escaped = escaped();
    assert!(!escaped.is_empty(), "the worker's child must have left the session: {:?}", processes_of(uid));

    server.ok(&["stop", "escape"]);
    assert_eq!(processes_of(uid), Vec::<i32>::new(), "nothing of the app survives `stop`, setsid or not");

    // A one-off that detaches, then `apps destroy`.
    server.ok(&["start", "escape"]);
    server.ok(&["run", "escape", "--", "sh", "-c", "setsid sleep 100000 < /dev/null > /dev/null 2>&1 &"]);
    assert!(processes_of(uid).len() >= 2, "the one-off left a detached process");
    server.ok(&["apps", "destroy", "escape", "--confirm", "escape"]);
    assert_eq!(processes_of(uid), Vec::<i32>::new(), "nothing of the app survives `apps destroy`");
}

#[test]
fn a_fork_bomb_stops_at_the_app_process_limit_and_limits_apply_per_type() {
    if !is_root() {
        eprintln!("skipping: limits apply to app users, which exist only when the daemon runs as root");
        return;
    }
    let server = TestServer::start();
    AppRepo::hello("calm").deploy(&server, "calm");
    let repo = AppRepo::hello("bomb");
    repo.write("slipway.toml", "[processes.web]\nopen_files = 100\n");
    repo.commit("limits");
    repo.deploy(&server, "bomb");
    let web = server.pids("bomb")[0];
    let limits = std::fs::read_to_string(format!("/proc/{web}/limits")).expect("limits");
    let row = |name: &str| limits.lines().find(|l| l.starts_with(name)).unwrap_or_default().split_whitespace().rev().nth(1).unwrap_or_default().to_string();
    assert_eq!(row("Max open files"), "100", "[processes.web] open_files applies: {limits}");
    assert_eq!(row("Max processes"), "512", "the default process limit applies: {limits}");
    let uid = uid_of(web).expect("uid");

    // 1,500 processes asked for by one `run`; bounded in time (60 s sleeps).
    let (peak, (code, body)) = std::thread::scope(|s| {
        let runner = s.spawn(|| server.cli(&["run", "bomb", "--", "sh", "-c", "i=0; while [ $i -lt 1500 ]; do sleep 60 & i=$((i+1)); done; wait"]));
        let mut peak = 0;
        let mut last_change = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(40);
        // Until the count stops growing for 3 s.
        while Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(3) {
            let n = processes_of(uid).len();
            if n > peak {
                peak = n;
                last_change = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let answer = server.get("calm", "/");
        server.ok(&["stop", "bomb"]);
        let _ = runner.join();
        (peak, answer)
    });
    eprintln!("fork bomb: peak {peak} processes of the app user");
    assert!(peak <= 512, "the app ran {peak} processes, above its limit of 512");
    assert!(peak >= 100, "the bomb must have forked a lot for the test to mean anything ({peak})");
    assert!(code == 200 && body.contains("calm"), "another app keeps serving during the fork bomb: {code} {body}");
    assert_eq!(processes_of(uid), Vec::<i32>::new(), "stop ends the bomb");
}

#[test]
fn six_hundred_process_types_are_refused() {
    let server = TestServer::start();
    let repo = AppRepo::hello("types");
    let procfile: String = (0..600).map(|i| format!("t{i}: sleep 1000\n")).collect();
    repo.write("Procfile", &procfile);
    repo.commit("600 process types");
    server.ok(&["apps", "create", "types"]);
    let token = server.ok(&["tokens", "create", "types-deployer", "--app", "types"]).trim().lines().last().unwrap_or_default().trim().to_string();
    let (ok, out) = repo.push(&server.git_url_with("types", &token), "main");
    assert!(!ok, "600 process types must be refused: {out}");
    assert!(out.contains("more than 32 process types"), "{out}");
    assert!(server.pids("types").is_empty());
}

#[test]
fn instances_of_all_types_together_are_bounded_per_app() {
    let server = TestServer::start();
    let repo = AppRepo::hello("many");
    repo.write("Procfile", "web: gunicorn -b 127.0.0.1:$PORT app:app\na: sleep 1000\nb: sleep 1000\n");
    repo.commit("three types");
    server.ok(&["apps", "create", "many"]);
    let token = server.ok(&["tokens", "create", "many-deployer", "--app", "many"]).trim().lines().last().unwrap_or_default().trim().to_string();
    let (ok, out) = repo.push(&server.git_url_with("many", &token), "main");
    assert!(ok, "{out}");
    let before = server.pids("many").len();
    assert_eq!(before, 3);
    // Each type within its own limit of 50; together 101 instances.
    let out = server.cli_with_token(&token, &["scale", "many", "a=50", "b=50"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "101 instances must be refused");
    assert!(err.contains("101 instances in all is above the limit of 100 per app"), "{err}");
    assert_eq!(server.pids("many").len(), before, "a refused scale starts nothing");
    assert_eq!(server.get("many", "/").0, 200);
}

#[test]
fn servers_on_one_host_get_disjoint_app_uids() {
    if !is_root() {
        eprintln!("skipping: app users exist only when the daemon runs as root");
        return;
    }
    let (a, b) = (TestServer::start(), TestServer::start());
    AppRepo::hello("one").deploy(&a, "same");
    AppRepo::hello("two").deploy(&b, "same");
    let (ua, ub) = (uid_of(a.pids("same")[0]).expect("uid a"), uid_of(b.pids("same")[0]).expect("uid b"));
    let block = |s: &TestServer| std::fs::read_to_string(s.data().join("uid-block")).expect("uid-block").trim().parse::<u32>().expect("block");
    let (ba, bb) = (block(&a), block(&b));
    assert_ne!(ba, bb, "two servers share a uid block");
    assert_ne!(ua, ub, "two servers' apps share uid {ua}");
    for (uid, blk) in [(ua, ba), (ub, bb)] {
        assert!((200_000 + blk * 10_000..200_000 + (blk + 1) * 10_000).contains(&uid), "uid {uid} outside block {blk}");
    }
    // No host user or group has an id in either block.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default() + &std::fs::read_to_string("/etc/group").unwrap_or_default();
    for id in passwd.lines().filter_map(|l| l.split(':').nth(2)).filter_map(|i| i.parse::<u32>().ok()) {
        assert!(id / 10_000 != ua / 10_000 && id / 10_000 != ub / 10_000, "host id {id} in an app uid block");
    }
    // A restart keeps the block (same uid for the same app).
    let mut a = a;
    a.stop();
    a.restart();
    wait_until("the app to come back", Duration::from_secs(30), || !a.pids("same").is_empty());
    assert_eq!(uid_of(a.pids("same")[0]), Some(ua));
}

/// An app whose next release phase records its pid and then hangs.
fn app_with_hanging_release_phase(server: &TestServer, app: &str) -> (AppRepo, std::path::PathBuf) {
    let repo = AppRepo::hello("one");
    repo.deploy(server, app);
    repo.write("app.py", &hello_app("two"));
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n\
         release: if [ -e $SLIPWAY_DATA_DIR/release.pid ]; then exit 0; fi; echo $$ > $SLIPWAY_DATA_DIR/release.pid.tmp; mv $SLIPWAY_DATA_DIR/release.pid.tmp $SLIPWAY_DATA_DIR/release.pid; exec sleep 1000\n",
    );
    repo.commit("a release phase that hangs the first time");
    let pidfile = server.data().join(format!("apps/{app}/data/release.pid"));
    (repo, pidfile)
}

fn wait_pid(pidfile: &std::path::Path) -> i32 {
    wait_until("the release phase to start", Duration::from_secs(60), || pidfile.exists());
    std::fs::read_to_string(pidfile).expect("pid").trim().parse().expect("pid number")
}

#[test]
fn sigterm_during_a_deploy_cancels_it_and_leaves_nothing_running() {
    let mut server = TestServer::start();
    let (repo, pidfile) = app_with_hanging_release_phase(&server, "midway");
    let url = server.git_url("midway");
    let pusher = std::thread::spawn(move || repo.push(&url, "main"));
    let pid = wait_pid(&pidfile);
    assert!(alive(pid));

    assert!(server.stop(), "the daemon must stop within its shutdown grace");
    let (pushed, out) = pusher.join().expect("pusher");
    assert!(!pushed, "the interrupted deploy must not succeed: {out}");
    assert!(out.contains("deploy cancelled, nothing went live"), "{out}");
    assert!(!alive(pid), "the release phase must not outlive the daemon");
    assert!(server.server_log().contains("shutting down"), "{}", server.server_log());

    server.restart();
    let live = server.ok(&["releases", "midway"]);
    wait_until("v1 to serve", Duration::from_secs(30), || server.get("midway", "/").1.contains("one"));
    assert!(!server.get("midway", "/").1.contains("two"), "nothing of the cancelled deploy went live: {live}");
}

#[test]
fn a_worker_ignoring_sigterm_with_a_ten_minute_stop_timeout_cannot_hold_shutdown() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("stubborn");
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n\
         worker: trap '' TERM INT; while true; do sleep 1; done\n",
    );
    repo.write("slipway.toml", "[processes.worker]\nstop_timeout = \"10m\"\n");
    repo.commit("a worker that ignores its stop signal");
    repo.deploy(&server, "stubborn");
    let pids = server.pids("stubborn");
    assert!(server.stop(), "shutdown is capped whatever an app's stop_timeout");
    for pid in pids {
        assert!(!alive(pid), "{pid} outlived the daemon");
    }
}

#[test]
fn after_kill_9_a_restarted_daemon_stops_the_old_release_phase() {
    if !is_root() {
        eprintln!("skipping: release phases are found by their app user, which exists only when the daemon runs as root");
        return;
    }
    let mut server = TestServer::start();
    let (repo, pidfile) = app_with_hanging_release_phase(&server, "crashy");
    let url = server.git_url("crashy");
    let pusher = std::thread::spawn(move || {
        let r = repo.push(&url, "main");
        (repo, r)
    });
    let pid = wait_pid(&pidfile);
    server.kill9();
    let (repo, (pushed, _)) = pusher.join().expect("pusher");
    assert!(!pushed);
    assert!(alive(pid), "the release phase outlives a kill -9 of the daemon (as after a crash)");

    server.restart();
    assert!(!alive(pid), "a restarted daemon stops the old daemon's release phase before serving");
    // The retried push runs its release phase alone (the marker makes the
    // second one quick) and goes live.
    repo.deploy(&server, "crashy");
    wait_until("v2 to serve", Duration::from_secs(30), || server.get("crashy", "/").1.contains("two"));
}

#[test]
fn removing_a_key_ends_its_open_sessions_and_revoking_a_token_ends_its_streams() {
    let server = TestServer::start();
    AppRepo::hello("watched").deploy(&server, "watched");

    // An SSH session following logs, then its key is removed.
    let key = SshKey::new();
    server.ok(&["keys", "add", "laptop", "--key", &key.public()]);
    let mut args: Vec<String> = key.ssh_command().split_whitespace().skip(1).map(str::to_string).collect();
    args.extend(["-p".into(), server.ssh_port().into(), "git@127.0.0.1".into(), "logs".into(), "watched".into(), "-f".into()]);
    let mut session = std::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut first = [0u8; 1];
    session.stdout.as_mut().expect("stdout").read_exact(&mut first).expect("the session streams logs");
    server.ok(&["keys", "remove", "laptop"]);
    let ended = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        matches!(session.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = session.kill();
    }
    let _ = session.wait();
    assert!(ended, "the SSH session outlived the removal of its key");
    let out = key.run(&server, &["apps", "list"]);
    assert!(!out.status.success(), "a removed key opens no new session");

    // A token following logs and a token running a one-off: revoked.
    let token = server.ok(&["tokens", "create", "watcher", "--app", "watched"]).trim().lines().last().unwrap_or_default().trim().to_string();
    let open = |method: &str, path: &str, body: &str| {
        let mut s = TcpStream::connect(&server.api).expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("request");
        let mut first = [0u8; 1];
        s.read_exact(&mut first).expect("the stream answers");
        s
    };
    let mut follow = open("GET", "/api/apps/watched/logs?follow=true", "");
    let mut one_off = open("POST", "/api/apps/watched/run", r#"{"command":"sleep 1000"}"#);
    server.ok(&["tokens", "revoke", "watcher"]);
    for (what, s) in [("logs -f", &mut follow), ("run", &mut one_off)] {
        // The response ends: the last chunk of a chunked body, or EOF.
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.ends_with(b"\r\n0\r\n\r\n") || seen.starts_with(b"0\r\n\r\n") {
                        break true;
                    }
                }
                Err(_) => break false,
            }
        };
        assert!(ended, "{what}: the stream must end when its token is revoked: {}", String::from_utf8_lossy(&seen));
    }
}

/// This server's cgroup directory name (`slipway-` and the hash of its
/// canonical data dir, as the daemon and its container labels name it).
fn cgroup_base(server: &TestServer) -> String {
    use sha2::Digest;
    let data = server.data().canonicalize().expect("data dir");
    format!("slipway-{}", hex::encode(&sha2::Sha256::digest(data.as_os_str().as_encoded_bytes())[..8]))
}

/// Where this server's cgroups are on the host: the root of v2, or below
/// the daemon's own cgroup in each v1 tree.
fn cgroup_dirs(daemon: u32, base: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(base)];
    }
    let own = std::fs::read_to_string(format!("/proc/{daemon}/cgroup")).expect("daemon cgroup");
    ["memory", "cpu", "pids"]
        .iter()
        .filter_map(|c| {
            let path = own.lines().find_map(|l| {
                let f: Vec<&str> = l.splitn(3, ':').collect();
                (f.len() == 3 && f[1].split(',').any(|x| x == *c)).then(|| f[2].trim_start_matches('/').to_string())
            })?;
            Some(root.join(c).join(path).join(base))
        })
        .collect()
}

/// User and system CPU time of `pid`, in clock ticks (fields 14 and 15).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    rest.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + rest.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn memory_and_cpu_limits_of_a_process_type_hold_in_its_cgroup() {
    if !is_root() {
        eprintln!("skipping: cgroups are written only by a daemon running as root");
        return;
    }
    let server = TestServer::start();
    if server.server_log().contains("cgroups are not usable") {
        eprintln!("skipping: this host offers no usable cgroups (the daemon said so): {}", tail(&server.server_log(), 5));
        return;
    }
    AppRepo::hello("calm").deploy(&server, "calm");
    let repo = AppRepo::hello("hogs");
    // The hog waits for the test's go (a file in its data dir), then asks
    // for 512 MiB, touching every page; the spinner never sleeps.
    repo.write(
        "hog.py",
        "import os, time\n\
         go = os.path.join(os.environ['SLIPWAY_DATA_DIR'], 'go')\n\
         while not os.path.exists(go):\n\
         \x20   time.sleep(0.05)\n\
         held = []\n\
         for i in range(512):\n\
         \x20   held.append(b'x' * (1 << 20))\n\
         print('hog survived with', len(held), 'MiB', flush=True)\n\
         time.sleep(1000)\n",
    );
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nhog: exec python hog.py\nspin: exec python -c 'while True: pass'\n",
    );
    repo.write("slipway.toml", "[processes.hog]\nmemory = \"64M\"\nrestart = \"never\"\n\n[processes.spin]\ncpus = 0.2\n");
    repo.commit("a memory hog and a spinner");
    repo.deploy(&server, "hogs");
    let rows = server.json(&["ps", "hogs", "--json"]);
    let pid_of = |ty: &str| {
        rows.as_array().expect("ps rows").iter().find(|r| r["type"] == ty).and_then(|r| r["pid"].as_i64()).map(|p| p as i32).unwrap_or_else(|| panic!("no {ty} process: {rows}"))
    };
    let (hog, spin) = (pid_of("hog"), pid_of("spin"));

    // Each process is in its own instance's cgroup, in every controller.
    let base = cgroup_base(&server);
    for (pid, ty) in [(hog, "hog"), (spin, "spin"), (pid_of("web"), "web")] {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let want = format!("/{base}/hogs/{ty}.1.v1");
        let joined: Vec<&str> = cgroups.lines().filter(|l| l.ends_with(&want)).collect();
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let expected = if v2 { &["0::"][..] } else { &["memory", "cpu", "pids"][..] };
        for c in expected {
            assert!(joined.iter().any(|l| l.contains(c)), "{ty} (pid {pid}) must be in {want} for {c}:\n{cgroups}");
        }
    }

    // The spinner gets about a fifth of a CPU: well under half.
    let (t0, start) = (cpu_ticks(spin), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks(spin) - t0) as f64 / 100.0 / start.elapsed().as_secs_f64();
    eprintln!("spinner with cpus = 0.2 used {:.0}% of a CPU", used * 100.0);
    assert!(used > 0.0, "the spinner must have run");
    assert!(used < 0.5, "cpus = 0.2 must hold the spinner well under half a CPU, not {:.0}%", used * 100.0);

    // The hog is stopped at 64 MiB; the daemon and the other app are not.
    std::fs::write(server.data().join("apps/hogs/data/go"), "").expect("go");
    let (peak, failed, total) = during(&server, || wait_until("the hog to be killed", Duration::from_secs(30), || !alive(hog)));
    let logs = server.ok(&["logs", "hogs", "-n", "200"]);
    assert!(!logs.contains("hog survived"), "64M must stop the hog long before 512 MiB:\n{}", tail(&logs, 20));
    assert!(logs.contains("signal 9"), "the hog is killed (OOM, signal 9):\n{}", tail(&logs, 20));
    assert_eq!(failed, 0, "the calm app kept serving ({failed} of {total} requests failed)");
    assert!(peak < 200, "the daemon is unaffected (peak RSS {peak} MiB)");
    assert!(alive(server.pid() as i32));
    assert!(server.get("hogs", "/").0 == 200, "the hog's own web type, in a cgroup of its own, still serves");

    // Destroying the app removes its cgroups; stopping the server, the rest.
    server.ok(&["apps", "destroy", "hogs", "--confirm", "hogs"]);
    let dirs = cgroup_dirs(server.pid(), &base);
    assert_eq!(dirs.iter().filter(|d| d.exists()).count(), dirs.len(), "the server's cgroups exist while it runs: {dirs:?}");
    for d in &dirs {
        assert!(!d.join("hogs").exists(), "{} must go with the app", d.join("hogs").display());
        assert!(d.join("calm/web.1.v1").exists(), "{} stays while calm runs", d.join("calm/web.1.v1").display());
    }
    let mut server = server;
    assert!(server.stop(), "the daemon stops on SIGTERM");
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "a stopped server leaves no cgroup behind: {left:?}");
}
