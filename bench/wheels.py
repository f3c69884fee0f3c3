#!/usr/bin/env python3
"""Wheel cache (issue 9 #5): a dependency-change deploy of an app with
uWSGI (an sdist compiled at install, ~48 s) in its requirements.

  SLIPWAY_BIN=... bench/wheels.py

Each figure is push_s of lib.push_and_wait: from just before `git push`
to the push returning, which it does once the new release is live (the
body does not change between deploys, so served_s says nothing here):

  cold     first deploy: uWSGI compiled
  before   requirements changed (six added) with the app's wheelhouse
           removed first: what every dependency change cost before the
           wheelhouse (uv's cache present, uWSGI compiled again)
  after    requirements changed again (idna added): uWSGI from the wheelhouse

Reported, never asserted. One run each (each `before` compiles for ~a minute).
"""

import os
import shutil
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lib  # noqa: E402

BIN = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.environ.get("RESULTS", os.path.join(BENCH, "results", "wheels"))
APP = "wheels"
BODY = b"hello wheels\n"


def main():
    env, work = lib.prepare_run(ROOT, BIN, RESULTS, "slipway-bench-wheels-")
    data = os.path.join(work, "data")
    repo = os.path.join(work, "app")
    os.makedirs(repo)
    files = {
        "Procfile": "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n",
        "app.py": "def app(environ, start_response):\n"
                  "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                  "    return [b'hello wheels\\n']\n",
        "requirements.txt": "gunicorn==27.0.1\nuWSGI==2.0.31\n",
    }
    for name, text in files.items():
        with open(os.path.join(repo, name), "w") as f:
            f.write(text)
    lib.git(repo, "init", "-q", "-b", "main")
    lib.commit(repo, "initial")
    server = lib.Server(BIN, data, os.path.join(work, "server.log"), env=env)
    out = {"build": lib.build_info(ROOT, BIN)}
    log = os.path.join(work, "push.log")
    try:
        remote = server.git_remote(APP)
        out["cold"] = lib.push_and_wait(repo, remote, server.http, APP + ".localhost", BODY, log_path=log)
        for name, extra in [("before", "six==1.17.0\n"), ("after", "idna==3.10\n")]:
            if name == "before":
                shutil.rmtree(os.path.join(data, "cache", APP, "wheels"), ignore_errors=True)
            with open(os.path.join(repo, "requirements.txt"), "a") as f:
                f.write(extra)
            lib.commit(repo, name)
            out[name] = lib.push_and_wait(repo, remote, server.http, APP + ".localhost", BODY, log_path=log)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for k in ("cold", "before", "after"):
        r = out.get(k) or {}
        print("%-7s push_rc=%s push_s=%s env=%s" % (k, r.get("push_rc"), r.get("push_s"), r.get("env")))
    lib.write_result(RESULTS, "wheels", out)


if __name__ == "__main__":
    main()
