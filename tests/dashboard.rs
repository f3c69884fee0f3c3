//! The web dashboard on the API address. The session rules (cookie
//! attributes, CSRF, scoped tokens) are checked with plain HTTP; the page
//! itself in a real headless Chromium through chromedriver (WebDriver, the
//! fantoccini client): sign in, see the app, follow its logs while a push
//! happens, roll back from the page and see the old body served, and a
//! screenshot that is not blank. The browser test is slow: it runs when
//! SLIPWAY_SLOW_TESTS=1 (CI sets it) and says so when skipped.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use util::*;

/// A raw HTTP/1.1 exchange with the API address: (status, head, body).
fn exchange(server: &TestServer, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(&server.api).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n", server.api, body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_string(), body.to_string())
}

/// Sign in with `token`; the session cookie and the page's CSRF token.
fn sign_in(server: &TestServer, token: &str) -> (String, String) {
    let (code, head, _) = exchange(server, "POST", "/dashboard/login", &[("Content-Type", "application/x-www-form-urlencoded")], &format!("token={token}"));
    assert_eq!(code, 303, "{head}");
    let set_cookie = head.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("a session cookie").to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attr), "cookie lacks {attr}: {set_cookie}");
    }
    let cookie = set_cookie.split_once(':').map(|(_, v)| v).unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    let (code, _, page) = exchange(server, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(code, 200);
    let csrf = page.split("name=\"csrf\" content=\"").nth(1).and_then(|r| r.split('"').next()).expect("csrf meta").to_string();
    (cookie, csrf)
}

// issue 15 #4: a release whose code was collected (--keep-releases) says
// so on its row and offers the rebuild, not a rollback that cannot work.
#[test]
fn collected_releases_say_so_and_offer_a_rebuild_not_a_rollback() {
    let server = TestServer::start_with(&["--keep-releases", "1"]);
    let repo = AppRepo::hello("first");
    repo.deploy(&server, "kept");
    repo.write("app.py", &hello_app("second"));
    repo.commit("second");
    repo.deploy(&server, "kept");
    let commit = server.json(&["releases", "kept", "--json"])[1]["commit"].as_str().expect("v1's commit").to_string();

    let (cookie, _) = sign_in(&server, &server.token);
    let (code, _, page) = exchange(&server, "GET", "/dashboard/apps/kept", &[("Cookie", &cookie)], "");
    assert_eq!(code, 200, "{page}");
    let row = page.split("<tr data-version=\"v1\">").nth(1).and_then(|r| r.split("</tr>").next()).expect("v1's row");
    assert!(row.contains("(code collected)"), "{row}");
    assert!(row.contains(&format!("rebuild: slipway deploy kept --ref {commit}")), "{row}");
    assert!(!row.contains("data-action=\"rollback\""), "no rollback button for a collected release: {row}");
}

#[test]
fn dashboard_sessions_refuse_forgery_and_keep_scoped_tokens_to_their_app() {
    let server = TestServer::start();
    server.ok(&["apps", "create", "mine"]);
    server.ok(&["apps", "create", "theirs"]);

    // Signed out: the sign-in form, no data.
    let (code, _, page) = exchange(&server, "GET", "/", &[], "");
    assert_eq!(code, 200);
    assert!(page.contains("name=\"token\"") && !page.contains("mine"), "{page}");
    let (code, _, page) = exchange(&server, "POST", "/dashboard/login", &[("Content-Type", "application/x-www-form-urlencoded")], "token=slw_wrong");
    assert_eq!(code, 401);
    assert!(page.contains("not valid"), "{page}");

    let (cookie, csrf) = sign_in(&server, &server.token);
    let (_, _, page) = exchange(&server, "GET", "/", &[("Cookie", &cookie)], "");
    assert!(page.contains("data-app=\"mine\"") && page.contains("data-app=\"theirs\""), "{page}");
    // The cookie reads the API...
    let (code, _, body) = exchange(&server, "GET", "/api/apps", &[("Cookie", &cookie)], "");
    assert_eq!(code, 200, "{body}");
    // ...but changes nothing without the session's CSRF token,
    let (code, _, body) = exchange(&server, "POST", "/api/apps/mine/stop", &[("Cookie", &cookie)], "");
    assert_eq!(code, 403, "{body}");
    let (code, _, body) = exchange(&server, "POST", "/api/apps/mine/stop", &[("Cookie", &cookie), ("X-CSRF-Token", "slw_guess")], "");
    assert_eq!(code, 403, "{body}");
    // nor from another site's page, even with it.
    let (code, _, body) = exchange(&server, "POST", "/api/apps/mine/stop", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf), ("Origin", "http://evil.example")], "");
    assert_eq!(code, 403, "{body}");
    let (code, _, body) = exchange(&server, "POST", "/api/apps/mine/stop", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], "");
    assert_eq!(code, 200, "{body}");

    // A token limited to one app sees that app only.
    let scoped = server.ok(&["tokens", "create", "deployer", "--app", "mine"]).trim().to_string();
    let (cookie, _) = sign_in(&server, &scoped);
    let (_, _, page) = exchange(&server, "GET", "/", &[("Cookie", &cookie)], "");
    assert!(page.contains("data-app=\"mine\"") && !page.contains("theirs"), "{page}");
    let (code, _, _) = exchange(&server, "GET", "/dashboard/apps/theirs", &[("Cookie", &cookie)], "");
    assert_eq!(code, 404);
    let (code, _, _) = exchange(&server, "GET", "/api/apps/theirs", &[("Cookie", &cookie)], "");
    assert_eq!(code, 403);

    // Signing out ends the session on the server, not only in the browser.
    let (code, _, _) = exchange(&server, "POST", "/dashboard/logout", &[("Cookie", &cookie)], "");
    assert_eq!(code, 303);
    let (code, _, _) = exchange(&server, "GET", "/api/apps", &[("Cookie", &cookie)], "");
    assert_eq!(code, 401);
}

fn slow_tests(name: &str) -> bool {
    let on = std::env::var("SLIPWAY_SLOW_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipping {name}: set SLIPWAY_SLOW_TESTS=1 to run it");
    }
    on
}

/// chromedriver on a port of its own, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt install chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, url: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Share of pixels that differ from the most common colour, and how many
/// colours there are: a blank (or all-one-colour) page scores ~0 and 1.
fn screenshot_detail(png_bytes: &[u8]) -> (f64, usize) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let channels = info.color_type.samples();
    let mut counts = std::collections::HashMap::<&[u8], usize>::new();
    for px in buf[..info.buffer_size()].chunks(channels) {
        *counts.entry(&px[..3.min(px.len())]).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    let most = counts.values().copied().max().unwrap_or(0);
    ((total - most) as f64 / total.max(1) as f64, counts.len())
}

#[test]
fn dashboard_in_a_browser_follows_a_push_and_rolls_back() {
    if !slow_tests("dashboard_in_a_browser_follows_a_push_and_rolls_back") {
        return;
    }
    let server = TestServer::start();
    let repo = AppRepo::hello("first");
    repo.deploy(&server, "shop");
    repo.write("app.py", &hello_app("second"));
    repo.commit("second");
    repo.deploy(&server, "shop");
    assert_eq!(server.get("shop", "/").1, "second world\n");
    let driver = Driver::start();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"] }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a WebDriver session");
        let base = format!("http://{}", server.api);

        // Sign in.
        client.goto(&format!("{base}/")).await.expect("open the dashboard");
        let field = client.wait().at_most(Duration::from_secs(60)).for_element(Locator::Css("input[name=token]")).await.expect("sign-in form");
        field.send_keys(&server.token).await.expect("type the token");
        client.find(Locator::Css("#login button[type=submit]")).await.expect("button").click().await.expect("sign in");

        // The app, its state and live release.
        let row = client.wait().at_most(Duration::from_secs(60)).for_element(Locator::Css("tr[data-app=shop]")).await.expect("the app's row");
        let text = row.text().await.expect("row text");
        assert!(text.contains("running") && text.contains("v2"), "{text}");

        // A real picture, not a blank page.
        let shot = client.screenshot().await.expect("screenshot");
        let (detail, colours) = screenshot_detail(&shot);
        assert!(detail > 0.02 && colours > 8, "the page looks blank: {detail:.4} of pixels differ, {colours} colours");

        // The app's page: follow the logs while a push happens.
        client.find(Locator::LinkText("shop")).await.expect("app link").click().await.expect("open app");
        client.wait().at_most(Duration::from_secs(60)).for_element(Locator::Css("#logs[data-state=following]")).await.expect("logs stream");
        repo.write("app.py", &hello_app("third"));
        repo.commit("third");
        let pusher = {
            let url = server.git_url("shop");
            let path = repo.path().to_path_buf();
            std::thread::spawn(move || {
                Command::new("git").args(["push", &url, "main"]).current_dir(path).env("GIT_TERMINAL_PROMPT", "0").output().expect("git push")
            })
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut logs = String::new();
        while Instant::now() < deadline {
            logs = client.find(Locator::Css("#logs")).await.expect("logs").text().await.unwrap_or_default();
            if logs.contains("deploy: ") && logs.contains("v3") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(logs.contains("deploy: ") && logs.contains("v3"), "the push's output never reached the page:\n{logs}");
        let pushed = pusher.join().expect("push thread");
        assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
        assert_eq!(server.get("shop", "/").1, "third world\n");

        // Roll back to v1 from the page: the old body is served again.
        client.goto(&format!("{base}/dashboard/apps/shop")).await.expect("reload");
        let button = client.wait().at_most(Duration::from_secs(60)).for_element(Locator::Css("button[data-action=rollback][data-version=v1]")).await.expect("rollback button");
        button.click().await.expect("roll back");
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && server.get("shop", "/").1 != "first world\n" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(server.get("shop", "/").1, "first world\n", "the rollback from the page did not take");

        // The page went through the API's checks: without the CSRF token
        // the same request is refused.
        let status = client
            .execute("return fetch('/api/apps/shop/restart', {method: 'POST', body: '{}'}).then(r => r.status)", vec![])
            .await
            .expect("script");
        assert_eq!(status, serde_json::json!(403));
        client.close().await.expect("close the browser");
    });
    // Recorded as the admin's rollback (the event follows the switch).
    let deadline = Instant::now() + Duration::from_secs(60);
    let rolled_back = |e: &serde_json::Value| e["action"] == "rollback" && e["actor"] == "admin" && e["outcome"] == "ok";
    let mut events = server.json(&["events", "shop", "--json"]);
    while Instant::now() < deadline && !events.as_array().into_iter().flatten().any(rolled_back) {
        std::thread::sleep(Duration::from_millis(200));
        events = server.json(&["events", "shop", "--json"]);
    }
    assert!(events.as_array().into_iter().flatten().any(rolled_back), "{events}");
}
