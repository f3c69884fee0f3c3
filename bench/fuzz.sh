#!/usr/bin/env bash
# Fuzz every parser target in tests/fuzz.rs at scale and report, per target,
# the executions and the time taken. CASES (default 100000) per property
# target; the live-API target sends CASES/10 bodies to each of 11 endpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${CASES:-100000}
mkdir -p bench/results
python3 -c "import uv" 2>/dev/null || command -v uv >/dev/null || python3 -m pip install --quiet uv
cargo test --release --test fuzz --no-run --quiet
targets=(procfile_parser manifest_parser app_names_are_safe_path_segments config_keys_hosts_refs_labels
         durations_and_patterns webhook_urls ssh_public_keys ssh_command_lines_round_trip api_json_bodies_against_a_live_daemon)
printf '%-42s %12s %10s %s\n' target executions seconds result
json="["
for t in "${targets[@]}"; do
  start=$(date +%s.%N)
  if PROPTEST_CASES=$cases cargo test --release --quiet --test fuzz -- --exact "$t" >"bench/results/fuzz-$t.log" 2>&1; then result=ok; else result=FAILED; fi
  secs=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
  if [ "$t" = api_json_bodies_against_a_live_daemon ]; then execs=$(( (cases / 10 > 50 ? cases / 10 : 50) * 11 )); else execs=$cases; fi
  printf '%-42s %12s %10s %s\n' "$t" "$execs" "$secs" "$result"
  json+="{\"target\":\"$t\",\"executions\":$execs,\"seconds\":$secs,\"result\":\"$result\"},"
  [ "$result" = ok ] || { echo "see bench/results/fuzz-$t.log"; failed=1; }
done
echo "${json%,}]" > bench/results/fuzz.json
[ -z "${failed:-}" ]
