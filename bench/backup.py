#!/usr/bin/env python3
"""Backup and restore of a server with APPS apps (issue 14 #6).

  bench/backup.py             # APPS=10

Deploys APPS copies of examples/hello-wsgi (release binary, ephemeral
ports, temp data dir), then times:

  backup    `slipway backup FILE` while a client keeps requesting one app
            (its failed requests are reported too)
  restore   `slipway restore FILE --data NEW` (offline)
  back_up   from `slipway server --data NEW` started to every app
            answering its body through the proxy (live trees and
            environments are rebuilt from their commits at start)

Writes bench/results/backup.json. Env: APPS, SLIPWAY_BIN.
"""

import os
import shutil
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
APPS = int(os.environ.get("APPS", "10"))
BODY = b"hello world\n"


def main():
    env, work = lib.prepare_run(ROOT, BINARY, RESULTS, "slipway-backup-bench-")
    names = ["bk%d" % i for i in range(APPS)]
    server = lib.Server(BINARY, os.path.join(work, "data"), os.path.join(work, "server.err"), env=env)
    restored = None
    out = {"build": lib.build_info(ROOT, BINARY), "apps": APPS}
    try:
        for name in names:
            repo = os.path.join(work, name)
            lib.init_app_repo(os.path.join(ROOT, "examples", "hello-wsgi"), repo)
            r = lib.push_and_wait(repo, server.git_remote(name), server.http, name + ".localhost", BODY)
            if r["push_rc"] != 0:
                raise RuntimeError("deploy of %s failed" % name)

        stop, counts = threading.Event(), {"requests": 0, "failed": 0}

        def client():
            while not stop.is_set():
                try:
                    status, body = lib.get(server.http, names[0] + ".localhost")
                    ok = status == 200 and body == BODY
                except Exception:  # noqa: BLE001 - a failure is data
                    ok = False
                counts["requests"] += 1
                counts["failed"] += 0 if ok else 1
        t = threading.Thread(target=client, daemon=True)
        t.start()
        cenv = dict(env, SLIPWAY_URL=server.api, SLIPWAY_TOKEN=server.token)
        file = os.path.join(work, "backup.tar.gz")
        t0 = time.monotonic()
        subprocess.run([BINARY, "backup", file], env=cenv, check=True, stdout=subprocess.DEVNULL)
        out["backup_s"] = round(time.monotonic() - t0, 3)
        stop.set()
        t.join(10)
        out["backup_bytes"] = os.path.getsize(file)
        out["requests_during_backup"] = counts
        server.stop()

        new = os.path.join(work, "restored")
        t0 = time.monotonic()
        subprocess.run([BINARY, "restore", file, "--data", new], env=env, check=True, stdout=subprocess.DEVNULL)
        out["restore_s"] = round(time.monotonic() - t0, 3)

        t0 = time.monotonic()
        restored = lib.Server(BINARY, new, os.path.join(work, "restored.err"), env=env, ready_timeout=900)
        waiting = set(names)
        deadline = time.monotonic() + 900
        while waiting and time.monotonic() < deadline:
            for name in sorted(waiting):
                try:
                    status, body = lib.get(restored.http, name + ".localhost")
                    if status == 200 and body == BODY:
                        waiting.discard(name)
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.05)
        if waiting:
            raise RuntimeError("not back after restore: %s" % sorted(waiting))
        out["back_up_s"] = round(time.monotonic() - t0, 3)
    finally:
        if restored is not None:
            restored.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    lib.write_result(RESULTS, "backup", out)


if __name__ == "__main__":
    main()
