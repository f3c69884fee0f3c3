//! The client in a git checkout: `slipway login` keeps a server as a named
//! context, `slipway remote add APP` adds the remote with its token handed
//! to git by a credential helper (never in the URL), and commands run in
//! the checkout may leave APP out (`-a APP` names another).

mod util;

use std::path::Path;
use std::process::{Command, Output};

use util::*;

/// The CLI with a home of its own and no server in the environment.
fn slipway(home: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SLIPWAY_URL")
        .env_remove("SLIPWAY_TOKEN")
        .env_remove("SLIPWAY_CONTEXT")
        .env_remove("SLIPWAY_DATA")
        .envs(env.iter().copied())
        .output()
        .expect("slipway")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_checkout_with_a_remote_pushes_with_the_helper_and_names_its_app() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "checkout"]);
    server.ok(&["apps", "create", "other"]);
    let home = tempfile::tempdir().expect("home");
    let repo = AppRepo::hello("from the checkout");
    let url = format!("http://{}", server.api);

    // A wrong token is refused and nothing is stored.
    let out = slipway(home.path(), repo.path(), &["login", &url, "--name", "test"], &[("SLIPWAY_TOKEN", "slw_wrong")]);
    assert!(!out.status.success());
    assert!(!home.path().join(".config/slipway/config.toml").exists());
    ok(slipway(home.path(), repo.path(), &["login", &url, "--name", "test"], &[("SLIPWAY_TOKEN", &server.token)]));
    let config = home.path().join(".config/slipway/config.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config).expect("config").permissions().mode() & 0o777, 0o600);

    let said = ok(slipway(home.path(), repo.path(), &["remote", "add", "checkout"], &[]));
    let remote = String::from_utf8_lossy(&repo.git(&["remote", "get-url", "slipway"]).stdout).trim().to_string();
    assert_eq!(remote, format!("{url}/git/checkout.git"), "{said}");
    let git_config = std::fs::read_to_string(repo.path().join(".git/config")).expect("git config");
    assert!(!git_config.contains(&server.token), "the token stays out of the checkout:\n{git_config}");

    // git gets the token from the helper: the push deploys.
    let push = Command::new("git")
        .args(["push", "slipway", "main"])
        .current_dir(repo.path())
        .env("HOME", home.path())
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git push");
    assert!(push.status.success(), "{}\n{}", String::from_utf8_lossy(&push.stderr), std::fs::read_to_string(server.data().join("apps/checkout/logs/app.log")).unwrap_or_default());
    assert_eq!(server.get("checkout", "/").1, "from the checkout world\n", "{}", tail(&server.server_log(), 40));

    // In the checkout, APP may be left out; -a names another.
    let info = ok(slipway(home.path(), repo.path(), &["apps", "info", "--json"], &[]));
    assert!(info.contains("\"name\":\"checkout\""), "{info}");
    ok(slipway(home.path(), repo.path(), &["config", "set", "GREETING=there"], &[]));
    assert_eq!(server.get("checkout", "/").1, "from the checkout there\n");
    let releases = ok(slipway(home.path(), repo.path(), &["releases", "--json"], &[]));
    assert!(releases.contains("\"v2\""), "{releases}");
    let other = ok(slipway(home.path(), repo.path(), &["apps", "info", "-a", "other", "--json"], &[]));
    assert!(other.contains("\"name\":\"other\""), "{other}");
    let ran = ok(slipway(home.path(), repo.path(), &["run", "--", "sh", "-c", "echo $SLIPWAY_APP"], &[]));
    assert_eq!(ran.trim(), "checkout");

    // Outside a checkout there is nothing to infer: the parser says so.
    let elsewhere = tempfile::tempdir().expect("dir");
    let out = slipway(home.path(), elsewhere.path(), &["releases"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("<APP>"), "{}", String::from_utf8_lossy(&out.stderr));
}
