#!/usr/bin/env python3
"""HTTPS rows of the proxy benchmark (issue 13): slipway's `--https`
listener against nginx terminating TLS as an equivalent reverse proxy, in
front of the same fast origin, measured in one run, alternating.

  bench/https.py                    # ROUNDS=3 DURATION=10 CONNS=64,512
  ROUNDS=5 DURATION=15 bench/https.py

The origin is a one-worker nginx returning a fixed body, deployed as a
slipway app (its Procfile starts it on $PORT), so slipway routes to it the
way it routes to any app. The reference nginx listens on its own ports,
`worker_processes auto`, HTTP/1.1 keep-alive to the same origin
(`keepalive 128`), with the very certificate and key slipway serves (the
internal CA's leaf for the host `vm`, which /etc/hosts resolves to
127.0.0.1: wrk sends the URL's host as SNI). Plain HTTP rows are measured
the same way (the app opts out of the redirect) so each HTTPS row has its
HTTP neighbour. wrk: 2 threads, CONNS connections, DURATION seconds,
--latency; per row the median over ROUNDS of requests/s and p99, and the
ratio slipway / nginx. Results: bench/results/https.json.

Requirements: wrk, nginx, git, curl, python3 (standard library only).
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("SLIPWAY_BIN", os.path.join(ROOT, "target", "release", "slipway"))
RESULTS = os.path.join(ROOT, "bench", "results")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = [int(c) for c in os.environ.get("CONNS", "64,512").split(",")]
HOST = "vm"  # resolves to 127.0.0.1 in /etc/hosts; a single label, so the internal CA serves it

ORIGIN_SH = r"""#!/bin/sh
# A one-worker nginx answering every request with a fixed 13-byte body.
d=$(mktemp -d)
cat > "$d/nginx.conf" <<EOF
worker_processes 1;
pid $d/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$PORT;
    location / { default_type text/plain; return 200 "hello origin\n"; }
  }
}
EOF
exec nginx -p "$d" -e stderr -c "$d/nginx.conf" -g 'daemon off;'
"""

NGINX_PROXY = """worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  keepalive_requests 1000000;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{http};
    listen 127.0.0.1:{https} ssl http2;
    ssl_certificate {d}/chain.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


def wrk(url, conns):
    out = subprocess.run(
        ["wrk", "-t2", "-c%d" % conns, "-d%ds" % DURATION, "--latency", url],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = lib.wrk_p99_ms(out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {"rps": rps, "p99_ms": p99, "errors": errors}


def cli(env, *args):
    return subprocess.run([BINARY, *args], env=env, capture_output=True, text=True, check=True).stdout


def main():
    for tool in ("wrk", "nginx", "git", "curl"):
        if not shutil.which(tool):
            sys.exit("bench/https.py needs %s" % tool)
    env, work = lib.prepare_run(ROOT, BINARY, RESULTS, "slipway-https-bench-")
    data = os.path.join(work, "data")
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen(
        [BINARY, "server", "--data", data, "--api", "127.0.0.1:0", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0",
         "--ssh", "127.0.0.1:0", "--domain", "localhost"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    nginx = None
    try:
        ready = server.stdout.readline()
        fields = dict(f.split("=", 1) for f in ready.split()[2:] if "=" in f)
        api, http, https = fields["api"], fields["http"], fields["https"]
        cenv = dict(env, SLIPWAY_URL=api, SLIPWAY_TOKEN=open(os.path.join(data, "admin-token")).read().strip())

        app = os.path.join(work, "app")
        os.makedirs(app)
        with open(os.path.join(app, "Procfile"), "w") as f:
            f.write("web: sh origin.sh\n")
        with open(os.path.join(app, "origin.sh"), "w") as f:
            f.write(ORIGIN_SH)
        git = lambda *a: subprocess.run(["git", *a], cwd=app, check=True, capture_output=True)  # noqa: E731
        git("init", "-q", "-b", "main")
        git("add", "-A")
        git("-c", "user.email=b@example.com", "-c", "user.name=bench", "commit", "-q", "-m", "origin")
        remote = api.replace("http://", "http://x:%s@" % cenv["SLIPWAY_TOKEN"]) + "/git/web.git"
        git("push", "-q", remote, "main")
        cli(cenv, "domains", "add", "web", HOST)
        cli(cenv, "certs", "redirect", "web", "off")
        cert_dir = os.path.join(data, "tls", "certs", HOST)
        for _ in range(200):
            if os.path.exists(os.path.join(cert_dir, "chain.pem")):
                break
            time.sleep(0.05)
        ps = json.loads(cli(cenv, "ps", "web", "--json"))
        origin = [p for p in ps if p.get("type") == "web"][0]["port"]

        nd = os.path.join(work, "nginx")
        os.makedirs(nd)
        shutil.copy(os.path.join(cert_dir, "chain.pem"), nd)
        shutil.copy(os.path.join(cert_dir, "key.pem"), nd)
        n_http, n_https = lib.free_port(), lib.free_port()
        with open(os.path.join(nd, "nginx.conf"), "w") as f:
            f.write(NGINX_PROXY.format(d=nd, origin=origin, http=n_http, https=n_https))
        nginx = subprocess.Popen(["nginx", "-p", nd, "-e", os.path.join(nd, "error.log"), "-c",
                                  os.path.join(nd, "nginx.conf"), "-g", "daemon off;"])
        time.sleep(0.5)

        s_http_port, s_https_port = http.rsplit(":", 1)[1], https.rsplit(":", 1)[1]
        targets = {
            ("http", "slipway"): "http://%s:%s/" % (HOST, s_http_port),
            ("http", "nginx"): "http://%s:%d/" % (HOST, n_http),
            ("https", "slipway"): "https://%s:%s/" % (HOST, s_https_port),
            ("https", "nginx"): "https://%s:%d/" % (HOST, n_https),
        }
        for url in targets.values():  # every target answers the body before measuring
            body = subprocess.run(["curl", "-sSk", url], capture_output=True, text=True, check=True).stdout
            assert body == "hello origin\n", (url, body)

        samples = {}
        for r in range(ROUNDS):
            for conns in CONNS:
                for scheme in ("http", "https"):
                    order = ("slipway", "nginx") if r % 2 == 0 else ("nginx", "slipway")
                    for who in order:
                        res = wrk(targets[(scheme, who)], conns)
                        samples.setdefault((scheme, conns, who), []).append(res)
                        print("round %d %-5s c=%-4d %-7s %9.0f req/s  p99 %7.2f ms  errors %d"
                              % (r + 1, scheme, conns, who, res["rps"], res["p99_ms"], res["errors"]), file=sys.stderr)

        rows = []
        for scheme in ("http", "https"):
            for conns in CONNS:
                med = {}
                for who in ("slipway", "nginx"):
                    s = samples[(scheme, conns, who)]
                    med[who] = {"rps": statistics.median(x["rps"] for x in s),
                                "p99_ms": statistics.median(x["p99_ms"] for x in s),
                                "errors": sum(x["errors"] for x in s)}
                rows.append({"scheme": scheme, "conns": conns, "slipway": med["slipway"], "nginx": med["nginx"],
                             "rps_ratio": med["slipway"]["rps"] / med["nginx"]["rps"],
                             "p99_ratio": med["slipway"]["p99_ms"] / med["nginx"]["p99_ms"]})
        print("| scheme | conns | slipway req/s | nginx req/s | ratio | slipway p99 ms | nginx p99 ms | p99 ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| %s | %d | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f |" % (
                row["scheme"], row["conns"], row["slipway"]["rps"], row["nginx"]["rps"], row["rps_ratio"],
                row["slipway"]["p99_ms"], row["nginx"]["p99_ms"], row["p99_ratio"]))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(RESULTS, "https.json"), "w") as f:
            json.dump({"commit": commit, "rounds": ROUNDS, "duration_s": DURATION, "rows": rows}, f, indent=2)
    finally:
        if nginx:
            nginx.terminate()
            nginx.wait()
        server.terminate()
        server.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
