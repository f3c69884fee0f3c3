#!/usr/bin/env python3
"""Daemon restarts under load (issue 14 #1): the SIGUSR2 hand-over against
the stop-and-start restart it replaces, in one run.

  bench/upgrade.py            # RESTARTS=10 BASELINE=3 CLIENTS=8

Three apps (examples/hello-wsgi) on one daemon (release binary, ephemeral
ports, temp data dir). CLIENTS keep-alive clients spread over the three
apps send GET / through the proxy without pause. Then:

  handover   RESTARTS times: SIGUSR2 to the daemon named by DIR/lock, wait
             until the old one has exited and the new one holds the lock,
             a second of load in between. App pids are compared before and
             after (`slipway ps --json`).
  kill9      once: SIGKILL to the daemon, then `slipway server` again at
             once on the same ports (systemd would first wait RestartSec):
             failed requests, time to ready, app pids unchanged (adopted).
  restart    BASELINE times: SIGTERM, then `slipway server` again on the
             same ports and data dir (what an upgrade cost before).

Per mode: requests, failed requests (non-200, errors), the longest stall
(the slowest request, connection set-up included), and the time of one
restart (signal to the new daemon ready / holding the lock). Writes
bench/results/upgrade.json. Env: SLIPWAY_BIN (default target/release/slipway).
"""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

BINARY = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.environ.get("RESULTS", os.path.join(BENCH, "results"))
RESTARTS = int(os.environ.get("RESTARTS", "10"))
BASELINE = int(os.environ.get("BASELINE", "3"))
CLIENTS = int(os.environ.get("CLIENTS", "8"))
APPS = ("up1", "up2", "up3")


class Load:
    """CLIENTS keep-alive clients; counts and the longest request, per window."""

    def __init__(self, http_url):
        self.host, self.port = lib.split_http(http_url)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.reset()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.requests, self.failed, self.longest, self.failures = 0, 0, 0.0, {}

    def window(self):
        with self.lock:
            out = {"requests": self.requests, "failed": self.failed, "longest_stall_ms": round(self.longest * 1000, 1),
                   "failures": dict(self.failures)}
        self.reset()
        return out

    def client(self, i):
        app = APPS[i % len(APPS)]
        conn = None
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/", headers={"Host": app + ".localhost"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
                why = str(r.status)
                if r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is data
                ok, why = False, lib.describe_error(e)
                if conn is not None:
                    conn.close()
                conn = None
            took = time.monotonic() - t0
            with self.lock:
                self.requests += 1
                self.longest = max(self.longest, took)
                if not ok:
                    self.failed += 1
                    self.failures[why] = self.failures.get(why, 0) + 1

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def lock_pid(data):
    with open(os.path.join(data, "lock")) as f:
        return int(f.read().strip() or 0)


def app_pids(env, api, token):
    cenv = dict(env, SLIPWAY_URL=api, SLIPWAY_TOKEN=token)
    pids = {}
    for app in APPS:
        out = subprocess.run([BINARY, "ps", app, "--json"], env=cenv, capture_output=True, text=True, check=True).stdout
        pids[app] = sorted(p.get("pid") for p in json.loads(out))
    return pids


def main():
    env, work = lib.prepare_run(ROOT, BINARY, RESULTS, "slipway-upgrade-bench-")
    data = os.path.join(work, "data")
    err = os.path.join(work, "server.err")
    server = lib.Server(BINARY, data, err, env=env)
    api, http_url, token = server.api, server.http, server.token
    successor = None
    load = None
    out = {"build": lib.build_info(ROOT, BINARY), "clients": CLIENTS, "apps": len(APPS)}
    try:
        for app in APPS:
            repo = os.path.join(work, app)
            lib.init_app_repo(os.path.join(ROOT, "examples", "hello-wsgi"), repo)
            r = lib.push_and_wait(repo, server.git_remote(app), http_url, app + ".localhost", "hello world\n")
            if r["push_rc"] != 0:
                raise RuntimeError("deploy of %s failed; see %s" % (app, err))
        load = Load(http_url)
        time.sleep(2)
        load.window()

        before = app_pids(env, api, token)
        handovers = []
        for _ in range(RESTARTS):
            old = successor or server.proc.pid
            t0 = time.monotonic()
            os.kill(old, signal.SIGUSR2)
            if old == server.proc.pid:
                server.proc.wait(90)
            else:
                deadline = time.monotonic() + 90
                while alive(old) and time.monotonic() < deadline:
                    time.sleep(0.01)
            new = lock_pid(data)
            if new == old or not alive(new):
                raise RuntimeError("no daemon took over; see %s" % err)
            successor = new
            handovers.append(time.monotonic() - t0)
            time.sleep(1)
        out["handover"] = load.window()
        out["handover"]["restarts"] = RESTARTS
        out["handover"]["handover_s_median"] = round(sorted(handovers)[len(handovers) // 2], 3)
        out["handover"]["app_pids_unchanged"] = app_pids(env, api, token) == before

        # What a crash costs: kill -9, then a new daemon at once (systemd
        # would wait RestartSec first). The apps should be adopted.
        before = app_pids(env, api, token)
        load.window()
        t0 = time.monotonic()
        os.kill(successor, signal.SIGKILL)
        while alive(successor):
            time.sleep(0.01)
        successor = None
        server = lib.Server(BINARY, data, err, env=env, api=lib.host_port(api), http=lib.host_port(http_url),
                            ssh="127.0.0.1:0")
        out["kill9"] = {"restart_s": round(time.monotonic() - t0, 3)}
        time.sleep(1)
        out["kill9"].update(load.window())
        out["kill9"]["app_pids_unchanged"] = app_pids(env, api, token) == before

        # The baseline: stop, start again on the same ports.
        server.stop()
        load.window()
        restarts = []
        for i in range(BASELINE):
            t0 = time.monotonic()
            if i > 0:
                server.stop()
            server = lib.Server(BINARY, data, err, env=env, api=lib.host_port(api), http=lib.host_port(http_url),
                                ssh="127.0.0.1:0")
            restarts.append(time.monotonic() - t0)
            time.sleep(1)
        out["restart"] = load.window()
        out["restart"]["restarts"] = BASELINE
        out["restart"]["restart_s_median"] = round(sorted(restarts)[len(restarts) // 2], 3)
    finally:
        if load is not None:
            load.close()
        if successor is not None and alive(successor):
            os.kill(successor, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while alive(successor) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    lib.write_result(RESULTS, "upgrade", out)


if __name__ == "__main__":
    main()
