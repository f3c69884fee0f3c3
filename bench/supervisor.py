#!/usr/bin/env python3
"""Supervisor benchmark for slipway: crash recovery, daemon restart, daemon memory.

Three figures, each through slipway's proxy (Host: APP.localhost) with a
poller that does a fresh-connection GET / every 5 ms:

 (1) web process killed: `kill -9` of the app's web process (the pid
     `slipway ps APP --json` reports: gunicorn's master, which bash execs in
     place) until the proxy answers 200 again to a request *sent after* the
     kill. 10 trials (KILL_TRIALS); median/min/max. Failed requests in
     between are counted: with one instance they are expected. Before each
     kill the process has run >= 11 s (`uptime_secs`), because the supervisor
     treats a run shorter than 10 s as a quick failure (doubling backoff,
     crash loop after 5): each trial measures the recovery of a healthy
     process. Goal (issue): under 1 s.
 (2) daemon killed: `kill -9` of `slipway server`, immediately started again
     on the same data dir and the same api/http ports, until the proxy
     answers 200. 5 trials (DAEMON_TRIALS); median/min/max. After each: the
     app has exactly one web instance (`ps --json`), its pid is new, the
     previous master and its process group are gone, and exactly one
     gunicorn master runs from the app's release directory (/proc scan).
 (3) daemon memory: VmRSS of the `slipway server` process only, on a fresh
     server with 0 apps, after deploying 50 hello apps h1..h50 (MEM_APPS) by
     git push, and after 20 s idle (IDLE_S). Also threads, open fds, VmHWM,
     and the apps' total RSS/PSS (for scale). Goal: under 30 MB with 50 apps.

Prints a summary table; writes bench/results/supervisor.json; logs go to
bench/results/supervisor-logs/. Exits 1 if a trial failed (never served
again, wrong process count, deploy failed), 0 otherwise (goals are reported,
not enforced). Env: KILL_TRIALS, DAEMON_TRIALS, MEM_APPS, IDLE_S, PHASES
(comma list of kill,daemon,memory; default all), UV_CACHE_DIR.
"""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

BIN = os.path.join(ROOT, "target", "release", "slipway")
RESULTS = os.path.join(BENCH, "results")
LOGDIR = os.path.join(RESULTS, "supervisor-logs")
APP_SRC = os.path.join(ROOT, "examples", "hello-wsgi")
APP = "hello"
KILL_TRIALS = int(os.environ.get("KILL_TRIALS", "10"))
DAEMON_TRIALS = int(os.environ.get("DAEMON_TRIALS", "5"))
MEM_APPS = int(os.environ.get("MEM_APPS", "50"))
IDLE_S = float(os.environ.get("IDLE_S", "20"))
PHASES = set(os.environ.get("PHASES", "kill,daemon,memory").split(","))
POLL_S = 0.005
SERVE_TIMEOUT_S = 60.0
HEALTHY_UPTIME_S = 11  # supervisor: a run of >= 10 s resets the backoff / crash-loop count
GOAL_KILL_S = 1.0
GOAL_RSS_MB = 30.0

# Every daemon this script spawned, for cleanup whatever happens.
SPAWNED = []


# ---------------------------------------------------------------- polling

class Poller:
    """GET / (fresh connection) every 5 ms; after mark(), waits for the first
    200 to a request sent after the mark and counts what failed before it."""

    def __init__(self, http_url, host):
        self.h, self.p = lib.split_http(http_url)
        self.host = host
        self.t0 = None
        self.served_at = None
        self.first_fail_at = None
        self.polls = 0
        self.non200 = {}
        self.errors = {}
        self.done = threading.Event()
        self.stop = threading.Event()
        self.warm = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()
        self.warm.wait(10)

    def _run(self):
        while not self.stop.is_set():
            t0 = self.t0
            start = time.monotonic()
            status, err = None, None
            try:
                conn = http.client.HTTPConnection(self.h, self.p, timeout=5.0)
                try:
                    conn.request("GET", "/", headers={"Host": self.host})
                    r = conn.getresponse()
                    r.read()
                    status = r.status
                finally:
                    conn.close()
            except Exception as e:  # noqa: BLE001 - every failure is data here
                err = lib.describe_error(e)
                err = re.sub(r"\[Errno \d+\] ", "", err)
            end = time.monotonic()
            self.warm.set()
            if t0 is not None and start >= t0:
                self.polls += 1
                if status == 200:
                    self.served_at = end
                    self.done.set()
                    return
                if self.first_fail_at is None:
                    self.first_fail_at = end
                if status is not None:
                    self.non200[str(status)] = self.non200.get(str(status), 0) + 1
                else:
                    self.errors[err] = self.errors.get(err, 0) + 1
            elif t0 is not None and status != 200:
                # In flight across the mark: it failed because of the kill.
                if self.first_fail_at is None:
                    self.first_fail_at = end
                key = "in flight at kill: " + (str(status) if status is not None else err)
                self.errors[key] = self.errors.get(key, 0) + 1
            time.sleep(POLL_S)

    def mark(self):
        self.t0 = time.monotonic()
        return self.t0

    def wait(self, timeout=SERVE_TIMEOUT_S):
        self.done.wait(timeout)
        self.stop.set()
        self.th.join(10)
        served = None if self.served_at is None else round(self.served_at - self.t0, 4)
        return {"served_s": served, "polls": self.polls, "non200": self.non200, "errors": self.errors,
                "failed": sum(self.non200.values()) + sum(self.errors.values()),
                "first_failure_s": None if self.first_fail_at is None else round(self.first_fail_at - self.t0, 4)}


# ---------------------------------------------------------------- /proc

class ExitWatcher:
    """Watch one process (pid + start time) every 2 ms: when did it exit (zombie
    or gone) and when was it reaped (its /proc entry gone)? After a daemon
    SIGKILL the app master is an orphan: whoever adopted it (init) reaps it."""

    def __init__(self, pid, start, timeout=60.0):
        self.pid, self.start, self.timeout = pid, start, timeout
        self.t0 = None
        self.exited = self.reaped = None
        self.ppid_after = None
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            f = stat_fields(self.pid)
            now = time.monotonic()
            if f is not None and f[3] != self.start:
                f = None  # pid reused: ours is gone
            if f is not None and self.t0 is not None and self.ppid_after is None and f[1] == 1:
                self.ppid_after = f[1]
            if f is None or f[0] in ("Z", "X"):
                if self.exited is None:
                    self.exited = now
                    if f is not None:
                        self.ppid_after = f[1]
                if f is None:
                    self.reaped = now
                    return
            time.sleep(0.002)

    def result(self, wait=15.0):
        self.th.join(wait)
        r = lambda t: None if t is None or self.t0 is None else round(t - self.t0, 4)  # noqa: E731
        return r(self.exited), r(self.reaped)


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        return None
    return out


def kb(v):
    return int(v.split()[0]) if v else None


def daemon_stats(pid):
    st = proc_status(pid)
    if st is None:
        return None
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        fds = None
    return {"rss_kb": kb(st.get("VmRSS")), "hwm_kb": kb(st.get("VmHWM")),
            "rss_anon_kb": kb(st.get("RssAnon")), "rss_file_kb": kb(st.get("RssFile")),
            "threads": int(st.get("Threads", "0")), "fds": fds}


def stat_fields(pid):
    """(state, ppid, pgrp, starttime) from /proc/PID/stat, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def alive(pid, start=None):
    """Is this process (not a zombie; same start time if given) alive?"""
    f = stat_fields(pid)
    if f is None or f[0] in ("Z", "X"):
        return False
    return start is None or f[3] == start


def group_members(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = stat_fields(int(d))
            if f and f[2] == pgid and f[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def gunicorn_masters(data, app):
    """gunicorn processes running from the app's directory whose parent is not one of them."""
    appdir = os.path.realpath(os.path.join(data, "apps", app)) + os.sep
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            cwd = os.readlink("/proc/%d/cwd" % pid)
        except OSError:
            continue
        if "gunicorn" in cmd and (cwd + os.sep).startswith(appdir):
            f = stat_fields(pid)
            if f and f[0] not in ("Z", "X"):
                procs[pid] = f[1]
    return sorted(p for p, ppid in procs.items() if ppid not in procs)


def app_processes_rss(data):
    """Total VmRSS / Pss (kB) and count of every process in the recorded app groups."""
    groups = set(lib.recorded_groups(data))
    rss = pss = n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        f = stat_fields(pid)
        if not f or f[2] not in groups or f[0] in ("Z", "X"):
            continue
        st = proc_status(pid)
        if not st:
            continue
        n += 1
        rss += kb(st.get("VmRSS")) or 0
        try:
            with open("/proc/%d/smaps_rollup" % pid) as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return {"groups": len(groups), "processes": n, "rss_kb": rss, "pss_kb": pss}


# ---------------------------------------------------------------- CLI / logs

def cli(server, *args):
    env = dict(os.environ, SLIPWAY_URL=server.api, SLIPWAY_TOKEN=server.token)
    r = subprocess.run([BIN, *args], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("slipway %s failed (%d): %s" % (" ".join(args), r.returncode, r.stderr.strip()))
    return r.stdout


def ps(server, app):
    return json.loads(cli(server, "ps", app, "--json"))


def web_rows(server, app):
    return [r for r in ps(server, app) if r.get("type") == "web"]


def wait_running(server, app, min_uptime=0, timeout=60.0):
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        rows = web_rows(server, app)
        if len(rows) == 1 and rows[0]["state"] == "running" and rows[0]["pid"] \
                and (rows[0].get("uptime_secs") or 0) >= min_uptime:
            return rows[0]
        time.sleep(0.2)
    raise RuntimeError("web of %s not running (uptime >= %ss) within %ss: %s" % (app, min_uptime, timeout, rows))


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z (\S+): (.*)$")
TRACE_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(\w+)\s+(\S+?):\s+(.*)$")


def parse_utc(s):
    """'2026-01-02T03:04:05.123[456]' (UTC) -> epoch seconds."""
    whole, _, frac = s.partition(".")
    return datetime.strptime(whole + "." + (frac + "000000")[:6] + "+0000", "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def app_log_lines(data, app, since_wall):
    """(wall time, source, text) of the app log lines written at or after since_wall."""
    out = []
    try:
        with open(os.path.join(data, "apps", app, "logs", "app.log"), "rb") as f:
            for line in f.read().decode("utf-8", "replace").splitlines():
                m = LOG_TS.match(line)
                if m:
                    t = parse_utc(m.group(1))
                    if t >= since_wall - 0.002:
                        out.append((t, m.group(2), m.group(3)))
    except OSError:
        pass
    return out


def server_log_lines(stderr_path, since_wall):
    out = []
    try:
        with open(stderr_path, "rb") as f:
            for line in f.read().decode("utf-8", "replace").splitlines():
                clean = re.sub(r"\x1b\[[0-9;]*m", "", line)
                m = TRACE_TS.match(clean)
                if m:
                    t = parse_utc(m.group(1))
                    if t >= since_wall - 0.002:
                        out.append((t, m.group(2), m.group(4)))
    except OSError:
        pass
    return out


def first(lines, pred):
    for ln in lines:
        if pred(ln):
            return ln[0]
    return None


def rel(t, t0):
    return None if t is None else round(t - t0, 4)


# ---------------------------------------------------------------- phases

def start_server(data, stderr_path, env, **addrs):
    return lib.Server(BIN, data, stderr_path, env=env, on_spawn=SPAWNED.append, **addrs)


def deploy(server, repo, app, push_log):
    r = lib.push_and_wait(repo, server.git_remote(app), server.http, app + ".localhost", "hello world\n",
                          log_path=push_log)
    if r["push_rc"] != 0 or r["served_s"] is None:
        raise RuntimeError("deploy of %s failed: %s (see %s)" % (app, r, push_log))
    return r


def phase_kill(state):
    """(1) kill -9 of the web process -> serving again."""
    server, data = state["server"], state["data"]
    trials = []
    for n in range(1, KILL_TRIALS + 1):
        row = wait_running(server, APP, min_uptime=HEALTHY_UPTIME_S, timeout=60)
        pid = row["pid"]
        f = stat_fields(pid)
        with open("/proc/%d/comm" % pid) as fh:
            comm = fh.read().strip()
        masters = gunicorn_masters(data, APP)
        members = group_members(pid)
        status, _ = lib.get(server.http, APP + ".localhost")
        if status != 200:
            raise RuntimeError("app not serving before kill trial %d: %s" % (n, status))
        poller = Poller(server.http, APP + ".localhost")
        wall0 = time.time()
        t0 = poller.mark()
        os.kill(pid, signal.SIGKILL)
        res = poller.wait()
        # What the supervisor did, from the app log.
        lines = app_log_lines(data, APP, wall0)
        t_exit = first(lines, lambda l: l[1] == "slipway" and "exited with" in l[2])
        t_start = first(lines, lambda l: l[1] == "slipway" and " started (pid" in l[2])
        t_listen = first(lines, lambda l: "Listening at" in l[2])
        t_boot = first(lines, lambda l: "Booting worker" in l[2])
        after = wait_running(server, APP, timeout=30)
        left = [p for p in members if alive(p)]
        masters_after = gunicorn_masters(data, APP)
        trial = {
            "n": n, "killed_pid": pid, "killed_comm": comm, "killed_was_master": masters == [pid],
            "killed_group_members": len(members), "uptime_before_s": row.get("uptime_secs"),
            **res,
            "new_pid": after["pid"], "restarts": after["restarts"], "last_exit": after.get("last_exit"),
            "old_group_left_alive": left, "masters_after": masters_after,
            "log_exit_s": rel(t_exit, wall0), "log_restart_s": rel(t_start, wall0),
            "log_listening_s": rel(t_listen, wall0), "log_worker_boot_s": rel(t_boot, wall0),
        }
        trial["ok"] = (res["served_s"] is not None and not left and len(masters_after) == 1
                       and after["pid"] != pid)
        trials.append(trial)
        print("  kill %2d: pid %d (%s) -> served again in %ss; failed requests %d %s%s; new pid %d restarts %d;"
              " log: exit %s restart %s listening %s" % (
                  n, pid, comm, res["served_s"], res["failed"], res["non200"] or "", res["errors"] or "",
                  after["pid"], after["restarts"], trial["log_exit_s"], trial["log_restart_s"],
                  trial["log_listening_s"]), file=sys.stderr)
    return trials


def phase_daemon(state, env):
    """(2) kill -9 of the daemon + immediate restart -> serving again, one master."""
    trials = []
    for n in range(1, DAEMON_TRIALS + 1):
        server, data = state["server"], state["data"]
        row = wait_running(server, APP, timeout=60)
        old_pid = row["pid"]
        old_start = stat_fields(old_pid)[3]
        old_members = group_members(old_pid)
        status, _ = lib.get(server.http, APP + ".localhost")
        if status != 200:
            raise RuntimeError("app not serving before daemon trial %d: %s" % (n, status))
        addrs = {"api": lib.host_port(server.api), "http": lib.host_port(server.http)}
        old_daemon = server.proc.pid
        poller = Poller(server.http, APP + ".localhost")
        watch = ExitWatcher(old_pid, old_start)
        wall0 = time.time()
        t0 = poller.mark()
        watch.t0 = t0
        server.kill()
        t_dead = time.monotonic()
        app_alive_after_kill = alive(old_pid, old_start)
        new = start_server(data, state["stderr"], env, **addrs)
        t_ready = time.monotonic()
        state["server"] = new
        res = poller.wait()
        exited_s, reaped_s = watch.result()
        rows = web_rows(new, APP)
        masters = gunicorn_masters(data, APP)
        old_left = [p for p in old_members if alive(p)]
        slog = server_log_lines(state["stderr"], wall0)
        alog = app_log_lines(data, APP, wall0)
        t_reaped = first(slog, lambda l: "previous run" in l[2])
        t_sready = first(slog, lambda l: "slipway ready" in l[2])
        t_started = first(alog, lambda l: l[1] == "slipway" and " started (pid" in l[2])
        t_listen = first(alog, lambda l: "Listening at" in l[2])
        trial = {
            "n": n, "old_daemon": old_daemon, "new_daemon": new.proc.pid,
            "kill_reaped_s": round(t_dead - t0, 4),
            "app_survived_daemon_kill": app_alive_after_kill,
            "ready_line_s": round(t_ready - t0, 4),
            **res,
            "old_master": old_pid, "web_rows": len(rows), "new_pid": rows[0]["pid"] if rows else None,
            "old_master_alive": alive(old_pid, old_start), "old_group_left_alive": old_left,
            "gunicorn_masters": masters,
            "old_master_exited_s": exited_s, "old_master_reaped_s": reaped_s,
            "old_master_ppid_after_kill": watch.ppid_after,
            "log_leftovers_stopped_s": rel(t_reaped, wall0), "log_ready_s": rel(t_sready, wall0),
            "log_web_started_s": rel(t_started, wall0), "log_listening_s": rel(t_listen, wall0),
            "daemon_after": daemon_stats(new.proc.pid),
        }
        trial["one_master"] = (len(rows) == 1 and len(masters) == 1 and rows[0]["pid"] == masters[0]
                               and rows[0]["pid"] != old_pid and not trial["old_master_alive"] and not old_left)
        trial["ok"] = res["served_s"] is not None and trial["one_master"]
        trials.append(trial)
        print("  daemon %d: served again in %ss (ready line %ss; old master exited %s, reaped %s; leftovers"
              " stopped %s, web started %s, listening %s); failed requests %d; web rows %d, masters %s,"
              " old master %d alive=%s" % (
                  n, res["served_s"], trial["ready_line_s"], exited_s, reaped_s, trial["log_leftovers_stopped_s"],
                  trial["log_web_started_s"], trial["log_listening_s"], res["failed"], len(rows), masters,
                  old_pid, trial["old_master_alive"]), file=sys.stderr)
    return trials


def phase_memory(work, env, result_mem):
    """(3) daemon RSS with 0 and MEM_APPS apps (own fresh server)."""
    data = os.path.join(work, "data-mem")
    stderr = os.path.join(LOGDIR, "server-memory.stderr")
    push_log = os.path.join(LOGDIR, "push-memory.log")
    server = start_server(data, stderr, env)
    try:
        pid = server.proc.pid
        time.sleep(1.0)
        result_mem["start"] = daemon_stats(pid)
        print("  memory: 0 apps: %s" % result_mem["start"], file=sys.stderr)
        repo = os.path.join(work, "repo-mem")
        lib.init_app_repo(APP_SRC, repo)
        per_app = []
        t_all = time.monotonic()
        for i in range(1, MEM_APPS + 1):
            app = "h%d" % i
            r = deploy(server, repo, app, push_log)
            s = daemon_stats(pid)
            per_app.append({"apps": i, "push_s": r["push_s"], "served_s": r["served_s"], "env": r["env"], **s})
            if i % 10 == 0 or i == 1:
                print("  memory: %d apps deployed: %s (push %.3fs, env %s)" % (i, s, r["push_s"], r["env"]),
                      file=sys.stderr)
        result_mem["deploy_wall_s"] = round(time.monotonic() - t_all, 2)
        result_mem["per_app"] = per_app
        result_mem["after_deploys"] = daemon_stats(pid)
        result_mem["apps_after_deploys"] = app_processes_rss(data)
        # Every app is up and answers through the proxy.
        apps = json.loads(cli(server, "apps", "list", "--json"))
        not_200 = {}
        for i in range(1, MEM_APPS + 1):
            st, body = lib.get(server.http, "h%d.localhost" % i)
            if st != 200 or body != b"hello world\n":
                not_200["h%d" % i] = st
        result_mem["apps_listed"] = len(apps)
        result_mem["apps_with_processes"] = sum(1 for a in apps if a.get("processes"))
        result_mem["apps_not_serving"] = not_200
        idle = []
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < IDLE_S:
            time.sleep(1.0)
            s = daemon_stats(pid)
            idle.append({"t": round(time.monotonic() - t_idle, 1), **s})
        result_mem["idle_samples"] = idle
        result_mem["after_idle"] = daemon_stats(pid)
        result_mem["apps_after_idle"] = app_processes_rss(data)
        # Five requests to every app: does proxied traffic move it?
        for _ in range(5):
            for i in range(1, MEM_APPS + 1):
                lib.get(server.http, "h%d.localhost" % i)
        result_mem["after_requests"] = daemon_stats(pid)
        print("  memory: after deploys %s; after %ss idle %s; after 5 requests/app %s; apps %s" % (
            result_mem["after_deploys"], IDLE_S, result_mem["after_idle"], result_mem["after_requests"],
            result_mem["apps_after_idle"]), file=sys.stderr)
        result_mem["ok"] = (not not_200 and len(apps) == MEM_APPS
                            and result_mem["apps_with_processes"] == MEM_APPS)
    finally:
        stop_server(server)


def stop_server(server):
    if server is None:
        return
    server.stop()
    left = lib.leftover_groups(server.data)
    if left:
        print("PROBLEM: app process groups alive after the server stopped: %s (killing)" % left, file=sys.stderr)
        lib.kill_recorded_groups(server.data)


# ---------------------------------------------------------------- main

def fmt(v, nd=3):
    return "-" if v is None else ("%.*f" % (nd, v))


def main():
    env, work = lib.prepare_run(ROOT, BIN, RESULTS, "slipway-bench-sup.")
    shutil.rmtree(LOGDIR, ignore_errors=True)
    os.makedirs(LOGDIR)
    result = {"slipway": lib.build_info(ROOT, BIN), "poll_interval_s": POLL_S}
    kill_trials, daemon_trials, mem = [], [], {}
    state = {"server": None}
    error = None
    try:
        if PHASES & {"kill", "daemon"}:
            state["data"] = os.path.join(work, "data")
            state["stderr"] = os.path.join(LOGDIR, "server.stderr")
            state["server"] = start_server(state["data"], state["stderr"], env)
            s = state["server"]
            print("server: api=%s http=%s data=%s" % (s.api, s.http, state["data"]), file=sys.stderr)
            repo = os.path.join(work, "repo")
            lib.init_app_repo(APP_SRC, repo)
            # Warm-up (fills the shared uv cache on a first run; unmeasured).
            deploy(s, repo, APP, os.path.join(LOGDIR, "push.log"))
            result["daemon_with_1_app"] = daemon_stats(s.proc.pid)
            if "kill" in PHASES:
                print("(1) kill -9 of the web process, %d trials (each after >= %ds uptime)" % (
                    KILL_TRIALS, HEALTHY_UPTIME_S), file=sys.stderr)
                kill_trials.extend(phase_kill(state))
            if "daemon" in PHASES:
                print("(2) kill -9 of the daemon + restart, %d trials" % DAEMON_TRIALS, file=sys.stderr)
                daemon_trials.extend(phase_daemon(state, env))
            stop_server(state["server"])
            state["server"] = None
        if "memory" in PHASES:
            print("(3) daemon memory, 0 -> %d apps" % MEM_APPS, file=sys.stderr)
            phase_memory(work, env, mem)
    except Exception as e:  # noqa: BLE001 - report what was measured so far
        error = lib.describe_error(e)
        print("ERROR: %s" % error, file=sys.stderr)
    finally:
        stop_server(state.get("server"))
        for s in SPAWNED:  # any daemon left (e.g. one that failed to become ready)
            if s.proc.poll() is None:
                stop_server(s)
            elif lib.leftover_groups(s.data):
                lib.kill_recorded_groups(s.data)
        shutil.rmtree(work, ignore_errors=True)

    # ---- results
    k_served = [t["served_s"] for t in kill_trials]
    d_served = [t["served_s"] for t in daemon_trials]
    result["kill"] = {
        "title": "kill -9 web process (gunicorn master) -> 200 via proxy",
        "trials": kill_trials, "served_s": lib.stats(k_served),
        "failed_requests": lib.stats([t["failed"] for t in kill_trials]),
        "log_restart_s": lib.stats([t["log_restart_s"] for t in kill_trials]),
        "goal_s": GOAL_KILL_S,
    }
    result["daemon"] = {
        "title": "kill -9 daemon + restart -> 200 via proxy",
        "trials": daemon_trials, "served_s": lib.stats(d_served),
        "ready_line_s": lib.stats([t["ready_line_s"] for t in daemon_trials]),
        "old_master_exited_s": lib.stats([t["old_master_exited_s"] for t in daemon_trials]),
        "old_master_reaped_s": lib.stats([t["old_master_reaped_s"] for t in daemon_trials]),
        "leftovers_stopped_s": lib.stats([t["log_leftovers_stopped_s"] for t in daemon_trials]),
        "all_one_master": all(t["one_master"] for t in daemon_trials) if daemon_trials else None,
    }
    result["memory"] = dict(mem, goal_rss_mb=GOAL_RSS_MB, apps=MEM_APPS, idle_s=IDLE_S)
    result["error"] = error
    failed = bool(error) or any(not t["ok"] for t in kill_trials + daemon_trials) or \
        (bool(mem) and not mem.get("ok", False))
    result["failed"] = failed
    out = os.path.join(RESULTS, "supervisor.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print()
    print("slipway supervisor benchmark (seconds unless noted; 'served' = first 200 through the proxy"
          " to a request sent after the kill; poll every %d ms)" % (POLL_S * 1000))
    hdr = "%-52s %3s %8s %8s %8s  %s" % ("figure", "n", "median", "min", "max", "notes")
    print(hdr)
    print("-" * 110)
    if kill_trials:
        s = result["kill"]["served_s"]
        fr = result["kill"]["failed_requests"]
        print("%-52s %3d %8s %8s %8s  goal < %.1f s: %s; failed requests/trial med %s (max %s)" % (
            "(1) kill -9 web master -> serving again", s["n"], fmt(s["median"]), fmt(s["min"]), fmt(s["max"]),
            GOAL_KILL_S, "met" if s["median"] is not None and s["max"] < GOAL_KILL_S else
            ("median met, max not" if s["median"] is not None and s["median"] < GOAL_KILL_S else "NOT met"),
            fr["median"], fr["max"]))
        ls = result["kill"]["log_restart_s"]
        print("%-52s %3d %8s %8s %8s  (from the app log, ms resolution)" % (
            "    kill -> supervisor restarted it", ls["n"], fmt(ls["median"]), fmt(ls["min"]), fmt(ls["max"])))
    if daemon_trials:
        s = result["daemon"]["served_s"]
        r = result["daemon"]["ready_line_s"]
        print("%-52s %3d %8s %8s %8s  one web master after every restart: %s" % (
            "(2) kill -9 daemon + restart -> serving again", s["n"], fmt(s["median"]), fmt(s["min"]),
            fmt(s["max"]), "yes" if result["daemon"]["all_one_master"] else "NO"))
        print("%-52s %3d %8s %8s %8s" % ("    kill -> new daemon's ready line", r["n"], fmt(r["median"]),
                                         fmt(r["min"]), fmt(r["max"])))
        for key, label, note in (
                ("old_master_exited_s", "    kill -> old master exited", "on the new daemon's SIGTERM (zombie or gone)"),
                ("old_master_reaped_s", "    kill -> old master reaped", "orphan: reaped by whoever adopted it (init)"),
                ("leftovers_stopped_s", "    kill -> new daemon done stopping leftovers", "its 'stopped processes left' log line")):
            x = result["daemon"][key]
            print("%-52s %3d %8s %8s %8s  %s" % (label, x["n"], fmt(x["median"]), fmt(x["min"]), fmt(x["max"]), note))
    if mem.get("start"):
        mb = lambda v: "-" if v is None else "%.1f MB" % (v / 1024.0)  # noqa: E731

        def row(label, s, extra=""):
            if s:
                print("%-52s %8s  threads %3d  fds %4d  %s" % (label, mb(s["rss_kb"]), s["threads"], s["fds"], extra))
        print("(3) slipway server RSS (VmRSS of the daemon only)")
        row("    0 apps, at start", mem.get("start"))
        row("    %d apps, right after the deploys" % MEM_APPS, mem.get("after_deploys"),
            "VmHWM %s" % mb((mem.get("after_deploys") or {}).get("hwm_kb")))
        ai = mem.get("after_idle")
        if ai:
            row("    %d apps, after %g s idle" % (MEM_APPS, IDLE_S), ai, "goal < %.0f MB: %s" % (
                GOAL_RSS_MB, "met" if ai["rss_kb"] / 1024.0 < GOAL_RSS_MB else "NOT met"))
        row("    %d apps, after %d more proxied requests" % (MEM_APPS, 5 * MEM_APPS), mem.get("after_requests"))
        a = mem.get("apps_after_idle")
        if a:
            print("    apps (for scale): %d processes in %d groups, total RSS %s, PSS %s" % (
                a["processes"], a["groups"], mb(a["rss_kb"]), mb(a["pss_kb"])))
        if mem.get("per_app"):
            pushes = lib.stats([p["push_s"] for p in mem["per_app"]])
            print("    %d deploys in %.1f s (push median %.3f s); apps serving: %d/%d" % (
                len(mem["per_app"]), mem.get("deploy_wall_s", 0), pushes["median"] or 0,
                MEM_APPS - len(mem.get("apps_not_serving") or {}), MEM_APPS))
    if error:
        print("ERROR: %s" % error)
    print("written: %s" % out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
