//! Credentials and access control (issue 4): git over SSH with registered
//! keys, tokens over HTTP and the API, and per-app scopes. Every refusal
//! must change nothing.

mod util;

use util::*;

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn registered_key_pushes_and_deploys_over_ssh_and_clones() {
    let server = TestServer::start();
    let key = SshKey::new();
    let out = server.ok(&["keys", "add", "laptop", "--key", &key.public()]);
    assert!(out.contains("SHA256:"), "{out}");
    let repo = AppRepo::hello("over ssh");
    let (ok, out) = repo.push_with_env(&server.ssh_url("viassh"), "main", &[("GIT_SSH_COMMAND", key.ssh_command())]);
    assert!(ok, "{out}\n{}", server.server_log());
    assert!(out.contains("remote: -----> v1 is live"), "progress streams over SSH too:\n{out}");
    assert_eq!(server.get("viassh", "/").1, "over ssh world\n");

    // Clone and fetch over SSH.
    let clone = tempfile::tempdir().expect("dir");
    let o = std::process::Command::new("git")
        .args(["clone", "-q", &server.ssh_url("viassh"), "."])
        .current_dir(clone.path())
        .env("GIT_SSH_COMMAND", key.ssh_command())
        .output()
        .expect("clone");
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(clone.path().join("app.py").is_file());

    // A failing deploy over SSH is rejected the same way.
    repo.write("app.py", "raise RuntimeError('nope')\n");
    repo.commit("broken");
    let (ok, out) = repo.push_with_env(&server.ssh_url("viassh"), "main", &[("GIT_SSH_COMMAND", key.ssh_command())]);
    assert!(!ok && out.contains("[remote rejected]") && out.contains("crashed on boot"), "{out}");
    assert_eq!(server.get("viassh", "/").1, "over ssh world\n");

    // The CLI over SSH, and no shell.
    let o = key.run(&server, &["apps", "list"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("viassh"), "{}", out_text(&o));
    let o = key.run(&server, &[]);
    assert!(!o.status.success());
    let o = key.run(&server, &["server", "--data", "/tmp/x"]);
    assert!(!o.status.success() && out_text(&o).contains("not available over SSH"), "{}", out_text(&o));
}

#[test]
fn unknown_removed_and_wrongly_scoped_keys_are_refused() {
    let server = TestServer::start();
    AppRepo::hello("mine").deploy(&server, "mine");
    AppRepo::hello("theirs").deploy(&server, "theirs");
    let stranger = SshKey::new();
    let o = stranger.run(&server, &["apps", "list"]);
    assert!(!o.status.success() && out_text(&o).contains("Permission denied (publickey)"), "{}", out_text(&o));

    let deployer = SshKey::new();
    server.ok(&["keys", "add", "deployer", "--app", "mine", "--key", &deployer.public()]);
    let listed = server.json(&["keys", "list", "--json"]);
    assert_eq!(listed[0]["app"], "mine");

    // Scoped: may push to its app, never to another.
    let repo = AppRepo::hello("intrusion");
    let env = [("GIT_SSH_COMMAND", deployer.ssh_command())];
    let (ok, out) = repo.push_with_env(&server.ssh_url("theirs"), "+main", &env);
    assert!(!ok && out.contains("may not access app theirs"), "{out}");
    assert_eq!(server.get("theirs", "/").1, "theirs world\n");
    let (ok, out) = repo.push_with_env(&server.ssh_url("brandnew"), "main", &env);
    assert!(!ok, "a scoped key must not create apps: {out}");
    assert!(!server.data().join("repos/brandnew.git").exists());
    let (ok, out) = repo.push_with_env(&server.ssh_url("mine"), "+main", &env);
    assert!(ok, "{out}");
    assert_eq!(server.get("mine", "/").1, "intrusion world\n");
    let o = deployer.run(&server, &["config", "show", "theirs"]);
    assert!(!o.status.success() && out_text(&o).contains("may not access app theirs"), "{}", out_text(&o));
    let o = deployer.run(&server, &["apps", "list"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("theirs"), "{}", out_text(&o));

    // Removed: refused at the handshake.
    server.ok(&["keys", "remove", "deployer"]);
    let (ok, out) = repo.push_with_env(&server.ssh_url("mine"), "main", &env);
    assert!(!ok && out.contains("Permission denied"), "{out}");
}

#[test]
fn tokens_are_scoped_hashed_and_revocable() {
    let server = TestServer::start();
    AppRepo::hello("a").deploy(&server, "app-a");
    AppRepo::hello("b").deploy(&server, "app-b");
    server.ok(&["config", "set", "app-b", "SECRET=hunter2"]);
    let t = server.ok(&["tokens", "create", "ci-a", "--app", "app-a"]).trim().to_string();
    assert!(t.starts_with("slw_"), "{t}");
    // Only the hash is stored.
    let db = std::fs::read(server.data().join("slipway.db")).expect("db");
    assert!(!String::from_utf8_lossy(&db).contains(&t));
    assert!(server.ok(&["tokens", "list"]).contains("ci-a"));

    // The scoped token reads and pushes its app only.
    assert!(server.cli_with_token(&t, &["config", "show", "app-a"]).status.success());
    let o = server.cli_with_token(&t, &["config", "show", "app-b"]);
    assert!(!o.status.success() && out_text(&o).contains("may not access app app-b"));
    assert!(!out_text(&o).contains("hunter2"));
    for admin_only in [&["tokens", "list"][..], &["keys", "list"], &["apps", "create", "x"], &["apps", "destroy", "app-a", "--confirm", "app-a"]] {
        let o = server.cli_with_token(&t, admin_only);
        assert!(!o.status.success() && out_text(&o).contains("needs an admin token"), "{admin_only:?}: {}", out_text(&o));
    }
    let repo = AppRepo::hello("pushed by ci");
    let (ok, out) = repo.push(&server.git_url_with("app-b", &t), "+main");
    assert!(!ok && out.contains("403"), "{out}");
    let (ok, out) = repo.push(&server.git_url_with("app-a", &t), "+main");
    assert!(ok, "{out}");
    assert_eq!(server.get("app-a", "/").1, "pushed by ci world\n");
    assert_eq!(server.get("app-b", "/").1, "b world\n", "app-b untouched");

    // Revoked: refused everywhere.
    server.ok(&["tokens", "revoke", "ci-a"]);
    let o = server.cli_with_token(&t, &["apps", "list"]);
    assert!(!o.status.success() && out_text(&o).contains("invalid or revoked token"));
    let (ok, out) = repo.push(&server.git_url_with("app-a", &t), "+main");
    assert!(!ok && out.contains("Authentication failed"), "{out}");
}

#[test]
fn config_values_never_appear_in_push_output_or_server_logs() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "quiet"]);
    server.ok(&["config", "set", "quiet", "API_KEY=sup3r-s3cret-value"]);
    let out = AppRepo::hello("hello").deploy(&server, "quiet");
    server.ok(&["config", "set", "quiet", "OTHER=another-s3cret"]);
    assert_eq!(server.get("quiet", "/").1, "hello world\n");
    assert!(!out.contains("sup3r-s3cret-value"));
    let log = server.server_log();
    assert!(!log.contains("sup3r-s3cret-value") && !log.contains("another-s3cret"), "{log}");
    let events = server.ok(&["events", "quiet"]);
    assert!(events.contains("set OTHER") && !events.contains("another-s3cret"), "{events}");
}
