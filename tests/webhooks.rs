//! Webhooks: every deploy is POSTed to the app's receiver, signed with
//! HMAC-SHA256 under the app's own secret (`X-Slipway-Signature-256`,
//! GitHub's scheme), over IPv6 here; the delivery's outcome lands in the
//! event log; `slipway webhook test` sends one now.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use util::*;

struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A receiver on [::1] answering `status` to every request; what it got
/// arrives on the channel.
fn receiver(status: u16) -> (String, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("[::1]:0").expect("bind [::1] (IPv6 loopback)");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut headers = Vec::new();
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(": ") {
                    headers.push((k.to_string(), v.to_string()));
                }
            }
            let len: usize = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let _ = conn.write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
            if tx.send(Received { headers, body }).is_err() {
                return;
            }
        }
    });
    (format!("http://[::1]:{}/hook", addr.port()), rx)
}

fn verify(secret: &str, r: &Received) {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(&r.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("X-Slipway-Signature-256"), Some(expected.as_str()), "signature of {}", String::from_utf8_lossy(&r.body));
}

#[test]
fn deploys_are_posted_signed_over_ipv6_and_recorded() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hooked");
    repo.deploy(&server, "hooked");
    let (url, got) = receiver(200);
    let set = server.ok(&["webhook", "set", "hooked", &url]);
    let secret = set.split_whitespace().find(|w| w.starts_with("whsec_")).expect("the secret is shown").to_string();
    assert!(server.ok(&["webhook", "show", "hooked"]).contains(&secret));

    // A test event, now.
    let tested = server.ok(&["webhook", "test", "hooked"]);
    assert!(tested.contains("200"), "{tested}");
    let r = got.recv_timeout(Duration::from_secs(30)).expect("the test event");
    verify(&secret, &r);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["action"], "test");

    // A deploy: posted, signed, and its delivery in the event log.
    repo.write("app.py", &hello_app("again"));
    repo.commit("again");
    repo.deploy(&server, "hooked");
    let r = got.recv_timeout(Duration::from_secs(60)).expect("the deploy event");
    verify(&secret, &r);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!((v["action"].as_str(), v["release"].as_str(), v["outcome"].as_str()), (Some("deploy"), Some("v2"), Some("ok")));
    // A forged body does not carry a valid signature.
    let forged = Received { headers: r.headers.clone(), body: br#"{"action":"deploy","outcome":"ok","app":"other"}"#.to_vec() };
    assert!(std::panic::catch_unwind(|| verify(&secret, &forged)).is_err());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = server.json(&["events", "hooked", "--json"]);
        let recorded = events.as_array().into_iter().flatten().any(|e| e["action"] == "webhook" && e["outcome"] == "ok" && e["detail"].as_str().unwrap_or("").contains("200"));
        if recorded {
            break;
        }
        assert!(Instant::now() < deadline, "no delivery event: {events}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_refusing_receiver_fails_the_test_and_says_so() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "refused"]);
    let (url, got) = receiver(500);
    server.ok(&["webhook", "set", "refused", &url]);
    let out = server.cli(&["webhook", "test", "refused"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("500"), "{err}");
    assert!(got.recv_timeout(Duration::from_secs(30)).is_ok());
    let events = server.json(&["events", "refused", "--json"]);
    assert!(events.as_array().into_iter().flatten().any(|e| e["action"] == "webhook:test" && e["outcome"] == "failed"), "{events}");
    // Credentials in the URL are refused: the signature is the credential.
    assert!(!server.cli(&["webhook", "set", "refused", "http://user:pw@[::1]:9/x"]).status.success());
}

// Webhooks over HTTPS: a receiver behind TLS whose CA the server trusts
// (SSL_CERT_FILE, as OpenSSL, curl and Python read it; the public roots
// stay trusted too) gets the signed test event; a server that does not
// trust that CA refuses to deliver, and says why.
#[test]
fn webhooks_reach_an_https_receiver_whose_ca_the_server_trusts() {
    let (plain, got) = receiver(200);
    let upstream = plain.trim_start_matches("http://").trim_end_matches("/hook").to_string();
    let tls = Nginx::start(&upstream);
    let url = format!("https://localhost:{}/hook", tls.port);
    let ca = tls.dir.path().join("ca.pem");

    let server = TestServer::start_with_env(&[], &[("SSL_CERT_FILE", ca.to_str().expect("utf-8 path"))]);
    server.ok(&["apps", "create", "secure"]);
    let set = server.ok(&["webhook", "set", "secure", &url]);
    let secret = set.split_whitespace().find(|w| w.starts_with("whsec_")).expect("the secret is shown").to_string();
    let tested = server.ok(&["webhook", "test", "secure"]);
    assert!(tested.contains("200"), "{tested}");
    let r = got.recv_timeout(Duration::from_secs(30)).expect("the test event, through TLS");
    verify(&secret, &r);

    let untrusting = TestServer::start();
    untrusting.ok(&["apps", "create", "secure"]);
    untrusting.ok(&["webhook", "set", "secure", &url]);
    let out = untrusting.cli(&["webhook", "test", "secure"]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!said.contains("200"), "delivered to a receiver whose certificate it cannot check: {said}");
    assert!(said.to_lowercase().contains("certificate"), "the failure names the certificate: {said}");
    assert!(got.recv_timeout(Duration::from_secs(2)).is_err(), "nothing reached the receiver");
}
