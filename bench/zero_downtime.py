#!/usr/bin/env python3
"""Zero-downtime benchmark for slipway: failed requests during consecutive deploys.

One server (fresh data dir, ephemeral ports), the hello-wsgi example deployed,
then 8 client threads loop `GET /` through the proxy (Host: hello.localhost),
each on a reused keep-alive http.client connection (reconnecting when the
server closes it or after an error), while 20 consecutive code-only pushes
each change the response body. When the pushes are done (hard cap: 5 minutes)
the load stops.

Counted separately: total requests, non-200 responses (by status), connection
errors (by exception), and - as information - "stale" answers: an older
release's body to a request that started after a newer push had returned
(slipway's contract is that a returned push is already serving).

Prints `requests=N failed=M` and the breakdown; writes
bench/results/zero_downtime.json; exits 1 if any request failed (or a deploy
failed), 0 otherwise. Only talks to 127.0.0.1.

Env: DEPLOYS (default 20), CLIENTS (default 8), UV_CACHE_DIR (default
bench/results/.cache/uv).
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

BIN = os.path.join(ROOT, "target", "release", "slipway")
RESULTS = os.path.join(BENCH, "results")
APP_SRC = os.path.join(ROOT, "examples", "hello-wsgi")
APP = "hello"
HOST = APP + ".localhost"
DEPLOYS = int(os.environ.get("DEPLOYS", "20"))
CLIENTS = int(os.environ.get("CLIENTS", "8"))
HARD_CAP_S = 300.0
MAX_SAMPLES = 50  # detailed failure records kept


class Load:
    """Shared state between the client threads and the deploy loop."""

    def __init__(self, http_url):
        self.host, self.port = lib.split_http(http_url)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t_start = time.monotonic()
        # body -> version; version of the newest push that has returned
        self.versions = {}
        self.live_version = 0
        self.phase = "before deploys"
        self.requests = 0
        self.ok = 0
        self.non200 = {}
        self.errors = {}
        self.stale = 0
        self.unknown_body = 0
        self.connections = 0
        self.samples = []
        self.latencies = []

    def now(self):
        return round(time.monotonic() - self.t_start, 4)

    def record_failure(self, kind, detail, started):
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append({"t": self.now(), "request_started": round(started - self.t_start, 4),
                                 "phase": self.phase, "kind": kind, "detail": detail})

    def client(self, idx):
        conn = None
        lat = []
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                with self.lock:
                    self.connections += 1
            live_at_start = self.live_version
            started = time.monotonic()
            try:
                conn.request("GET", "/", headers={"Host": HOST})
                r = conn.getresponse()
                body = r.read()
                elapsed = time.monotonic() - started
                lat.append(elapsed)
                with self.lock:
                    self.requests += 1
                    if r.status == 200:
                        self.ok += 1
                        v = self.versions.get(body)
                        if v is None:
                            self.unknown_body += 1
                        elif v < live_at_start:
                            self.stale += 1
                    else:
                        k = str(r.status)
                        self.non200[k] = self.non200.get(k, 0) + 1
                        self.record_failure("status %d" % r.status,
                                            body[:200].decode("utf-8", "replace"), started)
                if r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is data here
                with self.lock:
                    self.requests += 1
                    k = lib.describe_error(e)
                    self.errors[k] = self.errors.get(k, 0) + 1
                    self.record_failure("connection error", k, started)
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
                conn = None
        if conn is not None:
            conn.close()
        with self.lock:
            self.latencies.extend(lat)


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))
    return round(xs[i], 4)


def server_problems(stderr_path):
    out = []
    try:
        with open(stderr_path, "rb") as f:
            for line in f.read().decode("utf-8", "replace").splitlines():
                clean = re.sub(r"\x1b\[[0-9;]*m", "", line)
                if " WARN " in clean or " ERROR " in clean:
                    out.append(clean)
    except OSError:
        pass
    return out


def main():
    env, work = lib.prepare_run(ROOT, BIN, RESULTS, "slipway-bench-zd.")
    logdir = os.path.join(RESULTS, "zero-downtime-logs")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    stderr_path = os.path.join(logdir, "server.stderr")
    push_log = os.path.join(logdir, "push.log")
    server = None
    load = None
    threads = []
    try:
        data = os.path.join(work, "data")
        server = lib.Server(BIN, data, stderr_path, env=env)
        print("server: api=%s http=%s data=%s" % (server.api, server.http, data), file=sys.stderr)
        repo = os.path.join(work, "repo")
        lib.init_app_repo(APP_SRC, repo)
        remote = server.git_remote(APP)
        first = lib.push_and_wait(repo, remote, server.http, HOST, "hello world\n", log_path=push_log)
        if first["push_rc"] != 0 or first["served_s"] is None:
            print("initial deploy failed: %s (see %s)" % (first, push_log), file=sys.stderr)
            return 1

        load = Load(server.http)
        load.versions[b"hello world\n"] = 0
        for i in range(CLIENTS):
            t = threading.Thread(target=load.client, args=(i,), daemon=True)
            t.start()
            threads.append(t)
        time.sleep(1.0)  # steady load before the first deploy

        deploys = []
        deploy_failures = 0
        for n in range(1, DEPLOYS + 1):
            if time.monotonic() - load.t_start > HARD_CAP_S:
                print("hard cap of %ds reached after %d deploys" % (HARD_CAP_S, n - 1), file=sys.stderr)
                break
            body = lib.set_greeting(repo, "zd-%d-%d" % (n, os.getpid()))
            lib.commit(repo, "zero-downtime deploy %d" % n)
            with load.lock:
                load.versions[body.encode()] = n
                load.phase = "during push %d" % n
            t0 = time.monotonic()
            with open(push_log, "ab") as log:
                try:
                    rc = subprocess.run(["git", "push", "--porcelain", remote, "main"], cwd=repo,
                                        stdout=log, stderr=log,
                                        timeout=max(1.0, HARD_CAP_S - (t0 - load.t_start))).returncode
                except subprocess.TimeoutExpired:
                    rc = -1
            dt = time.monotonic() - t0
            with load.lock:
                if rc == 0:
                    load.live_version = n
                load.phase = "after push %d" % n
            deploys.append({"n": n, "push_rc": rc, "push_s": round(dt, 4)})
            print("  deploy %2d: rc=%d %.3fs  requests so far=%d" % (n, rc, dt, load.requests), file=sys.stderr)
            if rc != 0:
                deploy_failures += 1
        time.sleep(1.0)  # steady load after the last deploy
    finally:
        if load is not None:
            load.stop.set()
            for t in threads:
                t.join(15)
        if server is not None:
            server.stop()
            left = lib.leftover_groups(server.data)
            if left:
                print("PROBLEM: app process groups alive after the server stopped: %s (killing)" % left,
                      file=sys.stderr)
                lib.kill_recorded_groups(server.data)
        shutil.rmtree(work, ignore_errors=True)

    failed = sum(load.non200.values()) + sum(load.errors.values())
    duration = load.now()
    result = {
        "clients": CLIENTS,
        "deploys_attempted": len(deploys),
        "deploys_failed": deploy_failures,
        "duration_s": duration,
        "requests": load.requests,
        "ok": load.ok,
        "failed": failed,
        "non200": load.non200,
        "connection_errors": load.errors,
        "stale_after_push_returned": load.stale,
        "unknown_body": load.unknown_body,
        "connections_opened": load.connections,
        "requests_per_s": round(load.requests / duration, 1) if duration else None,
        "latency_s": {"p50": percentile(load.latencies, 50), "p99": percentile(load.latencies, 99),
                      "max": percentile(load.latencies, 100)},
        "push_s": lib.stats([d["push_s"] for d in deploys]),
        "deploys": deploys,
        "failure_samples": load.samples,
        "server_warnings": server_problems(stderr_path),
        "slipway": lib.build_info(ROOT, BIN),
    }
    out = os.path.join(RESULTS, "zero_downtime.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print()
    print("slipway zero-downtime benchmark: %d clients, %d deploys, %.1fs" % (CLIENTS, len(deploys), duration))
    print("requests=%d failed=%d" % (load.requests, failed))
    print("  ok (200):            %d" % load.ok)
    print("  non-200 responses:   %d %s" % (sum(load.non200.values()), load.non200 or ""))
    print("  connection errors:   %d %s" % (sum(load.errors.values()), load.errors or ""))
    print("  stale body after push returned (info): %d" % load.stale)
    print("  unknown body (info): %d" % load.unknown_body)
    print("  connections opened:  %d" % load.connections)
    print("  throughput:          %s req/s" % result["requests_per_s"])
    print("  latency p50/p99/max: %s / %s / %s s" % (result["latency_s"]["p50"], result["latency_s"]["p99"],
                                                     result["latency_s"]["max"]))
    ps = result["push_s"]
    print("  push time median/min/max: %s / %s / %s s; failed deploys: %d" % (
        ps["median"], ps["min"], ps["max"], deploy_failures))
    if load.samples:
        print("  first failures:")
        for s in load.samples[:10]:
            print("    t=%.3fs (%s) %s: %s" % (s["t"], s["phase"], s["kind"], s["detail"].strip()[:160]))
    if result["server_warnings"]:
        print("  server WARN/ERROR lines (%d):" % len(result["server_warnings"]))
        for line in result["server_warnings"][:10]:
            print("    " + line[:300])
    print("written: %s" % out)
    return 1 if (failed or deploy_failures) else 0


if __name__ == "__main__":
    sys.exit(main())
