#!/usr/bin/env python3
"""Tenancy benchmark for slipway (issue 10): what one app's output storms
cost the daemon and the other apps.

Three apps on one daemon (release binary, ephemeral ports, temp data dir):
`calm` (the hello example), `noisy` (hello plus `spam: exec yes` and `big`,
a process printing 64 KiB lines without end) and nothing else. For each
storm, for STORM_S seconds (default 10): the daemon's VmRSS (peak), its
open descriptors (peak), and the calm app's success rate (a keep-alive GET
/ every 20 ms through the proxy; 200 with its body counts as success).

  baseline   nothing but the noisy processes' own output (always on)
  logs       40 concurrent `GET /api/apps/noisy/logs?n=10000` read slowly
             (16 KiB per 20 ms each)
  run        a one-off `yes` (app-scoped token) whose client reads 1 KiB
             per 20 ms

  floods     2,000 idle connections (no byte sent) to each listener
             (proxy, API, SSH) from 127.0.0.2-5, and 700 requests to the
             proxy whose 1 MB bodies never come, from 127.0.0.6; the
             daemon runs with a descriptor limit of 2,048 (FLOOD_NOFILE),
             as in the issue. During it, a code change to `calm` is pushed
             and its deploy timed.

Prints a table and writes bench/results/tenancy.json. Env: STORM_S,
SLIPWAY_BIN (the binary to measure; default target/release/slipway),
FLOOD_NOFILE.
"""

import http.client
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

# SLIPWAY_BIN: measure another build (e.g. one under CARGO_TARGET_DIR).
BIN = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.path.join(BENCH, "results")
STORM_S = float(os.environ.get("STORM_S", "10"))
FLOOD_NOFILE = int(os.environ.get("FLOOD_NOFILE", "2048"))
IDLE_PER_LISTENER = 2000
SLOW_BODIES = 700


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def slow_reader(api, token, method, path, body, chunk, seconds, out):
    host, port = lib.split_http(api)
    try:
        s = socket.create_connection((host, port), timeout=5)
        req = ("%s %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s") % (
            method, path, host, port, token, len(body), body)
        s.sendall(req.encode())
        s.settimeout(2)
        end = time.monotonic() + seconds
        got = 0
        while time.monotonic() < end:
            try:
                b = s.recv(chunk)
                if not b:
                    break
                got += len(b)
            except socket.timeout:
                pass
            time.sleep(0.02)
        s.close()
        out.append(got)
    except OSError as e:
        out.append("error: %s" % e)


def connect_from(src, target, timeout=2.0):
    host, port = lib.split_http(target)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect((host, port))
        return s
    except OSError:
        s.close()
        return None


def measure(server, attack):
    """Run attack() in a thread for STORM_S; sample the daemon and the calm app."""
    pid = server.proc.pid
    stop = threading.Event()
    t = threading.Thread(target=attack, args=(stop,), daemon=True)
    t.start()
    h, p = lib.split_http(server.http)
    conn = None
    ok = total = 0
    peak_rss = peak_fds = 0
    end = time.monotonic() + STORM_S
    while time.monotonic() < end:
        peak_rss = max(peak_rss, rss_mib(pid))
        peak_fds = max(peak_fds, fds(pid))
        total += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection(h, p, timeout=5)
            conn.request("GET", "/", headers={"Host": "calm.localhost"})
            r = conn.getresponse()
            body = r.read()
            if r.status == 200 and b"hello" in body:
                ok += 1
        except (OSError, http.client.HTTPException):
            conn = None
        time.sleep(0.02)
    stop.set()
    t.join(STORM_S + 10)
    return {"peak_rss_mib": round(peak_rss, 1), "peak_fds": peak_fds, "calm_ok": ok, "calm_total": total,
            "calm_success": round(ok / total, 4) if total else None}


def main():
    env, work = lib.prepare_run(ROOT, BIN, RESULTS, "slipway-tenancy-")
    # The bench holds ~6,700 sockets; the daemon gets the limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    wrapper = os.path.join(work, "slipway-nofile")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nulimit -n %d\nexec %s \"$@\"\n" % (FLOOD_NOFILE, BIN))
    os.chmod(wrapper, 0o755)
    server = None
    result = {"build": lib.build_info(ROOT, BIN), "storm_s": STORM_S}
    try:
        data = os.path.join(work, "data")
        server = lib.Server(wrapper, data, os.path.join(work, "server.log"), env=env)
        example = os.path.join(ROOT, "examples", "hello-wsgi")
        for app in ("calm", "noisy"):
            repo = os.path.join(work, app)
            lib.init_app_repo(example, repo)
            if app == "noisy":
                with open(os.path.join(repo, "Procfile"), "a") as f:
                    f.write("spam: exec yes\nbig: exec python3 big.py\n")
                with open(os.path.join(repo, "big.py"), "w") as f:
                    f.write("import sys\nwhile True:\n    sys.stdout.write('x' * 65536 + '\\n')\n")
                lib.commit(repo, "noisy")
            r = lib.push_and_wait(repo, server.git_remote(app), server.http, app + ".localhost", "hello world\n")
            if r["push_rc"] != 0:
                raise RuntimeError("deploy of %s failed: %s" % (app, r))
        result["idle_rss_mib"] = round(rss_mib(server.proc.pid), 1)
        token = subprocess.run([BIN, "tokens", "create", "bench-noisy", "--app", "noisy"],
                               env=dict(env, SLIPWAY_URL=server.api, SLIPWAY_TOKEN=server.token),
                               capture_output=True, text=True).stdout.strip().splitlines()[-1].strip()

        def baseline(stop):
            stop.wait()

        def logs(stop):
            out = []
            ts = [threading.Thread(target=slow_reader, args=(server.api, server.token, "GET",
                                                            "/api/apps/noisy/logs?n=10000", "", 16384, STORM_S, out))
                  for _ in range(40)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        def run(stop):
            slow_reader(server.api, token, "POST", "/api/apps/noisy/run", '{"command":"yes"}', 1024, STORM_S, [])

        def floods(stop):
            held = []
            made = {"idle": 0, "slow": 0}
            for target in (server.http, server.api, server.ssh.replace("ssh://", "http://")):
                for i in range(IDLE_PER_LISTENER):
                    s = connect_from("127.0.0.%d" % (2 + i % 4), target)
                    if s is not None:
                        held.append(s)
                        made["idle"] += 1
            head = b"POST / HTTP/1.1\r\nHost: calm.localhost\r\nContent-Length: 1000000\r\n\r\nx"
            for _ in range(SLOW_BODIES):
                s = connect_from("127.0.0.6", server.http)
                if s is not None:
                    try:
                        s.sendall(head)
                        held.append(s)
                        made["slow"] += 1
                    except OSError:
                        s.close()
            result["flood_connections"] = made
            repo = os.path.join(work, "calm")
            with open(os.path.join(repo, "app.py")) as f:
                code = f.read()
            with open(os.path.join(repo, "app.py"), "w") as f:
                f.write(code.replace('"world"', '"flood"'))
            lib.commit(repo, "during the flood")
            result["flood_push"] = lib.push_and_wait(repo, server.git_remote("calm"), server.http,
                                                     "calm.localhost", "hello flood\n", timeout=120,
                                                     log_path=os.path.join(RESULTS, "tenancy-flood-push.log"))
            stop.wait()
            for s in held:
                s.close()

        result["storms"] = {}
        for name, attack in (("baseline (yes + 64 KiB lines)", baseline), ("40 slow logs -n 10000", logs),
                             ("slow one-off yes", run), ("floods: 6,000 idle + 700 slow bodies", floods)):
            result["storms"][name] = measure(server, attack)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(RESULTS, "tenancy.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("idle daemon RSS with both apps: %s MiB" % result.get("idle_rss_mib"))
    print("%-32s %14s %10s %14s" % ("storm (%ds)" % STORM_S, "peak RSS MiB", "peak fds", "calm success"))
    for name, m in result.get("storms", {}).items():
        print("%-32s %14s %10s %9d/%d" % (name, m["peak_rss_mib"], m["peak_fds"], m["calm_ok"], m["calm_total"]))
    if "flood_connections" in result:
        fp = result.get("flood_push", {})
        print("floods: %(idle)d idle and %(slow)d slow-body connections made" % result["flood_connections"]
              + "; push during the flood: rc=%s, served in %s s" % (fp.get("push_rc"), fp.get("served_s")))


if __name__ == "__main__":
    main()
