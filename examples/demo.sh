#!/usr/bin/env bash
# slipway's main job, end to end: build slipway, start a server in a fresh
# data dir, deploy the bundled Django example by a real `git push`, and
# print the URL it serves. Interactive: keeps serving until Ctrl-C.
# Non-interactive (CI, pipes): stops everything after the check.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

command -v git >/dev/null || { echo "demo: git is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "demo: python3 is required" >&2; exit 1; }
# slipway installs uv by itself when it is missing; installing it here once
# keeps the demo fast.
command -v uv >/dev/null || python3 -c "import uv" 2>/dev/null || python3 -m pip install --quiet uv || true

echo "==> building slipway (release)"
cargo build --release --quiet
bin="$root/target/release/slipway"

work=$(mktemp -d)
# As root, slipway runs each app as its own user, who must reach the data dir.
chmod 711 "$work"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "==> starting slipway server (data in $work/data)"
mkfifo "$work/ready"
"$bin" server --data "$work/data" --api 127.0.0.1:0 --http 127.0.0.1:0 --ssh 127.0.0.1:0 \
  >"$work/ready" 2>"$work/server.log" &
server_pid=$!
read -r ready <"$work/ready" || { echo "demo: server failed to start:"; cat "$work/server.log"; exit 1; }
# Keep draining the server's stdout so it never blocks on a full pipe.
cat "$work/ready" >/dev/null &
api=$(sed -E 's/.*api=(http:\/\/[^ ]+).*/\1/' <<<"$ready")
http=$(sed -E 's/.*http=(http:\/\/[^ ]+).*/\1/' <<<"$ready")
token=$(cat "$work/data/admin-token")

echo "==> pushing examples/django-notes with git"
cp -r examples/django-notes "$work/app"
cd "$work/app"
git init -q -b main
git add -A
git -c user.email=demo@example.com -c user.name=demo commit -qm "django notes"
git push "http://git:${token}@${api#http://}/git/notes.git" main

port=${http##*:}
url="http://notes.localhost:${port}/"
body=$(curl -s --resolve "notes.localhost:${port}:127.0.0.1" "$url")
grep -q "slipway notes" <<<"$body" || { echo "demo: the app did not answer as expected:"; echo "$body"; exit 1; }

echo
echo "notes is live at: $url"
echo "(try: curl $url   or   SLIPWAY_URL=$api SLIPWAY_TOKEN=\$(cat $work/data/admin-token) $bin releases notes)"
if [ -t 0 ]; then
  echo "serving until Ctrl-C"
  wait "$server_pid" || true
fi
