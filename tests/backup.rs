//! Backups (issue 14 #6): `slipway backup FILE` while the server serves,
//! `slipway restore FILE --data DIR` onto a fresh dir, and a server started
//! on it brings every app back as it was. Bad inputs change nothing.

mod util;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use util::*;

/// An app keeping a SQLite database (WAL) in `[storage]`: `/write` adds a row.
fn sqlite_app() -> AppRepo {
    AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        ("slipway.toml", "[storage]\n\"db.sqlite3\" = \"db.sqlite3\"\n"),
        (
            "app.py",
            "import sqlite3\n\
             def app(environ, start_response):\n\
             \x20   db = sqlite3.connect('db.sqlite3')\n\
             \x20   db.execute('PRAGMA journal_mode=WAL')\n\
             \x20   db.execute('CREATE TABLE IF NOT EXISTS hits (id INTEGER PRIMARY KEY, note TEXT)')\n\
             \x20   if environ['PATH_INFO'] == '/write':\n\
             \x20       db.execute(\"INSERT INTO hits (note) VALUES ('kept')\")\n\
             \x20       db.commit()\n\
             \x20   n = db.execute('SELECT COUNT(*) FROM hits').fetchone()[0]\n\
             \x20   db.close()\n\
             \x20   body = ('hits %d\\n' % n).encode()\n\
             \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
             \x20   return [body]\n",
        ),
    ])
}

fn restore(file: &Path, data: &Path) -> Output {
    Command::new(BIN).args(["restore"]).arg(file).arg("--data").arg(data).output().expect("run slipway restore")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Every entry of a dir tree (relative paths), to show nothing changed.
fn snapshot(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn live(server: &TestServer, app: &str) -> (u64, String) {
    let releases = server.json(&["releases", app, "--json"]);
    let live = releases.as_array().expect("releases").iter().find(|r| r["status"] == "live").expect("a live release").clone();
    let version = live["version"].as_str().and_then(|v| v.strip_prefix('v')).and_then(|v| v.parse().ok()).expect("version vN");
    (version, live["commit"].as_str().expect("commit").to_string())
}

#[test]
fn backup_while_serving_then_restore_brings_every_app_back() {
    let mut server = TestServer::start();
    let one = AppRepo::hello("one");
    one.deploy(&server, "one");
    let store = sqlite_app();
    store.deploy(&server, "store");
    let conf = AppRepo::hello("three");
    conf.deploy(&server, "conf");
    server.ok(&["config", "set", "conf", "GREETING=restored"]);
    server.ok(&["domains", "add", "conf", "conf.example.test"]);
    server.wait_body("conf", "three restored", Duration::from_secs(30));
    for _ in 0..2 {
        assert_eq!(server.get("store", "/write").0, 200);
    }
    assert_eq!(server.get("store", "/").1, "hits 2\n");
    let before: Vec<(u64, String)> = ["one", "store", "conf"].iter().map(|a| live(&server, a)).collect();
    let old_token = server.token.clone();

    // A request loop against one app for the whole backup: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looper = {
        let (stop, ok, failed, http) = (stop.clone(), ok.clone(), failed.clone(), server.http.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (code, body) = http_request(&http, "GET", "one.localhost", "/", &[], "");
                if code == 200 && body == "one world\n" {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let out_dir = tempfile::tempdir().expect("temp dir");
    let file = out_dir.path().join("slipway.backup");
    std::thread::sleep(Duration::from_millis(200));
    let printed = server.ok(&["backup", file.to_str().expect("path")]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    looper.join().expect("request loop");
    assert!(printed.contains("backup of 3 apps written to"), "{printed}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the backup ({} ok)", ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(ls(out_dir.path()), vec!["slipway.backup".to_string()], "only FILE, no temporary left");

    // Restore into a fresh dir (the server's own, emptied) and start there.
    assert!(server.stop(), "server stopped");
    std::fs::remove_dir_all(server.data()).expect("empty the data dir");
    let out = restore(&file, &server.data());
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored 3 apps"), "{}", String::from_utf8_lossy(&out.stdout));
    let storage = server.data().join("apps/store/data/storage/db.sqlite3");
    assert!(storage.is_file(), "the storage file is back");
    server.restart();
    assert_eq!(server.token, old_token, "the admin token is the backup's");

    assert_eq!(server.get("one", "/"), (200, "one world\n".to_string()));
    assert_eq!(server.get("store", "/"), (200, "hits 2\n".to_string()), "the app's database came back");
    assert_eq!(server.get("conf", "/"), (200, "three restored\n".to_string()), "config came back");
    assert_eq!(http_request(&server.http, "GET", "conf.example.test", "/", &[], ""), (200, "three restored\n".to_string()), "domain came back");
    let after: Vec<(u64, String)> = ["one", "store", "conf"].iter().map(|a| live(&server, a)).collect();
    assert_eq!(before, after, "same live release numbers and commits");
    assert_eq!(server.get("store", "/write").0, 200, "storage is writable by the app");
    assert_eq!(server.get("store", "/").1, "hits 3\n");

    // The old admin token works, and a push gets the next release number.
    let apps = server.cli_with_token(&old_token, &["apps", "list", "--json"]);
    assert!(apps.status.success(), "old admin token: {}", stderr(&apps));
    one.write("app.py", &hello_app("one again"));
    one.commit("after restore");
    one.deploy(&server, "one");
    assert_eq!(server.get("one", "/").1, "one again world\n");
    assert_eq!(live(&server, "one"), (before[0].0 + 1, one.head()));
}

#[test]
fn bad_backups_bad_dirs_and_scoped_tokens_change_nothing() {
    let server = TestServer::start();
    AppRepo::hello("solo").deploy(&server, "solo");
    let work = tempfile::tempdir().expect("temp dir");

    // A scoped token is refused with a clear message, and no FILE appears.
    let scoped = server.ok(&["tokens", "create", "ci", "--app", "solo"]).trim().to_string();
    let refused_file = work.path().join("refused.backup");
    let out = server.cli_with_token(&scoped, &["backup", refused_file.to_str().expect("path")]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "one line: {}", stderr(&out));
    assert!(stderr(&out).contains("admin token"), "{}", stderr(&out));
    assert!(!refused_file.exists(), "no file written for a refused backup");

    let file = work.path().join("good.backup");
    server.ok(&["backup", file.to_str().expect("path")]);
    let bytes = std::fs::read(&file).expect("backup");

    // A non-empty DIR: refused, nothing in it changed.
    let full = work.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    std::fs::write(full.join("precious"), "mine").expect("write");
    let out = restore(&file, &full);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "one line: {}", stderr(&out));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_eq!(snapshot(&full), vec!["precious".to_string()]);

    // Truncated, corrupt, or not a backup at all: refused, no DIR made.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("corrupt", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            for x in &mut b[mid..mid + 64] {
                *x ^= 0x5a;
            }
            b
        }),
        ("not-gzip", b"hello, this is not a backup\n".to_vec()),
    ];
    for (name, content) in cases {
        let bad = work.path().join(format!("{name}.backup"));
        std::fs::write(&bad, content).expect("write");
        let dir = work.path().join(format!("restored-{name}"));
        let before = snapshot(work.path());
        let out = restore(&bad, &dir);
        assert!(!out.status.success(), "{name} backup was accepted");
        assert_eq!(stderr(&out).lines().count(), 1, "{name}: one line: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error: "), "{name}: {}", stderr(&out));
        assert!(!dir.exists(), "{name}: no DIR made");
        assert_eq!(snapshot(work.path()), before, "{name}: nothing changed beside it");
    }

    // The good one still restores.
    let dir = work.path().join("restored");
    let out = restore(&file, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("slipway.db").is_file() && dir.join("repos/solo.git").is_dir());
    assert!(!dir.join("apps/solo/releases").exists(), "release trees are rebuilt, not restored");
}
