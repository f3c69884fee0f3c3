//! `[static]` served by slipway's proxy (issue 9 #4): types, validators,
//! ranges, precompressed variants, hashed-name caching, traversal and
//! symlink escapes, and each release serving its own files.

mod util;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use util::*;

const APP_SECRET: &str = "SECRET_APP_SOURCE_7731";

/// A raw request through the proxy: (status, lower-cased headers, body).
/// The path is sent exactly as given (no normalization by a client).
fn raw(server: &TestServer, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect(&server.http).expect("connect to proxy");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: st.localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&bytes[..end]).to_string();
    let body = bytes[end + 4..].to_vec();
    let mut lines = head.lines();
    let code = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers, body)
}

fn static_app(css: &str) -> AppRepo {
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        ("app.py", &format!("# {APP_SECRET}\n{}", hello_app("page"))),
        ("slipway.toml", "[static]\n\"/static/\" = \"public\"\n"),
        ("public/site.css", css),
        ("public/app.3f2a9c1b.css", "body{color:red}\n"),
        ("public/logo.svg", "<svg xmlns=\"http://www.w3.org/2000/svg\"/>\n"),
        ("public/js/app.js", "console.log('hi');\n"),
        ("public/data.txt", "0123456789abcdefghij"),
    ]);
    // A precompressed variant, as WhiteNoise's CompressedManifestStaticFilesStorage leaves.
    let st = std::process::Command::new("gzip")
        .args(["-k", "-n", "public/app.3f2a9c1b.css"])
        .current_dir(repo.path())
        .status()
        .expect("gzip");
    assert!(st.success());
    // A symlink in the tree that leads out of it.
    std::os::unix::fs::symlink("/etc/passwd", repo.path().join("public/leak.txt")).expect("symlink");
    // One that stays inside the mount is fine.
    std::os::unix::fs::symlink("site.css", repo.path().join("public/alias.css")).expect("symlink");
    repo.commit("static files");
    repo
}

#[test]
fn static_files_are_served_by_the_proxy_and_never_escape_their_directory() {
    let server = TestServer::start();
    let repo = static_app("/* v1 */\n");
    repo.deploy(&server, "st");

    // The app still answers everything outside the prefix.
    let (code, _, body) = raw(&server, "GET", "/", &[]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).starts_with("page"), "{}", String::from_utf8_lossy(&body));

    // Content types.
    for (path, ty) in [
        ("/static/site.css", "text/css"),
        ("/static/logo.svg", "image/svg+xml"),
        ("/static/js/app.js", "javascript"),
    ] {
        let (code, h, _) = raw(&server, "GET", path, &[]);
        assert_eq!(code, 200, "{path}");
        assert!(h["content-type"].contains(ty), "{path}: {:?}", h["content-type"]);
    }

    // ETag and Last-Modified; 304 on either validator.
    let (code, h, body) = raw(&server, "GET", "/static/site.css", &[]);
    assert_eq!((code, body.as_slice()), (200, b"/* v1 */\n".as_slice()));
    let etag = h["etag"].clone();
    let modified = h["last-modified"].clone();
    assert_eq!(h["cache-control"], "public, no-cache", "unhashed names revalidate");
    let (code, h304, body) = raw(&server, "GET", "/static/site.css", &[("If-None-Match", &etag)]);
    assert_eq!(code, 304);
    assert!(body.is_empty());
    assert_eq!(h304["etag"], etag);
    let (code, _, _) = raw(&server, "GET", "/static/site.css", &[("If-Modified-Since", &modified)]);
    assert_eq!(code, 304);
    let (code, _, _) = raw(&server, "GET", "/static/site.css", &[("If-None-Match", "\"other\"")]);
    assert_eq!(code, 200);

    // Range: 206 with Content-Range; 416 past the end.
    let (code, h, body) = raw(&server, "GET", "/static/data.txt", &[("Range", "bytes=2-5")]);
    assert_eq!(code, 206);
    assert_eq!(body, b"2345");
    assert_eq!(h["content-range"], "bytes 2-5/20");
    let (code, h, _) = raw(&server, "GET", "/static/data.txt", &[("Range", "bytes=-3")]);
    assert_eq!((code, h["content-range"].as_str()), (206, "bytes 17-19/20"));
    let (code, h, _) = raw(&server, "GET", "/static/data.txt", &[("Range", "bytes=50-60")]);
    assert_eq!(code, 416);
    assert_eq!(h["content-range"], "bytes */20");

    // Hashed name: cached for a year; its .gz variant by Accept-Encoding.
    let (code, h, body) = raw(&server, "GET", "/static/app.3f2a9c1b.css", &[("Accept-Encoding", "gzip, deflate")]);
    assert_eq!(code, 200);
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(h.get("content-encoding").map(String::as_str), Some("gzip"));
    assert!(h["content-type"].contains("text/css"));
    assert!(h["vary"].to_ascii_lowercase().contains("accept-encoding"));
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip magic");
    let (code, h, body) = raw(&server, "GET", "/static/app.3f2a9c1b.css", &[("Accept-Encoding", "gzip;q=0, br;q=0")]);
    assert_eq!(code, 200);
    assert!(!h.contains_key("content-encoding"));
    assert_eq!(body, b"body{color:red}\n");

    // HEAD: the headers, no body.
    let (code, h, body) = raw(&server, "HEAD", "/static/site.css", &[]);
    assert_eq!(code, 200);
    assert_eq!(h["content-length"], "9");
    assert!(body.is_empty());

    // A symlink that stays inside the directory is served.
    let (code, _, body) = raw(&server, "GET", "/static/alias.css", &[]);
    assert_eq!((code, body.as_slice()), (200, b"/* v1 */\n".as_slice()));

    // Attacks: nothing outside the mapped directory, whatever the spelling.
    for path in [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/%2E%2E/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
        "/static/js/../../app.py",
        "/static/./site.css",
        "/static//etc/passwd",
        "/static/leak.txt",
        "/static/%00site.css",
    ] {
        let (code, _, body) = raw(&server, "GET", path, &[]);
        let text = String::from_utf8_lossy(&body);
        assert!(code == 404 || code == 403, "{path}: {code}\n{text}");
        assert!(!text.contains(APP_SECRET) && !text.contains("root:"), "{path} leaked:\n{text}");
    }
    let (code, _, _) = raw(&server, "POST", "/static/site.css", &[]);
    assert_eq!(code, 405);

    // Each release serves its own files: v2, then a rollback to v1.
    repo.write("public/site.css", "/* v2 */\n");
    repo.commit("v2 css");
    repo.deploy(&server, "st");
    let (code, h, body) = raw(&server, "GET", "/static/site.css", &[]);
    assert_eq!((code, body.as_slice()), (200, b"/* v2 */\n".as_slice()));
    assert_ne!(h["etag"], etag, "a new release's file has a new validator");
    let (code, _, _) = raw(&server, "GET", "/static/site.css", &[("If-None-Match", &etag)]);
    assert_eq!(code, 200, "the old ETag no longer matches");
    server.ok(&["rollback", "st"]);
    let (code, h, body) = raw(&server, "GET", "/static/site.css", &[]);
    assert_eq!((code, body.as_slice()), (200, b"/* v1 */\n".as_slice()));
    assert_eq!(h["etag"], etag, "v1's own file again");
}

#[test]
fn a_static_mount_that_leads_out_of_the_release_is_refused() {
    let server = TestServer::start();
    let repo = static_app("/* v1 */\n");
    repo.deploy(&server, "st");
    // `[static]` pointed at a `[storage]` item (writable by the app, outside
    // the sealed tree): refused at deploy; the live release keeps serving.
    repo.write("slipway.toml", "[static]\n\"/static/\" = \"public\"\n\"/media/\" = \"media\"\n[storage]\n\"media\" = \"media\"\n");
    repo.commit("media as static");
    let out = repo.deploy_rejected(&server, "st");
    assert!(out.contains("leads out of the release tree"), "{out}");
    let (code, _, body) = raw(&server, "GET", "/static/site.css", &[]);
    assert_eq!((code, body.as_slice()), (200, b"/* v1 */\n".as_slice()));
}
