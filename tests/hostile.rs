//! Hostile input (issue 4): every bad name, key, ref, count, body, path or
//! symlink gets a one-line error and changes nothing — no file appears or
//! vanishes under the data dir or outside it, the live release keeps
//! serving, the daemon keeps running.

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use util::*;

/// Files and directories under the data dir, minus what legitimately moves
/// on its own (the database, logs, pid files, caches).
fn state(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_path_buf();
            let s = rel.to_string_lossy();
            // The app's own data dir is the app's to write.
            let app_data = s.starts_with("apps/") && s.split('/').nth(2) == Some("data");
            if s.starts_with("slipway.db") || s.contains("/logs") || s.starts_with("run") || s.starts_with("cache") || s.starts_with("tools") || app_data {
                continue;
            }
            // Git's own bookkeeping inside a repo changes on reads.
            if s.contains(".git/") && !s.contains(".git/refs") {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
            out.insert(rel);
        }
    }
    out
}

struct Hostile {
    server: TestServer,
    tried: usize,
    refused: usize,
    failures: Vec<String>,
}

impl Hostile {
    fn new() -> Hostile {
        let server = TestServer::start();
        AppRepo::hello("victim").deploy(&server, "victim");
        AppRepo::hello("bystander").deploy(&server, "bystander");
        // Let the deploys' tagging (after each push ends) settle first.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Hostile { server, tried: 0, refused: 0, failures: Vec::new() }
    }

    /// Run `attempt`; it must report failure with one line mentioning
    /// `expect`, and leave everything as it was.
    fn refuse(&mut self, what: &str, expect: &str, attempt: impl FnOnce(&TestServer) -> (bool, String)) {
        self.tried += 1;
        let before = state(&self.server.data());
        let outside = state(self.server.dir.path());
        let (succeeded, output) = attempt(&self.server);
        let after = state(&self.server.data());
        let mut problems = Vec::new();
        if succeeded {
            problems.push("it succeeded".to_string());
        }
        if !output.contains(expect) {
            problems.push(format!("no {expect:?} in {output:?}"));
        }
        if before != after {
            let added: Vec<_> = after.difference(&before).collect();
            let removed: Vec<_> = before.difference(&after).collect();
            problems.push(format!("data dir changed: +{added:?} -{removed:?}"));
        }
        let outside_after = state(self.server.dir.path());
        let escaped: Vec<_> = outside_after.difference(&outside).filter(|p| !p.starts_with("data")).collect();
        if !escaped.is_empty() {
            problems.push(format!("files appeared outside the data dir: {escaped:?}"));
        }
        if self.server.get("victim", "/").1 != "victim world\n" || self.server.get("bystander", "/").1 != "bystander world\n" {
            problems.push("an app stopped serving".into());
        }
        if problems.is_empty() {
            self.refused += 1;
        } else {
            self.failures.push(format!("{what}: {}", problems.join("; ")));
        }
    }

    fn cli(&mut self, what: &str, expect: &str, args: &[&str]) {
        self.refuse(what, expect, |s| {
            let o = s.cli(args);
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            let one_line = err.trim().lines().count() <= 1;
            (o.status.success() || !one_line, err)
        });
    }

    fn http(&mut self, what: &str, expect: &str, method: &str, path: &str, body: &str) {
        self.refuse(what, expect, |s| {
            let auth = format!("Bearer {}", s.token);
            let (code, body) = http_request(&s.api, method, "localhost", path, &[("Authorization", &auth), ("Content-Type", "application/json")], body);
            ((200..300).contains(&code), format!("{code} {body}"))
        });
    }

    fn push(&mut self, what: &str, expect: &str, files: &[(&str, &str)], symlinks: &[(&str, &str)]) {
        self.refuse(what, expect, |s| {
            let repo = AppRepo::hello("victim");
            for (p, c) in files {
                repo.write(p, c);
            }
            for (link, target) in symlinks {
                let _ = std::fs::remove_file(repo.path().join(link));
                std::os::unix::fs::symlink(target, repo.path().join(link)).expect("symlink");
            }
            repo.commit("hostile");
            let (ok, out) = repo.push(&s.git_url("victim"), "+main");
            (ok, out)
        });
    }
}

#[test]
fn hostile_inputs_are_refused_and_change_nothing() {
    let mut h = Hostile::new();
    let long = "a".repeat(64);
    for name in ["", "A", "1app", "-app", "app_x", "../etc", "a/b", "a%2fb", "app.git", long.as_str(), "a b", "a;touch x", "..", ".", "äpp", "app\u{0}x"] {
        if name.contains('\0') {
            continue; // argv cannot carry NUL; the API case below covers it
        }
        h.cli(&format!("app name {name:?}"), "invalid app name", &["apps", "create", "--", name]);
    }
    h.http("app name with NUL via the API", "invalid app name", "POST", "/api/apps", r#"{"name":"a\u0000b"}"#);
    for path in [
        "/api/apps/..%2fslipway.db",
        "/api/apps/%2e%2e",
        "/api/apps/..%2F..%2Fetc",
        "/api/apps/victim%2f..%2f..%2fslipway.db/config",
    ] {
        h.http(&format!("API path {path}"), "invalid app name", "GET", path, "");
    }
    for path in ["/git/..%2f..%2fetc.git/info/refs?service=git-upload-pack", "/git/%2e%2e.git/info/refs?service=git-receive-pack", "/git/victim.git/objects/info/packs", "/git/victim.git/config"] {
        h.refuse(&format!("git path {path}"), "slipway:", |s| {
            let auth = format!("Basic {}", base64_encode(&format!("git:{}", s.token)));
            let (code, body) = http_request(&s.api, "GET", "localhost", path, &[("Authorization", &auth)], "");
            ((200..300).contains(&code), format!("{code} {body}"))
        });
    }
    for pair in ["1A=x", "A-B=x", "A B=x", "=x", "PATH\n=x", "ключ=x"] {
        h.cli(&format!("config key {pair:?}"), "invalid config key", &["config", "set", "victim", pair]);
    }
    h.cli("config without =", "expected KEY=VALUE", &["config", "set", "victim", "NOEQUALS"]);
    let big = format!("BIG={}", "x".repeat(40 * 1024));
    h.cli("oversized config value", "at most 32 KiB", &["config", "set", "victim", &big]);
    h.cli("unset a hostile key", "invalid config key", &["config", "unset", "victim", "../x"]);
    for host in ["-a.com", "a..com", "a_b.com", "*.com", "a.com/x", &format!("{}.com", "a".repeat(64)), "a b.com"] {
        h.cli(&format!("domain {host:?}"), "invalid host name", &["domains", "add", "--", "victim", host]);
    }
    h.cli("another app's default host", "reserved for app bystander", &["domains", "add", "victim", "bystander.localhost"]);
    for (arg, expect) in [("web=-1", "invalid count"), ("web=abc", "invalid count"), ("web=1000", "above the limit"), ("nosuch=1", "no process type"), ("web", "expected TYPE=N")] {
        h.cli(&format!("scale {arg}"), expect, &["scale", "victim", arg]);
    }
    for v in ["vX", "v-1", "v99"] {
        h.cli(&format!("rollback {v}"), if v == "v99" { "no release v99" } else { "invalid release" }, &["rollback", "victim", v]);
    }
    h.cli("token name", "invalid name", &["tokens", "create", "Bad Name"]);
    h.cli("token name traversal", "invalid name", &["tokens", "create", "../x"]);
    h.cli("garbage ssh key", "not an OpenSSH public key", &["keys", "add", "k", "--key", "ssh-ed25519 garbage"]);
    h.cli("two keys in one", "one public key line", &["keys", "add", "k", "--key", "ssh-ed25519 AAAA\nssh-rsa BBBB"]);
    h.cli("ftp webhook", "must start with http://", &["webhook", "set", "victim", "ftp://x/"]);
    h.cli("deploy a hostile ref", "invalid ref name", &["deploy", "victim", "--ref", "refs/heads/a..b"]);
    h.cli("deploy an unknown ref", "has no ref", &["deploy", "victim", "--ref", "nosuch"]);
    h.cli("destroy without confirm", "--confirm victim", &["apps", "destroy", "victim"]);
    h.cli("destroy with the wrong confirm", "--confirm victim", &["apps", "destroy", "victim", "--confirm", "bystander"]);

    for (what, body) in [
        ("malformed JSON", "{not json"),
        ("unknown field", r#"{"name":"x","admin":true}"#),
        ("wrong type", r#"{"name":42}"#),
        ("array body", "[1,2,3]"),
    ] {
        h.http(what, "invalid request body", "POST", "/api/apps", body);
    }
    h.http("scale with a negative count", "invalid request body", "POST", "/api/apps/victim/scale", r#"{"web":-1}"#);
    h.http("config with a non-string value", "invalid request body", "POST", "/api/apps/victim/config", r#"{"set":{"A":1}}"#);
    let huge = format!(r#"{{"name":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    h.http("2 MiB body", "", "POST", "/api/apps", &huge);

    // Pushed repos that try to reach outside their release.
    h.push("Procfile symlinked outside", "Procfile is a symlink", &[], &[("Procfile", "/etc/passwd")]);
    h.push("slipway.toml symlinked outside", "slipway.toml is a symlink", &[], &[("slipway.toml", "/etc/hostname")]);
    h.push("requirements.txt symlinked outside", "requirements.txt must be a regular file", &[], &[("requirements.txt", "/etc/hostname")]);
    h.push(".python-version symlinked outside", ".python-version must be a small regular file", &[], &[(".python-version", "/etc/hostname")]);
    h.push(
        "touch reload through a symlink",
        "reload.ini must be a regular file, not a symlink",
        &[("slipway.toml", "[processes.web]\nreload = \"touch:reload.ini\"\n")],
        &[("reload.ini", "/etc/hostname")],
    );
    h.push("touch reload path escaping the release", "is not \"replace\"", &[("slipway.toml", "[processes.web]\nreload = \"touch:../../x\"\n")], &[]);
    h.push("Procfile over 64 KiB", "larger than", &[("Procfile", &"web: x\n".repeat(20_000))], &[]);
    h.push("weird process type", "must be lowercase", &[("Procfile", "WEB$(id): gunicorn\n")], &[]);
    h.push("health path that is a URL", "must start with /", &[("slipway.toml", "[healthcheck]\npath = \"http://evil/\"\n")], &[]);
    h.push("unknown toml section", "unknown section [exec]", &[("slipway.toml", "[exec]\ncommand = \"rm -rf /\"\n")], &[]);
    h.push("interpreter pin injection", "unsupported python version pin", &[(".python-version", "3.11; rm -rf /\n")], &[]);
    h.refuse("push to a ref outside heads and tags", "invalid ref name", |s| {
        let repo = AppRepo::hello("victim");
        repo.push(&s.git_url("victim"), "HEAD:refs/notes/evil")
    });

    let summary = format!("hostile inputs: {} tried, {} refused with nothing changed", h.tried, h.refused);
    eprintln!("{summary}");
    assert!(h.failures.is_empty(), "{summary}\n{}", h.failures.join("\n"));
    assert!(!h.server.server_log().contains("panicked"), "the daemon panicked:\n{}", h.server.server_log());
}

fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16 | (*chunk.get(1).unwrap_or(&0) as u32) << 8 | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
