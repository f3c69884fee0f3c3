#!/usr/bin/env python3
"""Containers (issue 11): deploy times of a Dockerfile app, through the proxy.

  bench/containers.py          # RUNS=5 DEPLOYS=20 CLIENTS=8 by default

Needs a Docker engine and the base image (`slipway images import-base`,
run here first if missing), root (the daemon runs apps as their own users),
git and network access for pip inside image builds. Every figure is from
just before `git push` to the first GET / through slipway's proxy that
answers 200 with the new body (bench/lib.py push_and_wait), median of RUNS:

  code_hup      code-only push, web reloads in place (signal:HUP)
  code_replace  code-only push, new containers from the same image (replace)
  container     push that changes requirements.txt: image rebuilt (layer
                cache warm for the base, pip downloads again)
  baked         the same code-only change deployed as Dokku/Kamal do: the
                Dockerfile COPYs the tree, so the image is rebuilt with the
                code baked in (dependency layer cached) and replaced
  under_load    failed requests during DEPLOYS code deploys (signal:HUP)
                with CLIENTS keep-alive clients

The ratio baked/code_hup is the speed-up of a code deploy over a rebuild,
measured in the same run on the same machine.
"""

import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

RUNS = int(os.environ.get("RUNS", "5"))
DEPLOYS = int(os.environ.get("DEPLOYS", "20"))
CLIENTS = int(os.environ.get("CLIENTS", "8"))
BINARY = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.path.join(BENCH, "results")

DEPS = "FROM slipway/python:bookworm\n" \
    "COPY .slipway/ca.crt /etc/build-ca.crt\n" \
    "COPY requirements.txt /opt/requirements.txt\n" \
    "RUN python3 -m venv /opt/venv && SSL_CERT_FILE=/etc/build-ca.crt PIP_CERT=/etc/build-ca.crt " \
    "/opt/venv/bin/pip install --no-cache-dir -q -r /opt/requirements.txt\n" \
    "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
# Dokku/Kamal style: the code is part of the image.
BAKED = DEPS + "COPY . /app\n"

APP = """import os
def app(environ, start_response):
    body = ('hello %s\\n' % os.environ.get('GREETING', 'GREETING_TOKEN')).encode()
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
    return [body]
"""


def write(repo, path, text):
    with open(os.path.join(repo, path), "w") as f:
        f.write(text)


def make_repo(work, name, dockerfile, reload):
    repo = os.path.join(work, name)
    os.makedirs(repo)
    write(repo, "Dockerfile", dockerfile)
    write(repo, "requirements.txt", "gunicorn==23.0.0\n")
    write(repo, "Procfile", "web: gunicorn app:app --bind 0.0.0.0:$PORT --workers 1\n")
    write(repo, "slipway.toml", '[processes.web]\nreload = "%s"\n' % reload)
    write(repo, "app.py", APP.replace("GREETING_TOKEN", "start"))
    lib.git(repo, "init", "-q", "-b", "main")
    lib.commit(repo, "initial")
    return repo


def greet(repo, token):
    write(repo, "app.py", APP.replace("GREETING_TOKEN", token))
    lib.commit(repo, token)
    return "hello %s\n" % token


def timed(server, repo, app, expect, log):
    r = lib.push_and_wait(repo, server.git_remote(app), server.http, app + ".localhost", expect, log_path=log)
    if r["push_rc"] != 0 or r["served_s"] is None:
        raise RuntimeError("deploy of %s failed; see %s" % (app, log))
    return r["served_s"]


def med(xs):
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3), "n": len(xs)}


def under_load(server, repo, app, log):
    host, port = lib.split_http(server.http)
    stop = threading.Event()
    counts = {"requests": 0, "failed": 0}
    failures = {}
    lock = threading.Lock()

    def client():
        conn = None
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Host": app + ".localhost"})
                r = conn.getresponse()
                r.read()
                with lock:
                    counts["requests"] += 1
                    if r.status != 200:
                        counts["failed"] += 1
                        failures[str(r.status)] = failures.get(str(r.status), 0) + 1
                if r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is data
                with lock:
                    counts["requests"] += 1
                    counts["failed"] += 1
                    k = lib.describe_error(e)
                    failures[k] = failures.get(k, 0) + 1
                conn.close()
                conn = None

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for i in range(DEPLOYS):
            try:
                timed(server, repo, app, greet(repo, "load%d" % i), log)
            except RuntimeError:
                # A rejected deploy leaves the old release serving: count
                # it, keep the load on, go on.
                counts["rejected_deploys"] = counts.get("rejected_deploys", 0) + 1
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    return {"deploys": DEPLOYS, "clients": CLIENTS, **counts, "failures": failures}


def main():
    if not shutil.which("docker") and not os.path.exists("/var/run/docker.sock"):
        sys.exit("no Docker engine")
    env, work = lib.prepare_run(ROOT, BINARY, RESULTS, "slipway-bench-containers-")
    logs = os.path.join(RESULTS, "containers-logs")
    os.makedirs(logs, exist_ok=True)
    subprocess.run([BINARY, "images", "import-base"], check=True, stdout=subprocess.DEVNULL)
    data = os.path.join(work, "data")
    server = lib.Server(BINARY, data, os.path.join(logs, "server.err"), env=env)
    out = {"build": lib.build_info(ROOT, BINARY), "runs": RUNS}
    try:
        hup = make_repo(work, "hup", DEPS, "signal:HUP")
        rep = make_repo(work, "rep", DEPS, "replace")
        baked = make_repo(work, "baked", BAKED, "replace")
        for name, repo in (("hup", hup), ("rep", rep), ("baked", baked)):
            timed(server, repo, name, "hello start\n", os.path.join(logs, name + ".log"))  # warm-up

        res = {"code_hup": [], "code_replace": [], "container": [], "baked": []}
        for i in range(RUNS):
            res["code_hup"].append(timed(server, hup, "hup", greet(hup, "h%d" % i), os.path.join(logs, "hup.log")))
            res["code_replace"].append(timed(server, rep, "rep", greet(rep, "r%d" % i), os.path.join(logs, "rep.log")))
            res["baked"].append(timed(server, baked, "baked", greet(baked, "b%d" % i), os.path.join(logs, "baked.log")))
            # A dependency change goes with a code change, so the new body
            # proves the rebuilt image is the one serving (the same body
            # would be "served" by the old release at once).
            with open(os.path.join(rep, "requirements.txt"), "a") as f:
                f.write("# bench %d %f\n" % (i, time.time()))
            expect = greet(rep, "d%d" % i)
            res["container"].append(timed(server, rep, "rep", expect, os.path.join(logs, "rep.log")))
        for k, xs in res.items():
            out[k] = med(xs)
        out["baked_over_code_hup"] = round(out["baked"]["median"] / out["code_hup"]["median"], 1)
        out["baked_over_code_replace"] = round(out["baked"]["median"] / out["code_replace"]["median"], 1)
        with open(os.path.join(RESULTS, "containers.json"), "w") as f:
            json.dump(out, f, indent=2)
        out["under_load"] = under_load(server, hup, "hup", os.path.join(logs, "load.log"))
    finally:
        server.stop()
        # The images this run's daemon built, found by its label (what
        # slipway::container::server_id computes), and nobody else's.
        sid = hashlib.sha256(os.path.realpath(data).encode()).hexdigest()[:16]
        ids = subprocess.run(["docker", "images", "-q", "--filter", "label=slipway.server=" + sid],
                             capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "image", "rm", "-f", *sorted(set(ids))], stdout=subprocess.DEVNULL)
        # Each app's network too (its containers went with the daemon).
        nets = subprocess.run(["docker", "network", "ls", "-q", "--filter", "label=slipway.server=" + sid],
                              capture_output=True, text=True).stdout.split()
        if nets:
            subprocess.run(["docker", "network", "rm", *nets], stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    lib.write_result(RESULTS, "containers", out)


if __name__ == "__main__":
    main()
