#!/usr/bin/env bash
# Speculative decoding with prompt-lookup drafts against the base model, same server, same
# run: `loadtest` sends the same greedy requests (128 output tokens, end of sequence ignored)
# without a chain (`base`) and with {"type": "speculative", "method": "ngram", ...} (`ngram`),
# alternating within each repetition, on two workloads (speculative_prompts.py):
#   grounded: quote, correct or reformat a 200-400-token passage (what prompt lookup is for),
#   chat:     open chat instructions,
# at concurrency 1 and 8. Output is identical both ways (tests/e2e/test_speculative.py), so the
# output tokens/s ratio is the speed-up. The server's vllm:spec_decode_* counters, read before
# and after each ngram run, give the acceptance rate.
# Writes under target/bench/speculative/: rep-N/<workload>-c<C>-<config>/summary.json...,
# spec-<workload>-c<C>-rep-N.json (counter deltas), server.log, table.md.
#
# usage: scripts/bench/speculative.sh [REPS]   (default 3)
# env:   K (num_speculative_tokens, 4), LOOKUP_MIN (1), LOOKUP_MAX (3), LEVELS ("1 8"),
#        REQUESTS (per run at concurrency 1: 8; at C: 4*C), DISABLE_BY_BATCH (server's
#        --speculative-disable-by-batch-size, default its own), THREADS (2), PORT, OUT
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
K=${K:-4}; LOOKUP_MIN=${LOOKUP_MIN:-1}; LOOKUP_MAX=${LOOKUP_MAX:-3}
LEVELS=${LEVELS:-"1 8"}
THREADS=${THREADS:-2}
PORT=${PORT:-18086}
OUT=${OUT:-$ROOT/target/bench/speculative}
. "$ROOT/scripts/bench/lib.sh"
graft_binaries "$ROOT"

rm -rf "$OUT"; mkdir -p "$OUT"
python3 "$ROOT/scripts/bench/speculative_prompts.py" "$OUT/prompts"
extra=()
[ -n "${DISABLE_BY_BATCH:-}" ] && extra=(--speculative-disable-by-batch-size "$DISABLE_BY_BATCH")
start_graft "$PORT" "$OUT/server.log" --prefix-caching false --max-running 8 "${extra[@]}"
echo "date: $(date -u +%FT%TZ), graft $(git -C "$ROOT" rev-parse --short HEAD), k $K, lookup $LOOKUP_MIN-$LOOKUP_MAX" | tee "$OUT/run.txt"

counters() {
  curl -s "http://127.0.0.1:$PORT/metrics" | python3 -c '
import json, re, sys
text = sys.stdin.read()
print(json.dumps({n: float(re.search(rf"^vllm:spec_decode_num_{n}_total (\S+)$", text, re.M).group(1))
                  for n in ("drafts", "draft_tokens", "accepted_tokens")}))'
}
NGRAM="{\"temperature\": 0, \"plugins\": [{\"type\": \"speculative\", \"method\": \"ngram\", \"num_speculative_tokens\": $K, \"prompt_lookup_min\": $LOOKUP_MIN, \"prompt_lookup_max\": $LOOKUP_MAX}]}"
run() {  # workload concurrency config rep
  local workload=$1 c=$2 config=$3 rep=$4 body='{"temperature": 0}'
  [ "$config" = ngram ] && body=$NGRAM
  local requests=${REQUESTS:-$(( c == 1 ? 8 : 4 * c ))}
  echo "$workload c$c $config rep $rep: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
  "$LOADTEST" --url "http://127.0.0.1:$PORT" --endpoint chat --concurrency "$c" --requests "$requests" \
    --warmup "$c" --prompts "$OUT/prompts/$workload.jsonl" --ignore-eos --seed "$rep" \
    --extra-body "$body" --no-progress --out "$OUT/rep-$rep/$workload-c$c-$config" \
    > "$OUT/rep-$rep/$workload-c$c-$config.txt"
}
for rep in $(seq "$REPS"); do
  mkdir -p "$OUT/rep-$rep"
  for workload in grounded chat; do
    for c in $LEVELS; do
      run "$workload" "$c" base "$rep"
      before=$(counters)
      run "$workload" "$c" ngram "$rep"
      echo "{\"before\": $before, \"after\": $(counters)}" > "$OUT/spec-$workload-c$c-rep-$rep.json"
    done
  done
done
python3 "$ROOT/scripts/bench/speculative_report.py" "$OUT" | tee "$OUT/table.md"
