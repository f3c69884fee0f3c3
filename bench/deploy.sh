#!/usr/bin/env bash
# Deploy-time benchmark for slipway: see bench/README.md.
#
#  (a) first deploy of examples/hello-wsgi: fresh data dir + fresh server per
#      run, warm shared uv cache (one unmeasured warm-up run first); median of 5
#  (b) code-only redeploy: 5 consecutive pushes changing only app.py; median/min/max
#  (c) redeploy after a requirements.txt change, warm uv cache; median of 3
#  (d) the same with a compiled wheel (uWSGI) among the requirements, its
#      wheel already built once (cache warm); median of 3
#
# Each figure: from just before `git push` to the first GET through the proxy
# (Host: APP.localhost, polled every 10 ms) that answers 200 with the new body.
# Writes bench/results/deploy.json; exits non-zero if any deploy failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
BIN="$ROOT/target/release/slipway"
RESULTS="$BENCH/results"
APP_SRC="$ROOT/examples/hello-wsgi"
APP=hello
HOST="$APP.localhost"
FIRST_RUNS=${FIRST_RUNS:-5}
CODE_RUNS=${CODE_RUNS:-5}
DEPS_RUNS=${DEPS_RUNS:-3}
# Extra `slipway server` flags, e.g. SERVER_ARGS="--isolation off" (apps run
# as the daemon's user) on a host where other test servers share app uids.
SERVER_ARGS=${SERVER_ARGS:-}

mkdir -p "$RESULTS"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$RESULTS/.cache/uv}"
mkdir -p "$UV_CACHE_DIR"

if [ ! -x "$BIN" ]; then
    echo "building $BIN ..." >&2
    (cd "$ROOT" && cargo build --release)
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/slipway-bench-deploy.XXXXXX")"
# As root, slipway runs apps as their own users, who must reach the data dir.
chmod 711 "$WORK"
RUNS="$WORK/runs.jsonl"
: >"$RUNS"
LOGDIR="$RESULTS/deploy-logs"
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
SERVER_PID=""
SERVER_DATA=""
SERVER_N=0
FAILED=0

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local pid="$SERVER_PID"
    SERVER_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "warning: server $pid did not stop within 60 s of SIGTERM; killing it and its apps" >&2
        kill -KILL "$pid" 2>/dev/null || true
        python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib; lib.kill_recorded_groups(sys.argv[2])' \
            "$BENCH" "$SERVER_DATA" || true
    fi
    wait "$pid" 2>/dev/null || true
    local left
    left="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib; print(" ".join(map(str, lib.leftover_groups(sys.argv[2]))))' \
        "$BENCH" "$SERVER_DATA" 2>/dev/null || true)"
    if [ -n "$left" ]; then
        echo "PROBLEM: app process groups still alive after the server stopped: $left (killing them)" >&2
        python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib; lib.kill_recorded_groups(sys.argv[2])' \
            "$BENCH" "$SERVER_DATA" || true
    fi
}

cleanup() {
    local rc=$?
    stop_server
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server DATA: sets SERVER_PID, API, HTTP, TOKEN
start_server() {
    SERVER_DATA="$1"
    SERVER_N=$((SERVER_N + 1))
    local out="$WORK/server-$SERVER_N.out"
    local err="$LOGDIR/server-$SERVER_N.stderr"
    : >"$out"
    "$BIN" server --data "$SERVER_DATA" --api 127.0.0.1:0 --http 127.0.0.1:0 --ssh 127.0.0.1:0 \
        --domain localhost $SERVER_ARGS >"$out" 2>"$err" &
    SERVER_PID=$!
    local i line=""
    for i in $(seq 1 600); do
        line="$(head -n1 "$out")"
        case "$line" in *" data="*) break ;; esac
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    case "$line" in
        "slipway ready "*) ;;
        *) echo "server did not become ready; stderr ($err):" >&2; tail -20 "$err" >&2; exit 1 ;;
    esac
    API="$(sed -n 's/.* api=\([^ ]*\).*/\1/p' <<<"$line")"
    HTTP="$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$line")"
    TOKEN="$(cat "$SERVER_DATA/admin-token")"
}

remote() { echo "http://git:$TOKEN@${API#http://}/git/$APP.git"; }

new_repo() {
    local dst="$1"
    python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib; lib.init_app_repo(sys.argv[2], sys.argv[3])' \
        "$BENCH" "$APP_SRC" "$dst"
}

commit() { git -C "$1" add -A && git -C "$1" -c user.name=bench -c user.email=bench@localhost commit -q -m "$2"; }

# measure KIND REPO EXPECTED_BODY [record]: one timed push; appends to $RUNS when recording
measure() {
    local kind="$1" repo="$2" expect="$3" record="${4:-record}" line rc=0
    line="$(python3 "$BENCH/lib.py" push --kind "$kind" --repo "$repo" --remote "$(remote)" --http "$HTTP" \
        --host "$HOST" --expect "$expect" --log "$LOGDIR/push-$SERVER_N.log")" || rc=$?
    if [ "$record" = record ]; then
        echo "$line" >>"$RUNS"
    fi
    echo "  $kind: $line" >&2
    if [ $rc -ne 0 ]; then
        FAILED=$((FAILED + 1))
        echo "  DEPLOY FAILED ($kind); push output: $LOGDIR/push-$SERVER_N.log" >&2
        tail -25 "$LOGDIR/push-$SERVER_N.log" >&2 || true
    fi
}

echo "slipway: $BIN" >&2
echo "uv cache: $UV_CACHE_DIR" >&2

# ---- warm-up (unmeasured): fills the uv cache with gunicorn and six.
echo "warm-up (unmeasured)" >&2
start_server "$WORK/data-warmup"
new_repo "$WORK/repo-warmup"
measure warmup "$WORK/repo-warmup" 'hello world\n' no
echo "six==1.16.0" >>"$WORK/repo-warmup/requirements.txt"
body="$(python3 "$BENCH/lib.py" greeting "$WORK/repo-warmup" warm-six)"
commit "$WORK/repo-warmup" "warm six"
measure warmup "$WORK/repo-warmup" "${body%$'\n'}\\n" no
stop_server

# ---- (a) first deploy: fresh data dir and server each time.
echo "(a) first deploy x$FIRST_RUNS" >&2
for i in $(seq 1 "$FIRST_RUNS"); do
    start_server "$WORK/data-first-$i"
    new_repo "$WORK/repo-first-$i"
    measure first "$WORK/repo-first-$i" 'hello world\n'
    stop_server
    rm -rf "$WORK/data-first-$i" "$WORK/repo-first-$i"
done

# ---- (b) code-only redeploys and (c) dependency changes, on one server.
echo "(b) code-only redeploy x$CODE_RUNS" >&2
start_server "$WORK/data-redeploy"
REPO="$WORK/repo-redeploy"
new_repo "$REPO"
measure setup "$REPO" 'hello world\n' no
for i in $(seq 1 "$CODE_RUNS"); do
    token="code-$i-$RANDOM$RANDOM"
    body="$(python3 "$BENCH/lib.py" greeting "$REPO" "$token")"
    commit "$REPO" "code change $i"
    measure code "$REPO" "${body%$'\n'}\\n"
done

# (c): alternately add and remove six==1.16.0. The requirements.txt also gets
# a unique comment line: slipway keys environments by the file's content and
# reuses any environment a kept release still uses, so plain add/remove
# alternation would reuse the earlier environments after the first two pushes
# and measure a code-only deploy. With the comment each push builds a new
# environment (from the warm uv cache). app.py's greeting changes too, so the
# poller can tell the new release apart.
echo "(c) dependency change x$DEPS_RUNS" >&2
for i in $(seq 1 "$DEPS_RUNS"); do
    if grep -q '^six==' "$REPO/requirements.txt"; then
        grep -v -e '^six==' -e '^# bench' "$REPO/requirements.txt" >"$WORK/req" || true
    else
        { grep -v '^# bench' "$REPO/requirements.txt" || true; echo "six==1.16.0"; } >"$WORK/req"
    fi
    echo "# bench dep change $i $RANDOM$RANDOM" >>"$WORK/req"
    mv "$WORK/req" "$REPO/requirements.txt"
    token="deps-$i-$RANDOM$RANDOM"
    body="$(python3 "$BENCH/lib.py" greeting "$REPO" "$token")"
    commit "$REPO" "dependency change $i"
    measure deps "$REPO" "${body%$'\n'}\\n"
done

# (d): the same dependency change with a compiled wheel among the
# requirements (uWSGI, ~1 min to compile from its sdist). One unmeasured
# push adds uWSGI (it compiles once, into the app's build cache); each
# measured push then changes another requirement, so the environment is
# rebuilt and uWSGI's wheel must come from the cache, not the compiler.
echo "(d) dependency change with a compiled wheel (uWSGI) x$DEPS_RUNS" >&2
echo "uwsgi==2.0.31" >>"$REPO/requirements.txt"
body="$(python3 "$BENCH/lib.py" greeting "$REPO" "uwsgi-compile-$RANDOM")"
commit "$REPO" "add uwsgi (compiles once)"
measure setup "$REPO" "${body%$'\n'}\\n" no
for i in $(seq 1 "$DEPS_RUNS"); do
    if grep -q '^six==' "$REPO/requirements.txt"; then
        grep -v -e '^six==' -e '^# bench' "$REPO/requirements.txt" >"$WORK/req" || true
    else
        { grep -v '^# bench' "$REPO/requirements.txt" || true; echo "six==1.16.0"; } >"$WORK/req"
    fi
    echo "# bench compiled dep change $i $RANDOM$RANDOM" >>"$WORK/req"
    mv "$WORK/req" "$REPO/requirements.txt"
    token="compiled-$i-$RANDOM$RANDOM"
    body="$(python3 "$BENCH/lib.py" greeting "$REPO" "$token")"
    commit "$REPO" "dependency change $i (uwsgi kept)"
    seen=$(wc -l <"$LOGDIR/push-$SERVER_N.log")
    measure compiled "$REPO" "${body%$'\n'}\\n"
    if tail -n +"$((seen + 1))" "$LOGDIR/push-$SERVER_N.log" | grep -q 'Building uwsgi\|Built uwsgi'; then
        echo "  PROBLEM: uWSGI was compiled again instead of coming from the wheel cache" >&2
        FAILED=$((FAILED + 1))
    fi
done
stop_server

rc=0
python3 "$BENCH/lib.py" summary "$RUNS" "$RESULTS/deploy.json" || rc=$?
if [ "$FAILED" -ne 0 ] || [ "$rc" -ne 0 ]; then
    echo "FAILED: $FAILED deploy(s) failed" >&2
    exit 1
fi
