//! The Debian package (issue 14 #3): `dist/build-deb.sh` packages the
//! binary under test; apt installs it in a clean Debian (a container of
//! the base image `.ci/run` imports, which has no git and no slipway),
//! pulling its dependencies from Debian's mirror; then the service starts
//! there as its installed unit says (ExecStart, Environment, $NOTIFY_SOCKET
//! for Type=notify), says READY=1, serves, and stops on SIGTERM saying
//! STOPPING=1. There is no systemd in the container: the unit's lines are
//! read and followed by a small Python stand-in for it. Slow (apt): runs
//! when SLIPWAY_SLOW_TESTS=1.

mod util;

use std::path::Path;
use std::process::{Command, Output};

use util::*;

const IMAGE: &str = "slipway/python:bookworm";

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("run docker")
}

/// Follows the installed unit as systemd would for this test: the
/// ExecStart command with the unit's Environment= and a notify socket,
/// in the StateDirectory; prints each state it hears, then stops the
/// daemon with SIGTERM once it serves.
const SERVICE_MANAGER: &str = r#"
import os, shlex, signal, socket, subprocess, sys, urllib.error, urllib.request
unit = {}
for line in open('/lib/systemd/system/slipway.service'):
    if '=' in line and not line.startswith('#'):
        k, v = line.strip().split('=', 1)
        unit[k] = v
assert unit['Type'] == 'notify', unit
os.makedirs('/var/lib/' + unit['StateDirectory'], exist_ok=True)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind('/run/slipway-notify')
sock.settimeout(120)
env = dict(os.environ, NOTIFY_SOCKET='/run/slipway-notify')
k, v = unit['Environment'].split('=', 1)
env[k] = v
daemon = subprocess.Popen(shlex.split(unit['ExecStart']), env=env, stdout=open('/run/slipway.log', 'w'), stderr=subprocess.STDOUT)
def hear(want):
    while True:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            print('no', want, 'from the daemon; its log:', open('/run/slipway.log').read())
            sys.exit(1)
        print('heard', msg.replace('\n', ' '))
        if want in msg.split('\n'):
            return
hear('READY=1')
try:
    urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8080/', headers={'Host': 'nothing.localhost'}), timeout=10)
except urllib.error.HTTPError as e:
    print('proxy answered', e.code)
daemon.send_signal(signal.SIGTERM)
hear('STOPPING=1')
print('daemon exited', daemon.wait(60))
"#;

#[test]
fn the_deb_installs_with_apt_in_a_clean_debian_and_its_service_starts() {
    if !std::env::var("SLIPWAY_SLOW_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipping the .deb test: set SLIPWAY_SLOW_TESTS=1 to run it");
        return;
    }
    let out = Command::new(BIN).args(["images", "import-base"]).output().expect("run import-base");
    assert!(out.status.success(), "import-base: {}", text(&out));

    // The package, from the binary these tests run.
    let dir = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/build-deb.sh");
    let out = Command::new("sh")
        .arg(&script)
        .env("SLIPWAY_BIN", BIN)
        .env("SLIPWAY_DEB_OUT", dir.path())
        .env("SLIPWAY_DEB_COMPRESSION", "gzip")
        .output()
        .expect("run build-deb.sh");
    assert!(out.status.success(), "build-deb.sh: {}", text(&out));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let name = Path::new(&deb).file_name().and_then(|n| n.to_str()).expect("package file name").to_string();

    let container = Container(format!("slipway-deb-test-{}", std::process::id()));
    let mount = format!("{}:/pkg:ro", dir.path().display());
    let out = docker(&["run", "-d", "--name", &container.0, "-v", &mount, IMAGE, "sleep", "infinity"]);
    assert!(out.status.success(), "docker run: {}", text(&out));
    let exec = |script: &str| docker(&["exec", &container.0, "/bin/sh", "-c", script]);

    // A clean Debian: neither slipway nor its dependency git is there.
    assert!(!exec("command -v git || command -v slipway").status.success(), "the container is not clean");
    let out = exec(&format!(
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /pkg/{name}"
    ));
    assert!(out.status.success(), "apt install of the package: {}", text(&out));
    let out = exec("dpkg -s slipway | grep '^Status'; git --version; slipway --version; test -f /etc/slipway/slipway.toml && echo conffile");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("Status: install ok installed"), "{said}");
    assert!(said.contains("git version"), "apt pulled the dependencies: {said}");
    assert!(said.contains("conffile"), "{said}");

    // The service, started as its unit says.
    let out = docker(&["exec", &container.0, "python3", "-c", SERVICE_MANAGER]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("heard READY=1"), "{said}");
    assert!(said.contains("proxy answered 404"), "the proxy served (no such app): {said}");
    assert!(said.contains("heard STOPPING=1"), "{said}");
    assert!(said.contains("daemon exited 0"), "{said}");
}
