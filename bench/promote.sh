#!/usr/bin/env bash
# Promotion time for the Django example (issues 6, 9): from `slipway promote`
# starting to the live app serving the staging build, median of 3, with
# the functional check ([promote] check) and without it. Every promotion
# runs the live app's release phase (migrate, on its own database).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/slipway ] || cargo build --release --quiet
mkdir -p bench/results
bin=$PWD/target/release/slipway
work=$(mktemp -d "${TMPDIR:-/tmp}/slipway-bench-promote.XXXXXX")
chmod 711 "$work"   # app users (slipway runs apps as their own users as root) must reach it
pid=""
cleanup() { [ -n "$pid" ] && { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }; rm -rf "$work"; }
trap cleanup EXIT INT TERM
mkfifo "$work/ready"
"$bin" server --data "$work/data" --api 127.0.0.1:0 --http 127.0.0.1:0 --ssh 127.0.0.1:0 ${SERVER_ARGS:-} >"$work/ready" 2>"$work/server.log" &
pid=$!
read -r ready <"$work/ready"
cat "$work/ready" >/dev/null &
api=$(sed -E 's/.*api=http:\/\/([^ ]+).*/\1/' <<<"$ready")
http=$(sed -E 's/.*http=http:\/\/([^ ]+).*/\1/' <<<"$ready")
export SLIPWAY_URL=http://$api SLIPWAY_TOKEN=$(cat "$work/data/admin-token")

push() { # APP DIR
  (cd "$2" && git push -q "http://git:${SLIPWAY_TOKEN}@${api}/git/$1.git" +main 2>/dev/null)
}
make_repo() { # DIR MARKER WITH_CHECK
  cp -r examples/django-notes "$1"
  sed -i "s/slipway notes/slipway notes $2/" "$1"/notes/templates/notes/index.html
  [ "$3" = yes ] || sed -i '/^\[promote\]/,$d' "$1"/slipway.toml
  (cd "$1" && git init -q -b main && git add -A && git -c user.email=b@b -c user.name=b commit -qm "$2")
}
make_repo "$work/live" "original" yes && push live "$work/live"
make_repo "$work/checked" "promoted-checked" yes && push staging "$work/checked"
make_repo "$work/unchecked" "promoted-unchecked" no && push staging2 "$work/unchecked"

python3 - "$bin" "$http" <<'PY'
import http.client, json, statistics, subprocess, sys, time
bin, http_addr = sys.argv[1], sys.argv[2]
host, port = http_addr.split(":")
def serves(text):
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    c.request("GET", "/", headers={"Host": "live.localhost"})
    return text in c.getresponse().read().decode()
results = {}
for label, staging, marker in [("with check", "staging", "promoted-checked"), ("without check", "staging2", "promoted-unchecked")]:
    samples = []
    for _ in range(3):
        start = time.monotonic()
        out = subprocess.run([bin, "promote", staging, "--to", "live"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"promote failed: {out.stdout}{out.stderr}")
        while not serves(marker):
            time.sleep(0.01)
        samples.append(time.monotonic() - start)
        if label == "with check" and "functional check passed" not in out.stdout:
            sys.exit("the check did not run")
        if "installing with" in out.stdout:
            sys.exit("promotion reinstalled dependencies")
        # The live app's own release phase (migrate) gates every promotion.
        if "release phase: python manage.py migrate" not in out.stdout:
            sys.exit("the live app's release phase did not run:\n" + out.stdout)
    results[label] = samples
print(f"{'promotion, Django example':<30} {'n':>3} {'median':>8} {'min':>8} {'max':>8}")
for label, s in results.items():
    print(f"{label:<30} {len(s):>3} {statistics.median(s):>8.2f} {min(s):>8.2f} {max(s):>8.2f}")
json.dump({k: {"samples": v, "median": statistics.median(v)} for k, v in results.items()}, open("bench/results/promote.json", "w"), indent=1)
PY
