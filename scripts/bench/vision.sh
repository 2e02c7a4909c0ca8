#!/usr/bin/env bash
# Vision (issue 14) on the default model: `server train vision` (the tower, ~80 min on 2 cores),
# `server train vision-prune` (LVPruning's decision module for it, ~30 min) and `server eval
# vision` through the serving path, dense and with vision-token pruning after the middle layer
# (random, attention and learned scorers at each kept fraction; every question goes to every
# configuration in turn, so prefill times are medians measured in the same run). REPS
# evaluations; report.json of each in eval-N/, a summary of medians in summary.md.
# Keeps the tower in target/bench/vision/tower and the module in target/bench/vision/prune
# (reused when present: delete them to retrain).
# usage: scripts/bench/vision.sh [REPS]   (default 3; env QUESTIONS, KEEP, TRAIN_FLAGS,
# PRUNE_FLAGS)
# Measure on a quiet machine: the prefills share the two cores with nothing.
set -euo pipefail
REPS=${1:-3}
QUESTIONS=${QUESTIONS:-200}
KEEP=${KEEP:-0.5,0.25,0.1}
TRAIN_FLAGS=${TRAIN_FLAGS:---summary-row --align-steps 800 --steps 600}
PRUNE_FLAGS=${PRUNE_FLAGS:---steps 200 --batch 4}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/target/bench/vision}
SERVER=$ROOT/target/release/server
mkdir -p "$OUT"
cd "$ROOT"
cargo build -q --release -p server --locked
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (QUESTIONS=$QUESTIONS KEEP=$KEEP TRAIN_FLAGS=$TRAIN_FLAGS PRUNE_FLAGS=$PRUNE_FLAGS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "graft: $(git rev-parse --short HEAD)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/run.txt"
if [ ! -f "$OUT/tower/model.safetensors" ]; then
  # shellcheck disable=SC2086
  /usr/bin/time -f "training: %e s wall, %M KiB peak" \
    "$SERVER" train vision --out "$OUT/tower" --overwrite $TRAIN_FLAGS 2>&1 \
    | tr '\r' '\n' | grep -v ' steps: ' | tee "$OUT/train.txt"
fi
if [ ! -f "$OUT/prune/decision.safetensors" ]; then
  # shellcheck disable=SC2086
  /usr/bin/time -f "decision module: %e s wall, %M KiB peak" \
    "$SERVER" train vision-prune --tower "$OUT/tower" --out "$OUT/prune" --overwrite $PRUNE_FLAGS \
    2>&1 | tr '\r' '\n' | grep -v ' steps: ' | tee "$OUT/train-prune.txt"
fi
for r in $(seq 1 "$REPS"); do
  "$SERVER" eval vision --vision "$OUT/tower" --out "$OUT/eval-$r" --questions "$QUESTIONS" \
    --samples 0 --prune-keep "$KEEP" --prune-module "$OUT/prune" 2>&1 | tr '\r' '\n' \
    | grep -v 'test questions: '
done | tee "$OUT/eval.txt"
python3 scripts/bench/vision_report.py --svg "$OUT/pruning.svg" "$OUT"/eval-*/report.json | tee "$OUT/summary.md"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
