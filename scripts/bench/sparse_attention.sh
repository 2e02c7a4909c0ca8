#!/usr/bin/env bash
# Learned sparse attention (issue 13) on the default model: the long-text corpus, the gates'
# training and `server eval long-context` on the test split (recall against the oracle, Quest
# and recency; teacher-forced decoding at each budget against dense, timed in the same run,
# configurations alternating, medians of REPS).
# Writes target/bench/sparse_attention/{run.txt,train.txt,eval.md,eval/*} and keeps the
# plug-in in target/bench/sparse_attention/gates (reused when present: delete it to retrain).
# usage: scripts/bench/sparse_attention.sh [REPS]   (default 3; env CONTEXTS, BUDGETS, WINDOWS)
# Measure on a quiet machine: the timed decode loops share the two cores with nothing.
set -euo pipefail
REPS=${1:-3}
CONTEXTS=${CONTEXTS:-2048,4096,8192}
BUDGETS=${BUDGETS:-256,512,1024,2048}
WINDOWS=${WINDOWS:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/target/bench/sparse_attention}
CORPORA=${CORPORA:-$ROOT/target/corpora}
SERVER=$ROOT/target/release/server
mkdir -p "$OUT"
cd "$ROOT"
cargo build -q --release -p server --locked
[ -d "$CORPORA/long-text/train" ] || python3 scripts/data/corpora.py --only long-text --out "$CORPORA"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (CONTEXTS=$CONTEXTS BUDGETS=$BUDGETS WINDOWS=$WINDOWS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "graft: $(git rev-parse --short HEAD)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/run.txt"
if [ ! -f "$OUT/gates/gates.safetensors" ]; then
  /usr/bin/time -f "training: %e s wall, %M KiB peak" \
    "$SERVER" train sparse-attention --text "$CORPORA"/long-text/train/*.txt --out "$OUT/gates" \
    --overwrite 2>&1 | tr '\r' '\n' | grep -v '^capture: \|^gates: ' | tee "$OUT/train.txt"
fi
"$SERVER" eval long-context --plugin "$OUT/gates" --text "$CORPORA"/long-text/test/*.txt \
  --out "$OUT/eval" --contexts "$CONTEXTS" --budgets "$BUDGETS" --windows "$WINDOWS" \
  --repetitions "$REPS" 2>&1 | tr '\r' '\n' | grep -v ' tokens: ' | tee "$OUT/eval.md"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
