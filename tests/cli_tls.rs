//! The CLI speaks HTTPS: a server behind a TLS terminator (nginx here)
//! with a private CA is reached with `--ca-file` or SLIPWAY_CA_FILE, and
//! refused without it; one-offs cross the terminator too (the upgrade).

mod util;

use std::process::Command;

use util::*;

#[test]
fn the_cli_reaches_a_server_over_https_with_its_ca() {
    let server = TestServer::start();
    AppRepo::hello("secure").deploy(&server, "secure");
    let nginx = Nginx::start(&server.api);
    let ca = nginx.dir.path().join("ca.pem");
    let url = format!("https://localhost:{}", nginx.port);
    let cli = |args: &[&str], env_ca: bool| {
        let mut c = Command::new(BIN);
        c.args(args).env("SLIPWAY_URL", &url).env("SLIPWAY_TOKEN", &server.token).env_remove("SLIPWAY_CA_FILE");
        if env_ca {
            c.env("SLIPWAY_CA_FILE", &ca);
        }
        c.output().expect("slipway")
    };

    // An unknown CA is refused, and the error says what to do.
    let out = cli(&["apps", "list"], false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"), "{}", String::from_utf8_lossy(&out.stderr));

    let ca_arg = ca.display().to_string();
    let out = cli(&["--ca-file", &ca_arg, "apps", "list"], false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("secure"));
    let info = cli(&["apps", "info", "secure", "--json"], true);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["git_http"], format!("{url}/git/secure.git"));

    // A one-off's upgraded connection crosses the terminator.
    let out = cli(&["run", "secure", "--", "sh", "-c", "echo over $SLIPWAY_APP; exit 6"], true);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over secure");
}
