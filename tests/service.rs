//! Running slipway as a service (issue 14 #3, #4): settings from flags,
//! SLIPWAY_* and a config file in that order, `--check-config`, sd_notify
//! READY/WATCHDOG/STOPPING, log lines without colour codes off a terminal
//! and as JSON when asked.

mod util;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

fn check_config(config: &str, env: &[(&str, &str)], flags: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("slipway.toml");
    std::fs::write(&file, config).expect("write config");
    let out = Command::new(BIN)
        .args(["server", "--check-config", "--config"])
        .arg(&file)
        .args(flags)
        .envs(env.iter().copied())
        .env_remove("SLIPWAY_DATA")
        .output()
        .expect("run --check-config");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn settings_come_from_flags_then_env_then_the_config_file() {
    let (ok, out) = check_config(
        "api = \"127.0.0.1:7001\"\nhttp = \"127.0.0.1:7002\"\ndomain = \"file.example\"\nkeep_releases = 9\ndata = \"/srv/slipway\"\n",
        &[("SLIPWAY_DOMAIN", "env.example"), ("SLIPWAY_HTTP", "127.0.0.1:7003")],
        &["--http", "127.0.0.1:7004"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("api = \"127.0.0.1:7001\""), "the file sets what nothing else does: {out}");
    assert!(out.contains("domain = \"env.example\""), "env wins over the file: {out}");
    assert!(out.contains("http = \"127.0.0.1:7004\""), "a flag wins over env and file: {out}");
    assert!(out.contains("keep-releases = 9") && out.contains("data = \"/srv/slipway\""), "{out}");
    assert!(out.contains("config ok"), "{out}");

    let (ok, out) = check_config("htp = \"127.0.0.1:1\"\n", &[], &[]);
    assert!(!ok && out.contains("unknown setting \"htp\""), "{out}");
    let (ok, out) = check_config("domain = \"bad domain!\"\n", &[], &[]);
    assert!(!ok && out.contains("error"), "{out}");
    let (ok, out) = check_config("api = \"nowhere\"\n", &[], &[]);
    assert!(!ok && out.contains("nowhere"), "{out}");
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping_and_logs_are_json_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut child = Command::new(BIN)
        .args(["server", "--data"])
        .arg(dir.path().join("data"))
        .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ssh", "127.0.0.1:0", "--log-format", "json"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("SLIPWAY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("server.log")).expect("log")))
        .spawn()
        .expect("start server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    assert!(line.starts_with("slipway ready"), "{line}");

    let mut buf = [0u8; 256];
    let mut heard = Vec::new();
    while !(heard.iter().any(|m| m == "READY=1") && heard.iter().any(|m| m == "WATCHDOG=1")) {
        let n = sock.recv(&mut buf).expect("a notification");
        heard.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    signal(child.id() as i32, libc::SIGTERM);
    while !heard.iter().any(|m| m == "STOPPING=1") {
        let n = sock.recv(&mut buf).expect("STOPPING=1");
        heard.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(heard.iter().position(|m| m == "READY=1"), Some(0), "READY first: {heard:?}");

    let log = std::fs::read_to_string(dir.path().join("server.log")).expect("server log");
    assert!(!log.is_empty());
    for l in log.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

#[test]
fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let mut server = TestServer::start();
    assert!(server.stop());
    let log = server.server_log();
    assert!(log.contains("slipway ready") && log.contains("stopped"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file: {log:?}");
}
