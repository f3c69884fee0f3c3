#!/usr/bin/env python3
"""Dashboard benchmark: page weight and time to first render on loopback.

Starts a daemon (ephemeral ports, throw-away data dir), deploys
examples/hello-wsgi as `hello`, signs in to the dashboard with the admin
token (POST /dashboard/login, the session cookie), then:

 (1) page weight: bytes of `GET /` (the app list), `GET /dashboard/apps/hello`
     (the app page) and `GET /dashboard.js`, as served (no compression), and
     the total of each page with the script. The styles are inline; nothing
     else is fetched.
 (2) time to first render: headless Chromium through chromedriver (plain
     WebDriver HTTP from the standard library), the session cookie set, the
     app page loaded RUNS times (default 10) in a fresh navigation each;
     from the Performance API: responseEnd (last byte of the HTML) and
     first-contentful-paint, both from navigation start. Median, min, max.

Prints the figures and writes bench/results/dashboard.json. Env: RUNS,
SLIPWAY_BIN (default target/release/slipway, built when missing),
UV_CACHE_DIR.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

BIN = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.path.join(BENCH, "results")
RUNS = int(os.environ.get("RUNS", "10"))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def sign_in(api, token):
    """POST the token as the form does; returns the session cookie's value."""
    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(api + "/dashboard/login", data=("token=" + token).encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        opener.open(req)
    except urllib.error.HTTPError as e:  # the 303 to / is an "error" without redirects
        cookie = e.headers.get("Set-Cookie", "")
        return cookie.split(";")[0].split("=", 1)[1]
    raise RuntimeError("sign-in did not redirect")


def weight(api, path, cookie):
    req = urllib.request.Request(api + path, headers={"Cookie": "slipway_session=" + cookie})
    with urllib.request.urlopen(req) as r:
        return len(r.read())


def webdriver(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["value"]


def first_render(api, cookie):
    port = lib.free_port()
    driver = subprocess.Popen(["chromedriver", "--port=%d" % port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}}}}
        session = webdriver(base, "POST", "/session", caps)["sessionId"]
        s = "/session/" + session
        try:
            webdriver(base, "POST", s + "/url", {"url": api + "/dashboard.js"})
            webdriver(base, "POST", s + "/cookie", {"cookie": {"name": "slipway_session", "value": cookie, "path": "/"}})
            samples = []
            for _ in range(RUNS):
                webdriver(base, "POST", s + "/url", {"url": api + "/dashboard/apps/hello"})
                # Paint entries land just after load: wait for them briefly.
                timing = None
                for _ in range(50):
                    timing = webdriver(base, "POST", s + "/execute/sync", {"script": """
                        const nav = performance.getEntriesByType('navigation')[0];
                        const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                        return fcp ? {response_end_ms: nav.responseEnd, fcp_ms: fcp.startTime,
                                      has_app: !!document.querySelector('#summary')} : null;""", "args": []})
                    if timing:
                        break
                    time.sleep(0.05)
                if not timing or not timing["has_app"]:
                    raise RuntimeError("the app page did not render: %r" % timing)
                samples.append(timing)
            return samples
        finally:
            webdriver(base, "DELETE", s)
    finally:
        driver.terminate()
        driver.wait()


def stats(xs):
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


def main():
    env, work = lib.prepare_run(ROOT, BIN, RESULTS, "slipway-bench-dashboard-")
    server = None
    try:
        data = os.path.join(work, "data")
        server = lib.Server(BIN, data, os.path.join(work, "server.log"), env=env)
        repo = os.path.join(work, "hello")
        lib.init_app_repo(os.path.join(ROOT, "examples", "hello-wsgi"), repo)
        subprocess.run(["git", "push", "-q", server.git_remote("hello"), "main"], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cookie = sign_in(server.api, server.token)
        sizes = {p: weight(server.api, p, cookie) for p in ["/", "/dashboard/apps/hello", "/dashboard.js"]}
        samples = first_render(server.api, cookie)
        result = {
            "bytes": sizes,
            "app_list_total_bytes": sizes["/"] + sizes["/dashboard.js"],
            "app_page_total_bytes": sizes["/dashboard/apps/hello"] + sizes["/dashboard.js"],
            "runs": RUNS,
            "response_end_ms": stats([t["response_end_ms"] for t in samples]),
            "first_contentful_paint_ms": stats([t["fcp_ms"] for t in samples]),
            "build": lib.build_info(ROOT, BIN),
        }
        print("page weight (bytes, uncompressed): app list %d, app page %d, script %d; app page + script %d"
              % (sizes["/"], sizes["/dashboard/apps/hello"], sizes["/dashboard.js"], result["app_page_total_bytes"]))
        print("app page on loopback, %d loads: HTML done %s ms, first contentful paint %s ms (median; min/max %s/%s)"
              % (RUNS, result["response_end_ms"]["median"], result["first_contentful_paint_ms"]["median"],
                 result["first_contentful_paint_ms"]["min"], result["first_contentful_paint_ms"]["max"]))
        with open(os.path.join(RESULTS, "dashboard.json"), "w") as f:
            json.dump(result, f, indent=2)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
