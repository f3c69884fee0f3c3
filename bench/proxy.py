#!/usr/bin/env python3
"""Proxy throughput: slipway's proxy against nginx as a reverse proxy, in
front of the same fast origin, measured alternately in one run (issue 13 #4).

  python3 bench/proxy.py [--duration 10] [--rounds 3] [--conns 64,512]

The origin is a one-worker nginx returning a fixed body, deployed as a
slipway app (so slipway's proxy routes to it as to any app); the nginx
reverse proxy (worker_processes auto, upstream keepalive 64) points at the
same origin port. wrk (2 threads, --latency) runs against each in turn,
ROUNDS times per connection count; the table gives the median requests/s
and p99 per row and the slipway/nginx ratio. Results: bench/results/proxy.json.

HTTPS: once slipway serves --https (the TLS track), add a target to
`targets()` with an `https://` URL and an nginx `listen ... ssl` server
block on the same certificate; wrk speaks TLS by the URL alone.

Binary: $SLIPWAY_BIN, else target/release/slipway (built if missing).
Standard library only; needs nginx and wrk on PATH.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
HOST = "origin.localhost"

ORIGIN_CONF = r"""
daemon off; master_process off; worker_processes 1;
pid DATA/origin.pid; error_log stderr warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path DATA/body; proxy_temp_path DATA/proxy;
  fastcgi_temp_path DATA/fcgi; uwsgi_temp_path DATA/uwsgi; scgi_temp_path DATA/scgi;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:PORT; location / { return 200 "hello from the origin\n"; } }
}
"""

PROXY_CONF = r"""
daemon off; worker_processes auto; pid WORK/nginx.pid; error_log WORK/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path WORK/body; proxy_temp_path WORK/proxy;
  fastcgi_temp_path WORK/fcgi; uwsgi_temp_path WORK/uwsgi; scgi_temp_path WORK/scgi;
  keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:ORIGIN; keepalive 64; }
  server {
    listen 127.0.0.1:LISTEN;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
    }
  }
}
"""


def wrk(url, conns, duration):
    out = subprocess.run(
        ["wrk", "-t2", "-c%d" % conns, "-d%ds" % duration, "--latency", "-H", "Host: " + HOST, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p99_ms": lib.wrk_p99_ms(out), "non2xx": int(errors.group(1)) if errors else 0}


def origin_port(data):
    """The origin's $PORT, from its process environment."""
    run = os.path.join(data, "run", "origin")
    for f in os.listdir(run):
        pid = int(open(os.path.join(run, f)).read().split()[0])
        for kv in open("/proc/%d/environ" % pid, "rb").read().split(b"\0"):
            if kv.startswith(b"PORT="):
                return int(kv[5:])
    raise RuntimeError("origin port not found")


def targets(server_http, nginx_port):
    return [("http", "slipway", server_http + "/"), ("http", "nginx", "http://127.0.0.1:%d/" % nginx_port)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", default="64,512")
    args = ap.parse_args()
    binary = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
    env, work = lib.prepare_run(ROOT, binary, RESULTS, "slipway-bench-proxy-")
    server = nginx = None
    try:
        repo = os.path.join(work, "origin")
        os.makedirs(repo)
        with open(os.path.join(repo, "origin.conf.in"), "w") as f:
            f.write(ORIGIN_CONF)
        with open(os.path.join(repo, "Procfile"), "w") as f:
            f.write('web: mkdir -p "$SLIPWAY_DATA_DIR/o" && sed -e "s|DATA|$SLIPWAY_DATA_DIR/o|g" -e "s|PORT|$PORT|" origin.conf.in > "$SLIPWAY_DATA_DIR/o/origin.conf" && exec nginx -e stderr -p "$SLIPWAY_DATA_DIR/o" -c "$SLIPWAY_DATA_DIR/o/origin.conf"\n')
        lib.git(repo, "init", "-q", "-b", "main")
        lib.git(repo, "add", "-A")
        lib.git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "origin")
        data = os.path.join(work, "data")
        server = lib.Server(binary, data, os.path.join(RESULTS, "proxy-server.log"), env=env)
        subprocess.run(["git", "push", "-q", server.git_remote("origin"), "main"], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = origin_port(data)
        nginx_port = lib.free_port()
        conf = PROXY_CONF.replace("WORK", work).replace("ORIGIN", str(origin)).replace("LISTEN", str(nginx_port))
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(conf)
        nginx = subprocess.Popen(["nginx", "-e", "stderr", "-p", work, "-c", os.path.join(work, "nginx.conf")],
                                 stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rows = []
        for conns in [int(c) for c in args.conns.split(",")]:
            samples = {}
            for _ in range(args.rounds):
                for scheme, name, url in targets(server.http, nginx_port):
                    samples.setdefault((scheme, name), []).append(wrk(url, conns, args.duration))
            for scheme in sorted({s for s, _ in samples}):
                s, n = samples[(scheme, "slipway")], samples[(scheme, "nginx")]
                row = {
                    "scheme": scheme, "conns": conns,
                    "slipway_rps": statistics.median(x["rps"] for x in s),
                    "nginx_rps": statistics.median(x["rps"] for x in n),
                    "slipway_p99_ms": statistics.median(x["p99_ms"] for x in s),
                    "nginx_p99_ms": statistics.median(x["p99_ms"] for x in n),
                    "slipway_non2xx": sum(x["non2xx"] for x in s), "nginx_non2xx": sum(x["non2xx"] for x in n),
                    "samples": {"slipway": s, "nginx": n},
                }
                row["ratio"] = row["slipway_rps"] / row["nginx_rps"]
                rows.append(row)
        print("%-6s %5s %12s %12s %6s %10s %10s" % ("scheme", "conns", "slipway rps", "nginx rps", "ratio", "slipway p99", "nginx p99"))
        for r in rows:
            print("%-6s %5d %12.0f %12.0f %6.2f %9.2fms %9.2fms" % (
                r["scheme"], r["conns"], r["slipway_rps"], r["nginx_rps"], r["ratio"], r["slipway_p99_ms"], r["nginx_p99_ms"]))
        with open(os.path.join(RESULTS, "proxy.json"), "w") as f:
            json.dump({"duration_s": args.duration, "rounds": args.rounds, "rows": rows}, f, indent=2)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
