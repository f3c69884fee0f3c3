//! Isolation (issue 4): when the daemon runs as root, each app's processes
//! run as an unprivileged user of their own and cannot read another app's
//! data, config, code or logs, nor the server's database or tokens.

mod util;

use util::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("uid")
}

/// `slipway run APP -- sh -c SCRIPT`: (exit code, output).
fn run_in(server: &TestServer, app: &str, script: &str) -> (i32, String) {
    let out = server.cli(&["run", app, "--", "sh", "-c", script]);
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn apps_run_as_their_own_users_and_cannot_read_each_other() {
    if !is_root() {
        eprintln!("skipping: isolation applies only when the daemon runs as root");
        return;
    }
    let server = TestServer::start();
    AppRepo::hello("alpha").deploy(&server, "alpha");
    AppRepo::hello("beta").deploy(&server, "beta");
    server.ok(&["config", "set", "beta", "BETA_SECRET=config-secret-b"]);
    let (a_pid, b_pid) = (server.pids("alpha")[0], server.pids("beta")[0]);
    let (a_uid, b_uid) = (uid_of(a_pid), uid_of(b_pid));
    assert!(a_uid >= 200_000 && b_uid >= 200_000 && a_uid != b_uid, "alpha {a_uid}, beta {b_uid}");

    let (code, out) = run_in(&server, "beta", "id -u; echo data-secret-b > $SLIPWAY_DATA_DIR/secret; cat $SLIPWAY_DATA_DIR/secret");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&b_uid.to_string()) && out.contains("data-secret-b"), "an app reads and writes its own data: {out}");

    let data = server.data();
    // Environments have names derived from the uid, interpreter and
    // dependency files: an app that works one out must still not enter it.
    let environ = std::fs::read(format!("/proc/{b_pid}/environ")).expect("environ");
    let beta_env = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"VIRTUAL_ENV="))
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("beta runs in an environment");
    let (code, out) = run_in(&server, "alpha", &format!("ls {}", beta_env.display()));
    assert_ne!(code, 0, "alpha listed beta's environment: {out}");
    let targets = [
        ("another app's dependency environment", beta_env.join("pyvenv.cfg")),
        ("another app's data", data.join("apps/beta/data/secret")),
        ("another app's code", data.join("apps/beta/releases/v1/app.py")),
        ("another app's logs", data.join("apps/beta/logs/app.log")),
        ("another app's config (process env)", format!("/proc/{b_pid}/environ").into()),
        ("the server's database", data.join("slipway.db")),
        ("the admin token", data.join("admin-token")),
        ("the SSH host key", data.join("ssh_host_ed25519_key")),
        ("the git repos", data.join("repos/beta.git/config")),
    ];
    for (what, path) in targets {
        assert!(std::path::Path::new(&path).exists(), "{what}: {} should exist for the test to mean anything", path.display());
        let (code, out) = run_in(&server, "alpha", &format!("cat {}", path.display()));
        assert_ne!(code, 0, "alpha read {what}: {out}");
        assert!(out.contains("Permission denied"), "{what}: {out}");
        assert!(!out.contains("secret-b"), "{what} leaked: {out}");
    }
    // Its own code and environment are readable, and the app serves.
    let (code, out) = run_in(&server, "alpha", "cat app.py >/dev/null && python -c 'import gunicorn' && echo ok");
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_eq!(server.get("alpha", "/").1, "alpha world\n");
}

#[test]
fn server_refuses_a_data_dir_app_users_cannot_reach() {
    if !is_root() {
        eprintln!("skipping: isolation applies only when the daemon runs as root");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = std::process::Command::new(BIN)
        .args(["server", "--data"])
        .arg(dir.path().join("data"))
        .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ssh", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("server")
        .wait_with_output()
        .expect("server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach") && err.contains("--isolation off"), "{err}");
}
