//! Test helpers: a real `slipway server` in a temp dir on port-0
//! sockets, real git repos pushed with the real git client, and plain
//! HTTP requests through the real proxy. Every server is stopped (SIGTERM,
//! then SIGKILL) when its handle drops, and with it every app process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_slipway");

/// A shared download cache, so each test's fresh data dir does not fetch
/// gunicorn again.
pub fn uv_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uv-cache")
}

pub struct TestServer {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub api: String,
    pub http: String,
    pub ssh: String,
    pub token: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// The daemon's RLIMIT_NOFILE (soft and hard), for flood tests.
    pub nofile: Option<u64>,
    /// `host:port` of `--https`, when the server was given one.
    pub https: Option<String>,
    domain: String,
    /// upgrade track: the daemon that took over after a hand-over (not our child).
    successor: Option<i32>,
}

impl TestServer {
    /// One way to make a server; the public constructors name the cases.
    fn launch(http: &str, domain: &str, extra: &[&str], envs: &[(&str, &str)], nofile: Option<u64>) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // Like /var/lib: traversable, so that app users (the daemon runs
        // apps as their own users when it is root) reach their files.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod temp dir");
        let mut s = TestServer {
            child: None,
            dir,
            api: String::new(),
            http: String::new(),
            ssh: String::new(),
            token: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            nofile,
            https: None,
            domain: domain.to_string(),
            successor: None,
        };
        s.boot("127.0.0.1:0", http);
        s
    }

    /// A server whose descriptor limit is `nofile`, so that floods reach it.
    pub fn start_with_nofile(extra: &[&str], nofile: u64) -> TestServer {
        TestServer::launch("127.0.0.1:0", "localhost", extra, &[], Some(nofile))
    }

    pub fn start() -> TestServer {
        TestServer::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> TestServer {
        TestServer::start_with_env(extra, &[])
    }

    /// A server with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> TestServer {
        TestServer::launch("127.0.0.1:0", "localhost", extra, envs, None)
    }

    /// On a given `--http` address and `--domain` (ACME validation needs a
    /// known port and public-looking names).
    pub fn start_on(http: &str, domain: &str, extra: &[&str]) -> TestServer {
        TestServer::launch(http, domain, extra, &[], None)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn boot(&mut self, api: &str, http: &str) {
        let mut cmd = Command::new(BIN);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["server", "--data"])
            .arg(self.data())
            .args(["--api", api, "--http", http, "--ssh", "127.0.0.1:0", "--domain", &self.domain])
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("UV_CACHE_DIR", uv_cache())
            .env("SLIPWAY_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join("server.log")).expect("log file")))
            .spawn()
            .expect("start slipway server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read ready line");
        assert!(line.starts_with("slipway ready"), "server did not start: {line:?}\n{}", self.server_log());
        let field = |k: &str, scheme: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{k}={scheme}://")))
                .expect("address in ready line")
                .to_string()
        };
        self.api = field("api", "http");
        self.http = field("http", "http");
        self.ssh = field("ssh", "ssh");
        self.https = line.split_whitespace().find_map(|f| f.strip_prefix("https=https://")).map(str::to_string);
        self.token = std::fs::read_to_string(self.data().join("admin-token")).expect("admin token").trim().to_string();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        // upgrade track: after a hand-over, the daemon that took over.
        if let Some(pid) = self.successor {
            return pid as u32;
        }
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// upgrade track: SIGUSR2 (hand over to the binary on disk); returns
    /// once the old daemon has exited, with the new one's pid (from DIR/lock).
    pub fn upgrade(&mut self) -> i32 {
        let old = self.pid() as i32;
        signal(old, libc::SIGUSR2);
        match self.child.take() {
            Some(mut child) => {
                let _ = child.wait();
            }
            None => {
                let deadline = Instant::now() + Duration::from_secs(60);
                while alive(old) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let pid: i32 = std::fs::read_to_string(self.data().join("lock")).expect("DIR/lock").trim().parse().expect("pid in DIR/lock");
        assert_ne!(pid, old, "a new daemon took over\n{}", self.server_log());
        assert!(alive(pid), "the new daemon runs\n{}", self.server_log());
        self.successor = Some(pid);
        pid
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGTERM and wait; returns whether it exited within the time.
    pub fn stop(&mut self) -> bool {
        // upgrade track: a successor is not our child: signal and watch it.
        if let Some(pid) = self.successor.take() {
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive(pid) {
                signal(pid, libc::SIGKILL);
                return false;
            }
            return true;
        }
        let Some(mut child) = self.child.take() else { return true };
        signal(child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// kill -9 the daemon (its apps survive it, as after a crash).
    pub fn kill9(&mut self) {
        if let Some(pid) = self.successor.take() {
            signal(pid, libc::SIGKILL);
            while alive(pid) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same data dir and the same addresses.
    pub fn restart(&mut self) {
        let (api, http) = (self.api.clone(), self.http.clone());
        self.boot(&api, &http);
    }

    // integrity track: change the daemon's environment for the next
    // `restart` (a test hook such as SLIPWAY_TEST_CRASH_AT on or off).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.to_string(), v.to_string()));
        }
    }

    // integrity track: wait for a daemon that is exiting by itself (a
    // test hook aborted it) and reap it; false if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn ssh_port(&self) -> &str {
        self.ssh.rsplit(':').next().unwrap_or("")
    }

    pub fn ssh_url(&self, app: &str) -> String {
        format!("ssh://git@{}/{app}.git", self.ssh)
    }

    pub fn git_url(&self, app: &str) -> String {
        self.git_url_with(app, &self.token)
    }

    pub fn git_url_with(&self, app: &str, token: &str) -> String {
        format!("http://git:{token}@{}/git/{app}.git", self.api)
    }

    /// Run the CLI against this server over TCP with the admin token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_token(&self.token, args)
    }

    pub fn cli_with_token(&self, token: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("SLIPWAY_URL", format!("http://{}", self.api))
            .env("SLIPWAY_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .expect("run slipway cli")
    }

    /// The CLI must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "slipway {args:?} failed:\n{}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.server_log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("json output")
    }

    /// GET through the proxy with `Host: APP.localhost`.
    pub fn get(&self, app: &str, path: &str) -> (u16, String) {
        http_request(&self.http, "GET", &format!("{app}.localhost"), path, &[], "")
    }

    /// Poll until `app` serves a body containing `needle`.
    pub fn wait_body(&self, app: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, body) = self.get(app, "/");
            if code == 200 && body.contains(needle) {
                return body;
            }
            assert!(Instant::now() < deadline, "{app} never served {needle:?}; last: {code} {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pids of the app's processes, from `ps --json`.
    pub fn pids(&self, app: &str) -> Vec<i32> {
        self.json(&["ps", app, "--json"])
            .as_array()
            .expect("ps rows")
            .iter()
            .filter_map(|r| r["pid"].as_i64().map(|p| p as i32))
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); count it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// A plain HTTP/1.1 request (Connection: close); returns status and body.
pub fn http_request(addr: &str, method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else { return (0, "connect failed".into()) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    if s.write_all(req.as_bytes()).is_err() {
        return (0, "write failed".into());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A git work tree holding an app, committed and ready to push.
pub struct AppRepo {
    pub dir: tempfile::TempDir,
}

impl AppRepo {
    pub fn new(files: &[(&str, &str)]) -> AppRepo {
        let repo = AppRepo { dir: tempfile::tempdir().expect("temp dir") };
        repo.git(&["init", "-q", "-b", "main"]);
        for (path, content) in files {
            repo.write(path, content);
        }
        repo.commit("initial");
        repo
    }

    /// A copy of one of the bundled examples.
    pub fn example(name: &str) -> AppRepo {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
        let repo = AppRepo { dir: tempfile::tempdir().expect("temp dir") };
        copy_tree(&src, repo.dir.path());
        repo.git(&["init", "-q", "-b", "main"]);
        repo.commit("initial");
        repo
    }

    /// The minimal gunicorn app: `hello $GREETING`, or `{greeting}` text.
    pub fn hello(text: &str) -> AppRepo {
        AppRepo::new(&[
            ("requirements.txt", "gunicorn==27.0.1\n"),
            ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
            ("app.py", &hello_app(text)),
        ])
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, path: &str, content: &str) {
        let p = self.dir.path().join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, content).expect("write file");
    }

    pub fn remove(&self, path: &str) {
        std::fs::remove_file(self.dir.path().join(path)).expect("remove file");
    }

    pub fn commit(&self, msg: &str) {
        self.git(&["add", "-A"]);
        self.git(&["-c", "user.email=t@example.com", "-c", "user.name=tester", "commit", "-q", "--allow-empty", "-m", msg]);
    }

    pub fn head(&self) -> String {
        String::from_utf8_lossy(&self.git(&["rev-parse", "HEAD"]).stdout).trim().to_string()
    }

    pub fn git(&self, args: &[&str]) -> Output {
        let out = Command::new("git").args(args).current_dir(self.dir.path()).output().expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// `git push URL REFSPEC`; returns (success, combined output).
    pub fn push(&self, url: &str, refspec: &str) -> (bool, String) {
        self.push_with_env(url, refspec, &[])
    }

    pub fn push_with_env(&self, url: &str, refspec: &str, env: &[(&str, String)]) -> (bool, String) {
        let out = Command::new("git")
            .args(["push", url, refspec])
            .current_dir(self.dir.path())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .output()
            .expect("git push");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Push `main` to the server's app; it must deploy.
    pub fn deploy(&self, server: &TestServer, app: &str) -> String {
        let (ok, out) = self.push(&server.git_url(app), "main");
        assert!(ok, "push to {app} failed:\n{out}\nserver log:\n{}", tail(&server.server_log(), 30));
        out
    }

    /// Push `main`; it must be rejected. Returns git's output.
    pub fn deploy_rejected(&self, server: &TestServer, app: &str) -> String {
        let (ok, out) = self.push(&server.git_url(app), "main");
        assert!(!ok, "push to {app} should have been rejected:\n{out}");
        assert!(out.contains("[remote rejected]"), "no rejection line:\n{out}");
        out
    }
}

pub fn hello_app(text: &str) -> String {
    format!(
        "import os\n\
         def app(environ, start_response):\n\
         \x20   body = ('{text} ' + os.environ.get('GREETING', 'world') + '\\n').encode()\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n"
    )
}

fn copy_tree(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).expect("read example") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "__pycache__" || name.to_string_lossy().ends_with(".sqlite3") {
            continue;
        }
        let to = dst.join(&name);
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&to).expect("mkdir");
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Entries of a directory (names), empty when it does not exist.
pub fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// One HTTP/1.1 connection reused for many requests (keep-alive), as a
/// browser or a load balancer would. Reconnects only when the server
/// closed it between requests, and counts that.
pub struct KeepAlive {
    addr: String,
    conn: Option<std::io::BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(addr: &str) -> KeepAlive {
        KeepAlive { addr: addr.to_string(), conn: None }
    }

    pub fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        if self.conn.is_none() {
            match TcpStream::connect(&self.addr) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    self.conn = Some(std::io::BufReader::new(s));
                }
                Err(e) => return (0, format!("connect: {e}")),
            }
        }
        let result = self.exchange(host, path);
        if result.0 == 0 {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self, host: &str, path: &str) -> (u16, String) {
        let Some(conn) = self.conn.as_mut() else { return (0, "no connection".into()) };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if let Err(e) = conn.get_mut().write_all(req.as_bytes()) {
            return (0, format!("write: {e}"));
        }
        let mut status = String::new();
        if conn.read_line(&mut status).unwrap_or(0) == 0 {
            return (0, "connection closed before the response".into());
        }
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if conn.read_line(&mut h).unwrap_or(0) == 0 {
                return (0, "connection closed in headers".into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; len];
        if conn.read_exact(&mut body).is_err() {
            return (0, "connection closed in body".into());
        }
        if close {
            self.conn = None;
        }
        (code, String::from_utf8_lossy(&body).to_string())
    }
}

/// An SSH key pair made by the real ssh-keygen, and the options that make
/// the stock OpenSSH client use only it, without prompts or known_hosts.
pub struct SshKey {
    pub dir: tempfile::TempDir,
}

impl SshKey {
    pub fn new() -> SshKey {
        let dir = tempfile::tempdir().expect("dir");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test@slipway", "-f"])
            .arg(dir.path().join("id"))
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success());
        SshKey { dir }
    }

    pub fn public(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("id.pub")).expect("public key").trim().to_string()
    }

    /// GIT_SSH_COMMAND for this key.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes",
            self.dir.path().join("id").display()
        )
    }

    /// Run `ssh -p PORT git@127.0.0.1 COMMAND...` with this key.
    pub fn run(&self, server: &TestServer, command: &[&str]) -> Output {
        let mut args: Vec<String> = self.ssh_command().split_whitespace().skip(1).map(str::to_string).collect();
        args.extend(["-p".into(), server.ssh_port().into(), "git@127.0.0.1".into()]);
        args.extend(command.iter().map(|s| s.to_string()));
        Command::new("ssh").args(&args).stdin(Stdio::null()).output().expect("ssh")
    }
}

/// nginx terminating TLS with a certificate for `localhost` signed by a
/// private CA (`dir/ca.pem`), in front of a plain-HTTP upstream.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx terminating TLS on a free port, proxying to `upstream`.
    pub fn start(upstream: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().display().to_string();
        // A private CA and a server certificate it signed.
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        std::fs::write(dir.path().join("ext.cnf"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").expect("ext");
        for args in [
            vec!["req", "-x509", "-days", "1", "-subj", "/CN=slipway test CA", "-keyout", "ca-key.pem", "-out", "ca.pem"],
            vec!["req", "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"],
        ] {
            let (head, tail) = args.split_at(1);
            let out = Command::new("openssl").args(head).args(ec).args(tail).current_dir(dir.path()).output().expect("openssl");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("openssl")
            .args(["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "1", "-out", "cert.pem", "-extfile", "ext.cnf"])
            .current_dir(dir.path())
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let conf = format!(
            "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n\
               server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
                 location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; proxy_buffering off; proxy_request_buffering off;\n\
                   proxy_read_timeout 300s; proxy_set_header Host $http_host; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $http_connection; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-p", &d, "-e", &format!("{d}/error.log")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen: {}", std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, port, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Slow tests (Docker, large real apps) run when SLIPWAY_SLOW_TESTS=1
/// (CI sets it), and say so when skipped.
pub fn slow_tests_enabled(name: &str) -> bool {
    let on = std::env::var("SLIPWAY_SLOW_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipping {name}: set SLIPWAY_SLOW_TESTS=1 to run it");
    }
    on
}

/// The base image for container apps, imported once (cached by tag: later
/// calls return at once).
pub fn ensure_base() {
    let out = Command::new(BIN).args(["images", "import-base"]).output().expect("run import-base");
    assert!(
        out.status.success(),
        "import-base failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// Keep-alive clients (one connection each, reopened only when the server
/// closes it after a response) that keep sending requests to `apps` until
/// stopped: (requests, failures, first failure). A request on a connection
/// closed before its response counts as failed: no retry hides a drop.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Option<String>>>,
}

impl Load {
    pub fn start(server: &TestServer, apps: &[&str], clients: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for c in 0..clients {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let http = server.http.clone();
            let app = apps[c % apps.len()].to_string();
            threads.push(std::thread::spawn(move || {
                let mut first = None;
                let mut client = KeepAlive::new(&http);
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = client.get(&format!("{app}.localhost"), "/load");
                    if code == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first.get_or_insert(format!("{app}: {code} {body}"));
                    }
                }
                first
            }));
        }
        Load { stop, ok, failed, threads }
    }

    /// Requests so far: (answered 200, failed).
    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    pub fn finish(self) -> (usize, usize, Vec<String>) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        let firsts = self.threads.into_iter().filter_map(|t| t.join().ok().flatten()).collect();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), firsts)
    }
}

/// This test daemon's own name for the base image, so that a test can
/// move it (`move_test_base`) without touching anyone else's builds;
/// removed with its daemon's images.
pub fn test_base_tag(server_id: &str) -> String {
    format!("slipway-test/base:{server_id}")
}

/// A daemon whose containers and app images are removed (by label)
/// when the test ends, whatever happened: the daemon stops first, then
/// whatever is left goes.
pub struct ContainerServer {
    pub server: TestServer,
    pub apps: Vec<&'static str>,
}

impl ContainerServer {
    pub fn start(apps: &[&'static str]) -> ContainerServer {
        ContainerServer::start_with(apps, &[])
    }

    pub fn start_with(apps: &[&'static str], flags: &[&str]) -> ContainerServer {
        ContainerServer::start_with_env(apps, flags, &[])
    }

    pub fn start_with_env(apps: &[&'static str], flags: &[&str], envs: &[(&str, &str)]) -> ContainerServer {
        ContainerServer { server: TestServer::start_with_env(flags, envs), apps: apps.to_vec() }
    }
}

impl std::ops::Deref for ContainerServer {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl std::ops::DerefMut for ContainerServer {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.server
    }
}

impl Drop for ContainerServer {
    fn drop(&mut self) {
        self.server.stop();
        let id = slipway::container::server_id(&self.server.data());
        let label = format!("{}={id}", slipway::container::LABEL_SERVER);
        let apps = self.apps.clone();
        block_on(async move {
            let Ok(engine) = slipway::container::Engine::connect().await else { return };
            remove_services(&engine, &id).await;
            let _ = engine.remove_containers(std::slice::from_ref(&label)).await;
            let _ = engine.remove_networks(std::slice::from_ref(&label)).await;
            for app in apps {
                for img in engine.images(&format!("{}={app}", slipway::container::LABEL_APP)).await.unwrap_or_default() {
                    if img.labels.get(slipway::container::LABEL_SERVER) == Some(&id) {
                        for t in img.tags {
                            let _ = engine.remove_image(&t).await;
                        }
                    }
                }
            }
            // Test base images (`test_base_tag`), after the app images built on them.
            let _ = engine.remove_image(&test_base_tag(&id)).await;
            for img in engine.images(&label).await.unwrap_or_default() {
                for t in if img.tags.is_empty() { vec![img.id] } else { img.tags } {
                    let _ = engine.remove_image(&t).await;
                }
            }
        });
    }
}


/// Remove the swarm services of the daemon `id` (swarm track), then wait
/// until their task containers are gone (removing what is left), so their
/// images can go too.
async fn remove_services(engine: &slipway::container::Engine, id: &str) {
    use slipway::container::LABEL_SERVER;
    let filters = std::collections::HashMap::from([("label".to_string(), vec![format!("{LABEL_SERVER}={id}")])]);
    let opts = bollard::query_parameters::ListServicesOptionsBuilder::default().filters(&filters).build();
    // Task containers outlive their service for a moment (and a service
    // removed by the daemon itself may still be taking them down).
    let services = engine.docker().list_services(Some(opts)).await.unwrap_or_default();
    for s in services {
        if let Some(sid) = s.id {
            let _ = engine.docker().delete_service(&sid).await;
        }
    }
    let tasks = format!("{}={id}", slipway::runtime::swarm::LABEL_SWARM_SERVER);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match engine.containers(std::slice::from_ref(&tasks)).await {
            Ok(left) if !left.is_empty() => tokio::time::sleep(Duration::from_millis(250)).await,
            _ => break,
        }
    }
    let _ = engine.remove_containers(&[tasks]).await;
}
