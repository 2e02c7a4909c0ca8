#!/usr/bin/env bash
# A memory decoder's cost through the whole serving path: one graft server, the memory loaded
# through POST /v1/plugins (the RSS before and after, and the bytes /v1/plugins reports), then
# `loadtest` at concurrency 1 and 8 with every request on the base model ("base") or with the
# memory ("memory"), alternating within each repetition so both run on the same server in the
# same minutes. Writes under target/bench/memory/: rep-N/{base,memory}-cC/summary.json,
# memory.json (resident bytes and RSS), server.log and table.md (medians over repetitions).
#
# usage: MEMORY=DIR scripts/bench/memory_http.sh [REPS]   (default 3)
# env:   MEMORY (a memory folder from `server train memory`; required), DURATION (30s),
#        THREADS (2), PORT, OUT
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
: "${MEMORY:?set MEMORY to a memory folder (server train memory --out DIR)}"
DURATION=${DURATION:-30s}
THREADS=${THREADS:-2}
PORT=${PORT:-18086}
OUT=${OUT:-$ROOT/target/bench/memory}
. "$ROOT/scripts/bench/lib.sh"
graft_binaries "$ROOT"

rm -rf "$OUT"; mkdir -p "$OUT/plugins"
cp -r "$MEMORY" "$OUT/plugins/memory"
start_graft "$PORT" "$OUT/server.log" --prefix-caching false --max-running 8 --plugin-dir "$OUT/plugins"
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$SERVER_PID/status"; }
BEFORE=$(rss)
curl -sf "http://127.0.0.1:$PORT/v1/plugins" -H 'content-type: application/json' \
  -d '{"type": "memory", "name": "mem", "path": "memory"}' > /dev/null
AFTER=$(rss)
BYTES=$(curl -sf "http://127.0.0.1:$PORT/v1/plugins" | python3 -c \
  'import json, sys; print(next(p["bytes"] for p in json.load(sys.stdin)["data"] if p["name"] == "mem"))')
echo "{\"rss_before\": $BEFORE, \"rss_after\": $AFTER, \"plugin_bytes\": $BYTES}" > "$OUT/memory.json"
echo "date: $(date -u +%FT%TZ), graft $(git -C "$ROOT" rev-parse --short HEAD), $DURATION per run; $(cat "$OUT/memory.json")" | tee "$OUT/run.txt"

run() {  # name concurrency rep [loadtest flags...]
  local name=$1 c=$2 rep=$3; shift 3
  echo "$name c$c rep $rep: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
  "$LOADTEST" --url "http://127.0.0.1:$PORT" --endpoint chat --concurrency "$c" \
    --duration "$DURATION" --warmup "$c" --input-tokens 64 --input-std 16 --output-tokens 128 \
    --output-std 32 --ignore-eos --seed "$rep" --no-progress \
    --out "$OUT/rep-$rep/$name-c$c" "$@" > "$OUT/rep-$rep/$name-c$c.txt"
}
for rep in $(seq "$REPS"); do
  mkdir -p "$OUT/rep-$rep"
  for c in 1 8; do
    run base "$c" "$rep" --extra-body '{"temperature": 0.7}'
    run memory "$c" "$rep" --extra-body '{"temperature": 0.7, "plugins": [{"type": "memory", "name": "mem"}]}'
  done
done
python3 "$ROOT/scripts/bench/memory_report.py" "$OUT" | tee "$OUT/table.md"
