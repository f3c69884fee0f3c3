//! The pipeline's phases on real projects (issue 9): promotion runs the
//! target's release phase, the build phase (Django's collectstatic) makes
//! assets that belong to their release, `[storage]` keeps uploads and an
//! SQLite database across releases and rollbacks, and redirects are not
//! health.

mod util;

use std::time::Duration;

use util::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An app whose page reads a table its migration creates, in a database
/// in its own data dir: without that migration on this app's database,
/// every page is a 500.
fn migrating_repo(text: &str) -> AppRepo {
    AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nrelease: python migrate.py\n"),
        (
            "app.py",
            &format!(
                "import os, sqlite3\n\
                 def app(environ, start_response):\n\
                 \x20   try:\n\
                 \x20       db = sqlite3.connect(os.path.join(os.environ['SLIPWAY_DATA_DIR'], 'app.db'))\n\
                 \x20       n = db.execute('SELECT count(*) FROM items').fetchone()[0]\n\
                 \x20       status, body = '200 OK', '{text}: %d items\\n' % n\n\
                 \x20   except Exception as e:\n\
                 \x20       status, body = '500 Internal Server Error', 'error: %s\\n' % e\n\
                 \x20   start_response(status, [('Content-Type', 'text/plain')])\n\
                 \x20   return [body.encode()]\n"
            ),
        ),
        ("slipway.toml", "[promote]\ncheck = \"python check.py\"\n"),
        (
            "check.py",
            // What a functional test does: fetch the staging app as a
            // visitor would, by its host name, and look at the page.
            "import os, urllib.request\n\
             req = urllib.request.Request(os.environ['TARGET_URL'], headers={'Host': os.environ['TARGET_HOST']})\n\
             print('check saw:', urllib.request.urlopen(req, timeout=10).read().decode().strip())\n",
        ),
        (
            "migrate.py",
            "import os, sqlite3, sys\n\
             if os.environ.get('BREAK_MIGRATION') == '1':\n\
             \x20   sys.exit('migration refused on ' + os.environ['SLIPWAY_APP'])\n\
             db = sqlite3.connect(os.path.join(os.environ['SLIPWAY_DATA_DIR'], 'app.db'))\n\
             db.execute('CREATE TABLE IF NOT EXISTS items (name TEXT)')\n\
             db.commit()\n\
             print('migrated', os.environ['SLIPWAY_APP'])\n",
        ),
    ])
}

fn has_table(server: &TestServer, app: &str) -> bool {
    let db = server.data().join("apps").join(app).join("data/app.db");
    if !db.is_file() {
        return false;
    }
    // Read-only: the check must not create or take over the app's file.
    let out = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True).execute(\"SELECT count(*) FROM sqlite_master WHERE name='items'\").fetchone()[0])"])
        .arg(&db)
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

#[test]
fn promotion_runs_the_live_apps_release_phase_before_its_switch() {
    let server = TestServer::start();
    AppRepo::hello("old live").deploy(&server, "shop");
    assert!(!has_table(&server, "shop"), "live has no such table before the promotion");
    migrating_repo("migrated").deploy(&server, "shop-staging");
    assert_eq!(server.get("shop-staging", "/"), (200, "migrated: 0 items\n".into()));

    let out = server.ok(&["promote", "shop-staging", "--to", "shop"]);
    // The check reached the staging app through the proxy, by its name.
    assert!(out.contains(&format!("promote check against http://{}/", server.http)), "{out}");
    assert!(out.contains("check saw: migrated: 0 items"), "{out}");
    assert!(out.contains("release phase: python migrate.py"), "{out}");
    assert!(out.contains("migrated shop\n") || out.contains("migrated shop"), "run as the live app, with its config:\n{out}");
    assert!(has_table(&server, "shop"), "the live app's own database was migrated");
    assert_eq!(server.get("shop", "/"), (200, "migrated: 0 items\n".into()));
    let releases = server.json(&["releases", "shop", "--json"]);
    assert_eq!(releases[0]["status"], "live", "{releases}");
}

#[test]
fn failing_release_phase_on_promotion_leaves_live_untouched() {
    let server = TestServer::start();
    AppRepo::hello("old live").deploy(&server, "store");
    migrating_repo("migrated").deploy(&server, "store-staging");
    // Staging's migration passed; live's refuses (its own config).
    server.ok(&["config", "set", "store", "BREAK_MIGRATION=1"]);
    let before = server.json(&["releases", "store", "--json"]);

    let out = server.cli(&["promote", "store-staging", "--to", "store"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("migration refused on store"), "the live app's release phase ran and said why:\n{text}");
    assert!(text.contains("release phase failed"), "{text}");
    assert!(!text.contains("is live"), "{text}");
    assert_eq!(server.get("store", "/"), (200, "old live world\n".into()));
    // history track: the failed promotion stays on record as `failed`.
    let after = server.json(&["releases", "store", "--json"]);
    assert_eq!(after[0]["status"], "failed", "{after}");
    assert_eq!(after.as_array().map(|a| a[1..].to_vec()), before.as_array().cloned(), "live unchanged");
    assert!(!has_table(&server, "store"));
}

/// The `href` of the page's stylesheet.
fn stylesheet(page: &str) -> String {
    let start = page.find("href=\"").expect("a stylesheet link") + 6;
    page[start..].split('"').next().expect("closing quote").to_string()
}

fn post(server: &TestServer, app: &str, path: &str, body: &str) -> (u16, String) {
    http_request(&server.http, "POST", &format!("{app}.localhost"), path, &[], body)
}

#[test]
fn django_build_phase_assets_and_storage_survive_releases_and_rollback() {
    let server = TestServer::start();
    let repo = AppRepo::example("django-assets");
    let out = repo.deploy(&server, "assets");
    assert!(out.contains("build phase: python manage.py collectstatic --noinput"), "{out}");
    assert!(out.contains("static file copied"), "collectstatic ran:\n{out}");

    // v1: the page and its hashed CSS, served with 200.
    let (status, page) = server.get("assets", "/");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("shop is up"), "{page}");
    let css_v1 = stylesheet(&page);
    assert!(css_v1.starts_with("/static/shop/site.") && css_v1.ends_with(".css") && css_v1 != "/static/shop/site.css", "hashed name: {css_v1}");
    assert_eq!(server.get("assets", &css_v1), (200, "body { color: red; }\n".into()));

    // An upload and a database row, kept in [storage].
    assert_eq!(post(&server, "assets", "/upload/photo.txt", "a picture"), (200, "stored photo.txt\n".into()));
    assert_eq!(server.get("assets", "/hits"), (200, "hits: 1\n".into()));
    let storage = server.data().join("apps/assets/data/storage");
    assert_eq!(std::fs::read_to_string(storage.join("media/photo.txt")).expect("upload in storage"), "a picture");
    let files = ls(&storage);
    assert!(files.contains(&"db.sqlite3".to_string()), "database in storage: {files:?}");
    // The -wal sidecar exists only while a connection is open (SQLite removes
    // it when the last one closes), so check the mode the file is in: header
    // bytes 18 and 19 are 2 for WAL. Its sidecars are then made beside it,
    // in storage, because that is where the symlink leads.
    let header = std::fs::read(storage.join("db.sqlite3")).expect("database file");
    assert_eq!(header.get(18..20), Some(&[2u8, 2][..]), "database in WAL mode");

    // The release tree is sealed: the app cannot write its own code or assets.
    let run = server.cli(&["run", "assets", "--", "python", "-c", "open('staticfiles/x', 'w')"]);
    assert!(!run.status.success(), "the release tree must be read-only for the app");

    // v2: new CSS, new hash; v3: code only. The upload and the rows stay.
    repo.write("shop/static/shop/site.css", "body { color: blue; }\n");
    repo.commit("blue");
    repo.deploy(&server, "assets");
    let page = server.wait_body("assets", "release v2", Duration::from_secs(10));
    let css_v2 = stylesheet(&page);
    assert_ne!(css_v1, css_v2);
    assert_eq!(server.get("assets", &css_v2), (200, "body { color: blue; }\n".into()));
    repo.write("shop/templates/index.html", &std::fs::read_to_string(repo.path().join("shop/templates/index.html")).expect("template").replace("shop is up", "shop v3 is up"));
    repo.commit("v3");
    repo.deploy(&server, "assets");
    server.wait_body("assets", "shop v3 is up", Duration::from_secs(10));
    assert_eq!(server.get("assets", "/media/photo.txt"), (200, "a picture".into()));
    assert_eq!(server.get("assets", "/hits"), (200, "hits: 2\n".into()));

    // A rollback to v1 brings back v1's own assets, and the same storage.
    server.ok(&["rollback", "assets", "v1"]);
    let page = server.wait_body("assets", "release v4", Duration::from_secs(10));
    assert!(page.contains("shop is up"), "{page}");
    assert_eq!(stylesheet(&page), css_v1);
    assert_eq!(server.get("assets", &css_v1), (200, "body { color: red; }\n".into()));
    assert_eq!(server.get("assets", "/media/photo.txt"), (200, "a picture".into()));
    assert_eq!(server.get("assets", "/hits"), (200, "hits: 3\n".into()));
}

#[test]
fn django_without_collectstatic_or_behind_an_https_redirect_is_refused() {
    let server = TestServer::start();
    // Opting out of collectstatic: ManifestStaticFilesStorage has no
    // manifest, every page is a 500, and the health check says so.
    server.ok(&["apps", "create", "nostatic"]);
    server.ok(&["config", "set", "nostatic", "DISABLE_COLLECTSTATIC=1"]);
    let repo = AppRepo::example("django-assets");
    // A refused health check is not worth the default 30 s wait here.
    let toml = std::fs::read_to_string(repo.path().join("slipway.toml")).expect("slipway.toml");
    repo.write("slipway.toml", &format!("{toml}\n[healthcheck]\ntimeout = \"5s\"\n"));
    repo.commit("short health timeout");
    let out = repo.deploy_rejected(&server, "nostatic");
    assert!(!out.contains("build phase"), "{out}");
    assert!(out.contains("answered 500"), "{out}");

    // SECURE_SSL_REDIRECT behind plain HTTP: every URL is a 301 to https.
    server.ok(&["apps", "create", "tls"]);
    server.ok(&["config", "set", "tls", "FORCE_HTTPS=1"]);
    let out = repo.deploy_rejected(&server, "tls");
    assert!(out.contains("301"), "what the app answered:\n{out}");
    assert!(out.contains("https://tls.localhost"), "where it pointed:\n{out}");
    assert_eq!(server.get("tls", "/").0, 503, "nothing went live");
}

#[test]
fn a_package_added_to_a_nested_requirements_file_is_installed() {
    let server = TestServer::start();
    let page = "import importlib.util\n\
                def app(environ, start_response):\n\
                \x20   body = ('six ' + ('installed' if importlib.util.find_spec('six') else 'missing') + '\\n').encode()\n\
                \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
                \x20   return [body]\n";
    let repo = AppRepo::new(&[
        ("requirements.txt", "-r requirements/production.txt\n"),
        ("requirements/production.txt", "-r base.txt\n"),
        ("requirements/base.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        ("app.py", page),
    ]);
    repo.deploy(&server, "nested");
    assert_eq!(server.get("nested", "/"), (200, "six missing\n".into()));

    repo.write("requirements/base.txt", "gunicorn==27.0.1\nsix==1.17.0\n");
    repo.commit("six, two includes deep");
    let out = repo.deploy(&server, "nested");
    assert!(!out.contains("dependencies unchanged"), "{out}");
    assert!(out.contains("+ six==1.17.0"), "{out}");
    assert_eq!(server.get("nested", "/"), (200, "six installed\n".into()));

    // A code-only push still reuses the environment.
    repo.write("README", "docs only\n");
    repo.commit("docs");
    let out = repo.deploy(&server, "nested");
    assert!(out.contains("dependencies unchanged: reusing environment"), "{out}");
}

#[test]
fn a_pusher_cannot_move_or_delete_the_deploy_tags() {
    let server = TestServer::start();
    let repo = AppRepo::hello("first");
    repo.deploy(&server, "tags");
    let first = repo.head();
    repo.write("app.py", &hello_app("second"));
    repo.commit("second");
    repo.deploy(&server, "tags");
    let remote_tags = || {
        let out = std::process::Command::new("git").args(["ls-remote", "--tags", &server.git_url("tags")]).output().expect("ls-remote");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while remote_tags().matches("DEPLOYED-").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "tags never appeared: {}", remote_tags());
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = remote_tags();
    let deployed = before.lines().find_map(|l| l.split('\t').nth(1)).filter(|r| r.contains("DEPLOYED-")).expect("a DEPLOYED tag").to_string();

    // Move LIVE back to the first commit, delete a DEPLOYED tag, forge one.
    for refspec in [format!("+{first}:refs/tags/LIVE"), format!(":{deployed}"), format!("{first}:refs/tags/DEPLOYED-2000-01-01/0000")] {
        let (ok, out) = repo.push(&server.git_url("tags"), &refspec);
        assert!(!ok, "{refspec} must be refused:\n{out}");
        assert!(out.contains("written by slipway only"), "{out}");
    }
    assert_eq!(remote_tags(), before, "the tags are as slipway left them");
    assert_eq!(server.get("tags", "/").1, "second world\n");
}

#[test]
fn a_deploy_below_the_free_space_threshold_does_not_start() {
    // Far more than any disk has: every deploy is below the threshold.
    let server = TestServer::start_with_env(&[], &[("SLIPWAY_MIN_FREE_SPACE", "1000000T")]);
    let repo = AppRepo::hello("never");
    let out = repo.deploy_rejected(&server, "full");
    assert!(out.contains("free on the server's data disk, below the"), "{out}");
    assert!(out.contains("SLIPWAY_MIN_FREE_SPACE"), "{out}");
    assert!(!out.contains("deploying main"), "nothing started:\n{out}");
    assert!(ls(&server.data().join("apps/full/releases")).is_empty(), "no release tree");
    assert_eq!(server.json(&["releases", "full", "--json"]), serde_json::json!([]), "no release record");
}

fn remote_tags(server: &TestServer, app: &str) -> Vec<String> {
    let out = std::process::Command::new("git").args(["ls-remote", "--tags", &server.git_url(app)]).output().expect("ls-remote");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split('\t').nth(1)).map(|r| r.trim_start_matches("refs/tags/").to_string()).collect()
}

fn wait_for_tag(server: &TestServer, app: &str, want: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = remote_tags(server, app);
        if want(&t) {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "{app}'s tags never settled: {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn staging_and_live_tags_fetch_into_one_clone_without_clobbering() {
    let server = TestServer::start();
    let repo = AppRepo::hello("one");
    repo.deploy(&server, "web-live");
    repo.write("app.py", &hello_app("two"));
    repo.commit("two");
    repo.deploy(&server, "web-staging");
    wait_for_tag(&server, "web-staging", |t| t.iter().any(|n| n == "LIVE"));
    server.ok(&["promote", "web-staging", "--to", "web-live"]);

    // The live app keeps LIVE; the staging app's tags now carry its name.
    let live = wait_for_tag(&server, "web-live", |t| t.iter().filter(|n| n.starts_with("DEPLOYED-")).count() == 2);
    assert!(live.contains(&"LIVE".to_string()), "{live:?}");
    let staging = wait_for_tag(&server, "web-staging", |t| t.contains(&"web-staging/LIVE".to_string()));
    assert!(!staging.iter().any(|n| n == "LIVE" || n.starts_with("DEPLOYED-")), "{staging:?}");
    assert!(staging.iter().any(|n| n.starts_with("web-staging/DEPLOYED-")), "{staging:?}");

    // One clone, both remotes, plain `git fetch --tags`: no clobbering.
    repo.git(&["remote", "add", "live", &server.git_url("web-live")]);
    repo.git(&["remote", "add", "staging", &server.git_url("web-staging")]);
    repo.git(&["fetch", "-q", "--tags", "live"]);
    repo.git(&["fetch", "-q", "--tags", "staging"]);
    // A later staging deploy tags under its name too.
    repo.write("app.py", &hello_app("three"));
    repo.commit("three");
    repo.deploy(&server, "web-staging");
    wait_for_tag(&server, "web-staging", |t| t.iter().filter(|n| n.starts_with("web-staging/DEPLOYED-")).count() == 2);
    // LIVE moves by design: a clone takes the new one with --force, as
    // the README says.
    repo.git(&["fetch", "-q", "--tags", "--force", "staging"]);
    repo.git(&["fetch", "-q", "--tags", "--force", "live"]);
    let live_tag = String::from_utf8_lossy(&repo.git(&["rev-parse", "LIVE^{commit}"]).stdout).trim().to_string();
    let staging_tag = String::from_utf8_lossy(&repo.git(&["rev-parse", "web-staging/LIVE^{commit}"]).stdout).trim().to_string();
    assert_eq!(staging_tag, repo.head());
    assert_ne!(live_tag, staging_tag, "LIVE still names what the live app serves");
}

#[test]
fn setting_config_to_what_it_is_makes_no_release() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "cfg");
    server.ok(&["config", "set", "cfg", "GREETING=there"]);
    let pids = server.pids("cfg");
    let before = server.json(&["releases", "cfg", "--json"]);
    let out = server.ok(&["config", "set", "cfg", "GREETING=there"]);
    assert!(out.contains("config unchanged: no new release"), "{out}");
    let out = server.ok(&["config", "unset", "cfg", "NEVER_SET"]);
    assert!(out.contains("config unchanged"), "{out}");
    assert_eq!(server.json(&["releases", "cfg", "--json"]), before);
    assert_eq!(server.pids("cfg"), pids, "nothing restarted");
    assert_eq!(server.get("cfg", "/").1, "hello there\n");
}

#[test]
fn concurrent_first_pushes_to_a_new_app_do_not_race() {
    let server = TestServer::start();
    let repos: Vec<AppRepo> = (0..6).map(|i| AppRepo::hello(&format!("racer{i}"))).collect();
    let url = server.git_url("racy");
    let outs: Vec<(bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = repos.iter().map(|r| s.spawn(|| r.push(&url, "main"))).collect();
        handles.into_iter().map(|h| h.join().expect("push thread")).collect()
    });
    for (_, out) in &outs {
        assert!(!out.contains("could not lock") && !out.contains(" 500"), "a push hit the creation race:\n{out}");
    }
    let winners = outs.iter().filter(|(ok, _)| *ok).count();
    assert!(winners >= 1, "{outs:?}");
    let body = server.get("racy", "/").1;
    assert!(body.starts_with("racer") && body.ends_with(" world\n"), "{body}");
}

#[test]
fn an_interpreter_app_users_cannot_run_is_not_offered() {
    if !is_root() {
        eprintln!("skipping: app users (and what they cannot enter) exist only when the daemon runs as root");
        return;
    }
    // A python3.99 under a 0700 directory (as pyenv under /root is): the
    // daemon finds it, its app users could not run it.
    let hidden = tempfile::tempdir().expect("dir");
    let bin = hidden.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let fake = bin.join("python3.99");
    std::fs::write(&fake, format!("#!/bin/sh\necho {}\necho 3.99.1\n", fake.display())).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(hidden.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let server = TestServer::start_with_env(&[], &[("PATH", &path)]);
    let repo = AppRepo::hello("pinned");
    repo.write(".python-version", "3.99\n");
    repo.commit("pin 3.99");
    let out = repo.deploy_rejected(&server, "pinned");
    assert!(out.contains("python 3.99 is not available on this server"), "{out}");
    assert!(out.contains("not usable by apps: 3.99.1"), "the hidden one is named, not offered:\n{out}");
    assert!(out.contains("app users cannot enter"), "{out}");
    assert!(out.contains("tried `uv python install 3.99`"), "what was tried:\n{out}");
    assert!(out.contains(&format!("uv python install 3.99 --no-bin --install-dir {}", server.data().join("tools/python").display())), "what the operator can do:\n{out}");
    assert!(!out.contains("/*/"), "a PATH entry cannot hold a glob:\n{out}");
}

/// git processes (http-backend, receive-pack, ...) below the server.
fn git_children(server: &TestServer) -> Vec<String> {
    let out = std::process::Command::new("ps").args(["-eo", "pid=,ppid=,comm="]).output().expect("ps");
    let rows: Vec<(u32, u32, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?, w.next()?.to_string()))
        })
        .collect();
    let mut below = vec![server.pid()];
    let mut found = Vec::new();
    while let Some(parent) = below.pop() {
        for (pid, ppid, comm) in &rows {
            if *ppid == parent {
                below.push(*pid);
                if comm.starts_with("git") {
                    found.push(format!("{pid} {comm}"));
                }
            }
        }
    }
    found
}

#[test]
fn aborted_and_stalled_pushes_leave_no_git_processes() {
    let server = TestServer::start();
    let repo = AppRepo::hello("big");
    // Incompressible, so the pack takes a while to send.
    let noise: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(repo.path().join("noise.bin"), noise).expect("write");
    repo.commit("noise");
    for _ in 0..8 {
        let mut push = std::process::Command::new("git")
            .args(["push", "-q", &server.git_url("aborted"), "main"])
            .current_dir(repo.path())
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("git push");
        std::thread::sleep(Duration::from_millis(400));
        let _ = push.kill();
        let _ = push.wait();
    }
    // A stalled push: a request body promised and never sent.
    let mut stalled = std::net::TcpStream::connect(&server.api).expect("connect");
    use std::io::Write;
    let auth = base64_token(&server.token);
    write!(stalled, "POST /git/aborted.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: 100000\r\n\r\n0000").expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let left = git_children(&server);
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "git processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stalled);
    // The app is still pushable (one of the pushes may have got through).
    repo.write("app.py", &hello_app("after"));
    repo.commit("after");
    repo.deploy(&server, "aborted");
    assert_eq!(server.get("aborted", "/").1, "after world\n");
}

fn base64_token(token: &str) -> String {
    let raw = format!("git:{token}");
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_deploy_interrupted_by_a_daemon_crash_leaves_no_pending_release_or_tree() {
    let mut server = TestServer::start();
    let repo = AppRepo::hello("first");
    repo.deploy(&server, "crashy");
    repo.write("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nrelease: echo migrating; exec sleep 300\n");
    repo.commit("a release phase that hangs");
    let url = server.git_url("crashy");
    let releases_dir = server.data().join("apps/crashy/releases");
    std::thread::scope(|s| {
        let push = s.spawn(|| repo.push(&url, "main"));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !server.json(&["releases", "crashy", "--json"]).to_string().contains("pending") {
            assert!(std::time::Instant::now() < deadline, "the deploy never started");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        server.kill9();
        let (ok, _) = push.join().expect("push thread");
        assert!(!ok, "the push died with the daemon");
    });
    // The release phase the killed daemon left behind: ours to stop.
    kill_processes_under(&releases_dir.join("v2"));
    server.restart();
    let releases = server.json(&["releases", "crashy", "--json"]);
    let text = releases.to_string();
    assert!(!text.contains("\"pending\""), "{text}");
    let v2 = releases.as_array().expect("list").iter().find(|r| r["version"] == "v2").expect("v2 kept in history").clone();
    assert_eq!(v2["status"], "failed", "{v2}");
    assert!(v2["description"].as_str().unwrap_or("").contains("interrupted"), "{v2}");
    assert!(!releases_dir.join("v2").exists(), "its tree is gone");
    assert_eq!(server.get("crashy", "/").1, "first world\n");
}

/// SIGKILL every process whose working directory is under `dir` (a
/// release phase orphaned by a killed daemon).
fn kill_processes_under(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.starts_with(dir) {
                signal(pid, 9);
            }
        }
    }
}

/// issue 9 #2: a configured `[build] command` runs in the new release tree
/// as the app's user, its output is part of the release (a rollback brings
/// its own back), a failing build rejects the push, and the tree is sealed
/// before anything serves from it.
#[test]
fn a_build_command_writes_into_its_release_and_a_failing_one_rejects_the_push() {
    let server = TestServer::start();
    let app = "import os\n\
               def app(environ, start_response):\n\
               \x20   body = open('built/version.txt', 'rb').read()\n\
               \x20   try:\n\
               \x20       open('built/after.txt', 'w').write('x')\n\
               \x20       body += b' writable'\n\
               \x20   except OSError:\n\
               \x20       body += b' sealed'\n\
               \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
               \x20   return [body]\n";
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        ("app.py", app),
        ("slipway.toml", "[build]\ncommand = \"mkdir -p built && echo one-$(id -u) > built/version.txt\"\n"),
    ]);
    let out = repo.deploy(&server, "builder");
    assert!(out.contains("build phase"), "{out}");
    let (status, body) = server.get("builder", "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("one-") && body.ends_with("\n sealed"), "built output served, tree sealed: {body}");
    if is_root() {
        assert!(!body.starts_with("one-0\n"), "the build runs as the app's user, not root: {body}");
    }

    repo.write("slipway.toml", "[build]\ncommand = \"mkdir -p built && echo two > built/version.txt\"\n");
    repo.commit("two");
    repo.deploy(&server, "builder");
    assert!(server.get("builder", "/").1.starts_with("two\n"));

    // A failing build: refused, nothing changes.
    repo.write("slipway.toml", "[build]\ncommand = \"echo cannot build >&2; exit 3\"\n");
    repo.commit("broken build");
    let (ok, out) = repo.push(&server.git_url("builder"), "main");
    assert!(!ok, "a failing build phase must reject the push: {out}");
    assert!(out.contains("cannot build"), "the build's output is shown: {out}");
    assert!(server.get("builder", "/").1.starts_with("two\n"));

    // Rollback brings back v1's own build output.
    server.ok(&["rollback", "builder", "v1"]);
    assert!(server.get("builder", "/").1.starts_with("one-"));
}
