"""Shared helpers for slipway's benchmarks (bench/deploy.sh, bench/zero_downtime.py).

Used as a module by zero_downtime.py and as a small CLI by deploy.sh:

  python3 bench/lib.py push --repo DIR --remote URL --http URL --host H --expect BODY
      Poll GET HTTP (Host: H) every 10 ms while running `git push REMOTE main`
      in REPO; print one JSON object: push exit code, seconds until the push
      returned, seconds until the proxy first answered 200 with BODY, and any
      non-200 answers / connection errors the poller saw meanwhile.

  python3 bench/lib.py summary RUNS.jsonl OUT.json
      Print the summary table of deploy.sh's runs and write it as JSON.

Only the standard library: the benchmarks run with the system python3.
"""

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

POLL_INTERVAL = 0.010


# ---------------------------------------------------------------- HTTP

def prepare_run(root, binary, results, prefix):
    """The start every benchmark shares: build the release binary when it
    is missing, make the results dir and a shared uv cache, turn SIGTERM and
    SIGINT into a normal exit (so `finally` blocks stop the server), and
    make a work dir that app users can reach (as root, slipway runs each app
    as its own user). Returns (server environment, work dir)."""
    if not os.access(binary, os.X_OK):
        print("building %s ..." % binary, file=sys.stderr)
        subprocess.run(["cargo", "build", "--release"], cwd=root, check=True)
    os.makedirs(results, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("UV_CACHE_DIR", os.path.join(results, ".cache", "uv"))
    os.makedirs(env["UV_CACHE_DIR"], exist_ok=True)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    work = tempfile.mkdtemp(prefix=prefix)
    os.chmod(work, 0o711)
    return env, work


def split_http(url):
    u = urlsplit(url)
    return u.hostname, u.port or 80


def get(http_url, host, timeout=5.0):
    """One GET / through the proxy on a fresh connection: (status, body)."""
    h, p = split_http(http_url)
    conn = http.client.HTTPConnection(h, p, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def describe_error(e):
    return "%s: %s" % (type(e).__name__, e)


# ---------------------------------------------------------------- push + poll

def push_and_wait(repo, remote, http_url, host, expect, timeout=600.0, log_path=None):
    """Time one deploy: from just before `git push` to the first 200 with `expect`.

    The poller runs in a thread, started (and given a first request) before
    the clock starts, so its start-up cost is not measured. Each poll is a
    fresh connection; between polls it sleeps 10 ms.
    """
    expect_b = expect.encode() if isinstance(expect, str) else expect
    state = {"served_at": None, "polls": 0, "non200": {}, "errors": {}, "other_bodies": 0}
    stop = threading.Event()
    started = threading.Event()
    t0_box = {}

    def poller():
        first = True
        while not stop.is_set():
            try:
                status, body = get(http_url, host, timeout=5.0)
                now = time.monotonic()
                if "t0" in t0_box:
                    state["polls"] += 1
                    if status == 200 and body == expect_b:
                        state["served_at"] = now
                        return
                    if status != 200:
                        state["non200"][str(status)] = state["non200"].get(str(status), 0) + 1
                    else:
                        state["other_bodies"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is data here
                if "t0" in t0_box:
                    k = describe_error(e)
                    state["errors"][k] = state["errors"].get(k, 0) + 1
            if first:
                first = False
                started.set()
            time.sleep(POLL_INTERVAL)

    th = threading.Thread(target=poller, daemon=True)
    th.start()
    started.wait(10)

    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    t0 = time.monotonic()
    t0_box["t0"] = t0
    try:
        proc = subprocess.run(
            ["git", "push", "--porcelain", remote, "main"],
            cwd=repo, stdout=log, stderr=log, timeout=timeout,
        )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        if log_path:
            log.close()
    push_s = time.monotonic() - t0
    served_s = None
    if rc == 0:
        # The push returned: the release is live; wait (bounded) for the poller.
        deadline = time.monotonic() + 30.0
        while th.is_alive() and time.monotonic() < deadline:
            th.join(0.05)
    stop.set()
    th.join(6)
    if state["served_at"] is not None:
        served_s = state["served_at"] - t0
    env = None
    if log_path:
        env = env_outcome(log_path)
    return {
        "push_rc": rc,
        "push_s": round(push_s, 4),
        "served_s": None if served_s is None else round(served_s, 4),
        "polls": state["polls"],
        "poll_non200": state["non200"],
        "poll_errors": state["errors"],
        "poll_other_bodies": state["other_bodies"],
        "env": env,
    }


def env_outcome(log_path):
    """From the last push's output: did the deploy build or reuse an environment?"""
    try:
        with open(log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    last = text.rsplit("-----> deploying", 1)[-1]
    if "reusing environment" in last:
        return "reused"
    if "building environment" in last:
        return "built"
    return None


# ---------------------------------------------------------------- server (for python scripts)

class Server:
    """A slipway daemon on ephemeral ports, stopped with SIGTERM (and waited for)."""

    def __init__(self, binary, data, stderr_path, env=None, ready_timeout=60.0,
                 api="127.0.0.1:0", http="127.0.0.1:0", ssh="127.0.0.1:0", on_spawn=None):
        """Start `slipway server` and wait for its ready line.

        api/http/ssh: listen addresses (HOST:PORT; port 0 = ephemeral). To
        restart a daemon on the same ports, pass `host_port(old.api)` etc.
        on_spawn(server) is called right after the process is spawned, before
        waiting for readiness, so a caller can track it for cleanup.
        """
        self.data = data
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "server", "--data", data, "--api", api, "--http", http,
             "--ssh", ssh, "--domain", "localhost"],
            stdout=subprocess.PIPE, stderr=self._err, env=env,
        )
        self.api = self.http = None
        if on_spawn is not None:
            on_spawn(self)
        line = self._read_ready(ready_timeout)
        fields = dict(kv.split("=", 1) for kv in line.split()[2:])
        self.api, self.http, self.ssh = fields["api"], fields["http"], fields.get("ssh")
        with open(os.path.join(data, "admin-token")) as f:
            self.token = f.read().strip()

    def _read_ready(self, timeout):
        box = {}

        def reader():
            box["line"] = self.proc.stdout.readline().decode()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        line = box.get("line", "")
        if not line.startswith("slipway ready "):
            self.stop()
            raise RuntimeError("server did not become ready (stdout: %r); see %s" % (line, self.stderr_path))
        return line.strip()

    def git_remote(self, app):
        h = urlsplit(self.api)
        return "http://git:%s@%s:%d/git/%s.git" % (self.token, h.hostname, h.port, app)

    def kill(self):
        """SIGKILL the daemon only (its apps keep running) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()
        return self.proc.returncode

    def stop(self, timeout=60.0):
        """SIGTERM, wait; SIGKILL (and the app process groups it recorded) as a last resort."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                kill_recorded_groups(self.data)
        self._err.close()
        return self.proc.returncode


def wrk_p99_ms(out):
    """wrk's 99th percentile latency, in milliseconds. wrk prints it with
    the unit it fits (`812.00us`, `4.31ms`, `1.20s`, `2.05m`, `1.00h`): an
    overloaded run reaches seconds and minutes, which a parser of us/ms
    alone failed on."""
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    if not m:
        raise ValueError("no 99%% latency in wrk output:\n" + out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}[m.group(2)]
    return float(m.group(1)) * scale


def free_port():
    """A loopback port free right now (for a server the bench starts)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def host_port(url):
    """'http://127.0.0.1:8080' -> '127.0.0.1:8080' (for restarting on the same address)."""
    h, p = split_http(url)
    return "%s:%d" % (h, p)


def recorded_groups(data):
    """(pid, start) of app process groups the daemon recorded under DATA/run."""
    out = []
    run = os.path.join(data, "run")
    if not os.path.isdir(run):
        return out
    for app in os.listdir(run):
        d = os.path.join(run, app)
        if not os.path.isdir(d):
            continue
        for f in os.listdir(d):
            try:
                with open(os.path.join(d, f)) as fh:
                    pid = int(fh.read().split()[0])
                out.append(pid)
            except (OSError, ValueError, IndexError):
                pass
    return out


def kill_recorded_groups(data):
    for pid in recorded_groups(data):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def leftover_groups(data):
    """Recorded app process groups still alive (after the daemon stopped)."""
    alive = []
    for pid in recorded_groups(data):
        try:
            os.killpg(pid, 0)
            alive.append(pid)
        except OSError:
            pass
    return alive


# ---------------------------------------------------------------- repo helpers

def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def init_app_repo(src, dst):
    """Copy the example app into a fresh git repo with one commit on main."""
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    git(dst, "init", "-q", "-b", "main")
    git(dst, "add", "-A")
    commit(dst, "initial")


def commit(repo, msg):
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", msg)


def set_greeting(repo, greeting):
    """Change only app.py: the default greeting (the body is `hello GREETING`)."""
    p = os.path.join(repo, "app.py")
    with open(p) as f:
        src = f.read()
    marker = 'os.environ.get("GREETING", "'
    i = src.index(marker) + len(marker)
    j = src.index('"', i)
    with open(p, "w") as f:
        f.write(src[:i] + greeting + src[j:])
    return "hello %s\n" % greeting

def write_result(results, name, out):
    """Write a bench's figures to RESULTS/NAME.json and print them."""
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, name + ".json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


# ---------------------------------------------------------------- provenance

def build_info(root, binary):
    """Which slipway was measured: the checkout's commit, whether src/ was dirty, the binary's mtime."""
    def out(*args):
        try:
            return subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    try:
        mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(binary).st_mtime))
    except OSError:
        mtime = None
    return {"commit": out("git", "rev-parse", "--short", "HEAD") or None,
            "src_dirty": bool(out("git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
            "binary": binary, "binary_mtime": mtime}


# ---------------------------------------------------------------- stats

def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": round(statistics.median(xs), 4),
            "min": round(min(xs), 4), "max": round(max(xs), 4)}


def summary(runs_path, out_path):
    runs = [json.loads(l) for l in open(runs_path) if l.strip()]
    groups = {}
    for r in runs:
        groups.setdefault(r["kind"], []).append(r)
    titles = {
        "first": "(a) first deploy, fresh server + data dir, warm uv cache",
        "code": "(b) code-only redeploy (app.py changed)",
        "deps": "(c) redeploy after requirements.txt change, warm uv cache",
        "compiled": "(d) dependency change, compiled wheel (uWSGI) from the cache",
    }
    result = {"unit": "seconds", "measured": "from just before `git push` to the first 200 with the new body via the proxy",
              "results": {}}
    failed = 0
    for kind in ("first", "code", "deps", "compiled"):
        rs = groups.get(kind, [])
        bad = [r for r in rs if r["push_rc"] != 0 or r["served_s"] is None]
        failed += len(bad)
        result["results"][kind] = {
            "title": titles[kind],
            "runs": len(rs),
            "failed": len(bad),
            "served_s": stats([r["served_s"] for r in rs]),
            "push_s": stats([r["push_s"] for r in rs]),
            "samples_served_s": [r["served_s"] for r in rs],
            "envs": [r.get("env") for r in rs],
            "poll_non200": sum(sum(r["poll_non200"].values()) for r in rs),
            "poll_errors": sum(sum(r["poll_errors"].values()) for r in rs),
        }
    result["failed_deploys"] = failed
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result["slipway"] = build_info(root, os.path.join(root, "target", "release", "slipway"))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print()
    print("slipway deploy benchmark (seconds; push start -> new body served through the proxy)")
    hdr = "%-58s %4s %8s %8s %8s %10s %6s" % ("scenario", "n", "median", "min", "max", "push med", "fail")
    print(hdr)
    print("-" * len(hdr))
    fmt = lambda v: "-" if v is None else "%.3f" % v  # noqa: E731
    for kind in ("first", "code", "deps", "compiled"):
        r = result["results"][kind]
        s, p = r["served_s"], r["push_s"]
        print("%-58s %4d %8s %8s %8s %10s %6d" % (r["title"], r["runs"], fmt(s["median"]), fmt(s["min"]),
                                                   fmt(s["max"]), fmt(p["median"]), r["failed"]))
    print()
    for kind in ("first", "code", "deps", "compiled"):
        r = result["results"][kind]
        print("%-5s samples: %s  envs: %s  poll non-200: %d  poll conn errors: %d" % (
            kind, ", ".join(fmt(x) for x in r["samples_served_s"]), ",".join(str(e) for e in r["envs"]),
            r["poll_non200"], r["poll_errors"]))
    print("\nwritten: %s" % out_path)
    return 1 if failed else 0


# ---------------------------------------------------------------- CLI

def main(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push")
    p.add_argument("--repo", required=True)
    p.add_argument("--remote", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--expect", required=True, help="expected body; \\n is unescaped")
    p.add_argument("--kind", default="")
    p.add_argument("--log")
    p.add_argument("--timeout", type=float, default=600)
    s = sub.add_parser("summary")
    s.add_argument("runs")
    s.add_argument("out")
    g = sub.add_parser("greeting")
    g.add_argument("repo")
    g.add_argument("greeting")
    a = ap.parse_args(argv)
    if a.cmd == "push":
        r = push_and_wait(a.repo, a.remote, a.http, a.host, a.expect.replace("\\n", "\n"), a.timeout, a.log)
        r["kind"] = a.kind
        print(json.dumps(r))
        return 0 if (r["push_rc"] == 0 and r["served_s"] is not None) else 1
    if a.cmd == "summary":
        return summary(a.runs, a.out)
    if a.cmd == "greeting":
        sys.stdout.write(set_greeting(a.repo, a.greeting))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
