//! The proxy against real app servers (issues 9, 10, 13): keep-alive
//! upstreams that close idle connections, forwarding headers and
//! `--trusted-proxy`, duplicate Host, and an app squatting another app's
//! port.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A uWSGI app on `http-socket` with `http-keepalive`: it answers without
/// `Connection: close` and then closes the connection anyway, so every
/// pooled connection to it is one the proxy must not trust.
fn uwsgi_app(body: &str) -> AppRepo {
    let app = format!(
        "import json\n\
         def application(environ, start_response):\n\
         \x20   keys = ['HTTP_HOST', 'HTTP_X_FORWARDED_FOR', 'HTTP_X_FORWARDED_PROTO', 'HTTP_X_FORWARDED_HOST', 'HTTP_X_REAL_IP', 'HTTP_FORWARDED']\n\
         \x20   body = b'{body}' if environ['PATH_INFO'] != '/headers' else json.dumps({{k: environ.get(k) for k in keys}}).encode()\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n"
    );
    AppRepo::new(&[
        ("app.py", &app),
        (
            "uwsgi.ini",
            "[uwsgi]\nplugins = python3\nhttp-socket = 127.0.0.1:$(PORT)\nhttp-keepalive = 1\nwsgi-file = app.py\n\
             master = true\nprocesses = 2\ndie-on-term = true\nneed-app = true\n",
        ),
        ("Procfile", "web: uwsgi --ini uwsgi.ini\n"),
    ])
}

#[test]
fn keepalive_upstream_that_closes_idle_connections_fails_no_request() {
    let server = TestServer::start();
    uwsgi_app("kept alive").deploy(&server, "uwk");
    const CLIENTS: usize = 3;
    const REQUESTS: usize = 10_000;
    let failures: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let http = server.http.clone();
                s.spawn(move || {
                    let mut client = KeepAlive::new(&http);
                    let mut failed = Vec::new();
                    for _ in (c..REQUESTS).step_by(CLIENTS) {
                        let (code, body) = client.get("uwk.localhost", "/");
                        if code != 200 || body != "kept alive" {
                            failed.push(format!("{code} {}", tail(&body, 2)));
                        }
                    }
                    failed
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let failed: Vec<&String> = failures.iter().flatten().collect();
    eprintln!("keep-alive-closing uWSGI: {} of {REQUESTS} requests failed", failed.len());
    assert!(failed.is_empty(), "{} of {REQUESTS} failed, e.g. {:?}", failed.len(), failed.first());
}

/// GET /headers from the local address `from`, with extra headers, by curl.
fn headers_seen(server: &TestServer, from: &str, extra: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "--interface", from, "-H", "Host: fwd.localhost"]);
    for h in extra {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(format!("http://{}/headers", server.http)).output().expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}\n{}", tail(&server.server_log(), 10)))
}

#[test]
fn forwarded_headers_are_replaced_unless_the_peer_is_a_trusted_proxy() {
    let server = TestServer::start_with(&["--trusted-proxy", "127.0.0.2/32"]);
    uwsgi_app("fwd").deploy(&server, "fwd");
    let forged = [
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: bank.example",
        "X-Real-IP: 6.6.6.6",
        "Forwarded: for=6.6.6.6;proto=https",
    ];

    // An ordinary client: whatever it claims, the app hears what slipway saw.
    let v = headers_seen(&server, "127.0.0.1", &forged);
    assert_eq!(v["HTTP_X_FORWARDED_FOR"], "127.0.0.1", "{v}");
    assert_eq!(v["HTTP_X_FORWARDED_PROTO"], "http", "{v}");
    assert_eq!(v["HTTP_X_FORWARDED_HOST"], "fwd.localhost", "{v}");
    assert!(v["HTTP_X_REAL_IP"].is_null() && v["HTTP_FORWARDED"].is_null(), "{v}");

    // A TLS terminator in the trusted range: its word is kept, and the
    // chain names it.
    let v = headers_seen(&server, "127.0.0.2", &["X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https"]);
    assert_eq!(v["HTTP_X_FORWARDED_FOR"], "203.0.113.9, 127.0.0.2", "{v}");
    assert_eq!(v["HTTP_X_FORWARDED_PROTO"], "https", "{v}");

    // A second Host header is refused, never forwarded.
    let (code, body) = http_request(&server.http, "GET", "fwd.localhost", "/headers", &[("Host", "other.localhost")], "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("more than one Host"), "{body}");

    let out = Command::new(BIN).args(["server", "--trusted-proxy", "ten-dot"]).output().expect("run slipway");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an address range"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Waits for a port number in DATA/target, then tries to bind it every
/// millisecond; once bound, answers every connection with "stolen" and
/// records what it was sent.
const SQUATTER: &str = r#"import os, socket, time
data = os.environ['SLIPWAY_DATA_DIR']
target = os.path.join(data, 'target')
while not os.path.exists(target):
    time.sleep(0.05)
port = int(open(target).read())
s = socket.socket()
# As a real squatter would: connections the victim's death left in
# TIME_WAIT (60 s) must not keep it off the port.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
while True:
    try:
        s.bind(('127.0.0.1', port))
        break
    except OSError:
        time.sleep(0.001)
s.listen(64)
open(os.path.join(data, 'bound'), 'w').write(str(port))
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        got = c.recv(65536)
    except OSError:
        got = b''
    if got:
        with open(os.path.join(data, 'got'), 'ab') as f:
            f.write(got)
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nstolen')
    c.close()
"#;

fn env_of(pid: i32, key: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

#[test]
fn an_app_squatting_another_apps_port_never_gets_its_traffic() {
    if !is_root() {
        eprintln!("skipping: apps are told apart by their users only when the daemon runs as root");
        return;
    }
    let server = TestServer::start();
    let victim = uwsgi_app("victim");
    victim.deploy(&server, "victim");
    let attacker = AppRepo::new(&[
        ("app.py", &hello_app("attacker")),
        ("squat.py", SQUATTER),
        ("Procfile", "web: python3 -m wsgiref.simple_server 2>/dev/null || true\nsquat: python3 squat.py\n"),
    ]);
    // The attacker's web process only needs to pass the health check.
    attacker.write(
        "Procfile",
        "web: python3 -c \"from wsgiref.simple_server import make_server; import app, os; make_server('127.0.0.1', int(os.environ['PORT']), app.app).serve_forever()\"\nsquat: python3 squat.py\n",
    );
    attacker.commit("squatter");
    attacker.deploy(&server, "attacker");
    let victim_pid = *server.pids("victim").first().expect("victim pid");
    let port = env_of(victim_pid, "PORT").expect("victim's PORT");
    let attacker_data = server.data().join("apps/attacker/data");
    std::fs::write(attacker_data.join("target"), &port).expect("write target");

    // Kill the victim's web process until the squatter holds its port
    // (the supervisor restarts it after 100 ms; the squatter tries every ms).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !attacker_data.join("bound").exists() {
        assert!(Instant::now() < deadline, "the squatter never got the port\n{}", tail(&server.server_log(), 30));
        for pid in server.pids("victim") {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    for _ in 0..20 {
        let (code, body) = http_request(&server.http, "GET", "victim.localhost", "/", &[("Cookie", "session=victim-secret")], "");
        assert_ne!(body, "stolen", "the victim's traffic reached the squatter");
        assert_ne!(code, 200, "{body}");
    }
    let got = std::fs::read_to_string(attacker_data.join("got")).unwrap_or_default();
    assert!(got.is_empty(), "the squatter received a request: {got}");
    assert!(server.server_log().contains("held by another user"), "{}", tail(&server.server_log(), 20));
}

/// A TCP connection to `to` from the local address `from` (any 127/8
/// address is ours on loopback), or None when it cannot be made.
fn connect_from(from: std::net::Ipv4Addr, to: &str) -> Option<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let to: std::net::SocketAddrV4 = to.parse().ok()?;
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor we own; the result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let src = sockaddr(std::net::SocketAddrV4::new(from, 0));
        if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        let dst = sockaddr(to);
        if libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        Some(stream)
    }
}

fn daemon_fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        .unwrap_or(0);
    (fds, rss_kb)
}

#[test]
fn floods_of_idle_connections_and_slow_bodies_leave_apps_and_pushes_working() {
    const NOFILE: u64 = 2048;
    const IDLE_PER_LISTENER: usize = 2_000;
    const SLOW_BODIES: usize = 700;
    let server = TestServer::start_with_nofile(&[], NOFILE);
    let repo = uwsgi_app("steady one");
    repo.deploy(&server, "steady");

    // 2,000 idle connections to each listener from four addresses, and
    // 700 requests whose bodies never come from a fifth.
    let attackers: Vec<std::net::Ipv4Addr> = (2..=5).map(|i| std::net::Ipv4Addr::new(127, 0, 0, i)).collect();
    let mut held = Vec::new();
    let mut connected = 0;
    for target in [&server.http, &server.api, &server.ssh] {
        for i in 0..IDLE_PER_LISTENER {
            if let Some(s) = connect_from(attackers[i % attackers.len()], target) {
                connected += 1;
                held.push(s);
            }
        }
    }
    let slow_from = std::net::Ipv4Addr::new(127, 0, 0, 6);
    let head = "POST / HTTP/1.1\r\nHost: steady.localhost\r\nContent-Length: 1000000\r\n\r\nx";
    for _ in 0..SLOW_BODIES {
        if let Some(mut s) = connect_from(slow_from, &server.http) {
            use std::io::Write;
            let _ = s.write_all(head.as_bytes());
            connected += 1;
            held.push(s);
        }
    }
    let (fds, rss_kb) = daemon_fds_and_rss(server.pid());
    eprintln!("flood: {connected} connections made; daemon holds {fds} descriptors (limit {NOFILE}), RSS {} MB", rss_kb / 1024);
    assert!(fds < NOFILE as usize, "the daemon ran out of descriptors: {fds}");

    // Meanwhile, the app answers, the daemon is healthy, and a push deploys.
    let mut ok = 0;
    for _ in 0..50 {
        if server.get("steady", "/") == (200, "steady one".to_string()) {
            ok += 1;
        }
    }
    eprintln!("flood: {ok} of 50 requests to another client's app succeeded");
    assert_eq!(ok, 50);
    let (code, body) = http_request(&server.api, "GET", "localhost", "/healthz", &[], "");
    assert_eq!(code, 200, "{body}");
    let code = std::fs::read_to_string(repo.path().join("app.py")).expect("app.py");
    repo.write("app.py", &code.replace("steady one", "steady two"));
    repo.commit("two");
    repo.deploy(&server, "steady");
    assert_eq!(server.get("steady", "/"), (200, "steady two".to_string()));
    let (fds, rss_kb) = daemon_fds_and_rss(server.pid());
    eprintln!("flood: after a push, daemon holds {fds} descriptors, RSS {} MB", rss_kb / 1024);
    drop(held);
}

/// An RFC 6455 echo server on asyncio streams (the standard library only:
/// app builds here have no package index), answering plain GETs (the
/// health check) with 200; each echo names the release that answered.
fn websocket_app(tag: &str) -> String {
    r#"import asyncio, base64, hashlib, os, struct
GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
async def handle(reader, writer):
    head = await reader.readuntil(b'\r\n\r\n')
    headers = dict(l.split(': ', 1) for l in head.decode().split('\r\n')[1:] if ': ' in l)
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get('upgrade', '').lower() != 'websocket':
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n')
        await writer.drain(); writer.close(); return
    accept = base64.b64encode(hashlib.sha1(headers['sec-websocket-key'].encode() + GUID).digest())
    writer.write(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + b'\r\n\r\n')
    await writer.drain()
    try:
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7f
            if n == 126: n, = struct.unpack('!H', await reader.readexactly(2))
            elif n == 127: n, = struct.unpack('!Q', await reader.readexactly(8))
            mask = await reader.readexactly(4) if b1 & 0x80 else b'\0\0\0\0'
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
            if b0 & 0x0f == 8:
                writer.write(b'\x88\x00'); await writer.drain(); break
            reply = b'TAG:' + data
            writer.write(bytes([0x81, len(reply)]) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, '127.0.0.1', int(os.environ['PORT']))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#
    .replace("TAG", tag)
}

/// A minimal RFC 6455 client: enough to send and read short text frames.
struct WsClient(std::net::TcpStream);

impl WsClient {
    fn connect(addr: &str, host: &str) -> WsClient {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let req = format!(
            "GET /echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).expect("read handshake"), 1, "closed in handshake: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        WsClient(s)
    }

    fn send(&mut self, text: &str) {
        use std::io::Write;
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).expect("send frame");
    }

    /// The next text frame, or None when the connection closed (a close
    /// frame or end of stream).
    fn recv(&mut self) -> Option<String> {
        use std::io::Read;
        let mut head = [0u8; 2];
        if self.0.read_exact(&mut head).is_err() {
            return None;
        }
        let len = (head[1] & 0x7f) as usize;
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).ok()?;
        if head[0] & 0x0f == 0x8 {
            return None;
        }
        Some(String::from_utf8_lossy(&payload).to_string())
    }

    fn echo(&mut self, text: &str) -> Option<String> {
        self.send(text);
        self.recv()
    }
}

#[test]
fn a_websocket_is_bridged_and_survives_a_deploys_drain_then_closes() {
    let server = TestServer::start();
    let repo = AppRepo::new(&[
        ("app.py", &websocket_app("v1")),
        ("Procfile", "web: python3 app.py\n"),
    ]);
    repo.deploy(&server, "ws");
    let mut old = WsClient::connect(&server.http, "ws.localhost");
    assert_eq!(old.echo("a").as_deref(), Some("v1:a"));

    repo.write("app.py", &websocket_app("v2"));
    repo.commit("v2");
    std::thread::scope(|s| {
        let deploy = s.spawn(|| repo.deploy(&server, "ws"));
        // Once new connections reach v2, the old one is being drained: it
        // still works, on v1.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut fresh = WsClient::connect(&server.http, "ws.localhost");
            if fresh.echo("c").as_deref() == Some("v2:c") {
                break;
            }
            assert!(Instant::now() < deadline, "v2 never served");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!deploy.is_finished(), "the deploy waits for the open WebSocket");
        assert_eq!(old.echo("b").as_deref(), Some("v1:b"), "the WebSocket survives the drain");
        deploy.join().expect("deploy thread");
    });
    // The drain timed out: the old connection was closed, not left dangling.
    assert_eq!(old.echo("d"), None);
    let mut fresh = WsClient::connect(&server.http, "ws.localhost");
    assert_eq!(fresh.echo("e").as_deref(), Some("v2:e"));
}
