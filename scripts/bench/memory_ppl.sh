#!/usr/bin/env bash
# The memory decoder's perplexity table: `server eval perplexity` on each domain's test split,
# on general English, and on a validation set per trained memory (its training split past the
# TRAIN_TOKENS the trainer read: documents it never saw, where λ is chosen), for the base model,
# every trained memory (served at its default λ, alone, and mixed at every λ), every LoRA
# baseline, and the kNN-LM over the datastore of the test text's own domain. One eval per text set, so the base is scored once per set and every
# plug-in sees the same windows. Writes under target/bench/memory-ppl/: <set>.json and
# <set>.svg per text set, table.md (memory_ppl_report.py).
#
# usage: RUNS=DIR scripts/bench/memory_ppl.sh
# env:   RUNS (folder of `server train memory --out RUNS/<domain>` memories, their RUNS/<domain>.work
#        folders and `server train lora --corpus ... --out RUNS/lora-<domain>` adapters; required),
#        CORPORA (corpora), TOKENS (scored tokens per set, 16384), TRAIN_TOKENS (the trainer's
#        --max-tokens, 400000), SETS (python-docs-valid licenses-valid python-docs licenses
#        english), THREADS (2), OUT (sets already scored there are kept unless RESCORE=1)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
: "${RUNS:?set RUNS to the folder holding the trained memories}"
CORPORA=${CORPORA:-$ROOT/corpora}
TOKENS=${TOKENS:-16384}
TRAIN_TOKENS=${TRAIN_TOKENS:-400000}
THREADS=${THREADS:-2}
OUT=${OUT:-$ROOT/target/bench/memory-ppl}
GRAFT=$ROOT/target/release/server
[ -x "$GRAFT" ] || (cd "$ROOT" && cargo build --release -p server)
DOMAINS="python-docs licenses"

plugins=()
for d in $DOMAINS; do
  [ -f "$RUNS/$d/config.json" ] && plugins+=(--plugin "memory:$d=$d" --plugins "[{\"type\": \"memory\", \"name\": \"$d\"}]")
  [ -f "$RUNS/lora-$d/adapter_config.json" ] && plugins+=(--plugin "lora:lora-$d=lora-$d" --plugins "[{\"type\": \"lora\", \"name\": \"lora-$d\"}]")
done
[ ${#plugins[@]} -gt 0 ] || { echo "no memory or LoRA adapter under $RUNS" >&2; exit 1; }

mkdir -p "$OUT"
echo "date: $(date -u +%FT%TZ), graft $(git -C "$ROOT" rev-parse --short HEAD), $TOKENS scored tokens per set" | tee "$OUT/run.txt"
score() {  # name text-folder skip-tokens [datastore domain]
  local name=$1 text=$2 skip=$3 domain=${4:-}
  # An interrupted run resumes: a set whose table exists is kept (RESCORE=1 scores it again).
  if [ -f "$OUT/$name.json" ] && [ -z "${RESCORE:-}" ]; then echo "== $name: kept $OUT/$name.json"; return; fi
  local knn=()
  [ -n "$domain" ] && [ -f "$RUNS/$domain.work/datastore.safetensors" ] && knn=(--datastore "$RUNS/$domain.work/datastore.safetensors")
  echo "== $name: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
  RAYON_NUM_THREADS=$THREADS "$GRAFT" eval perplexity --text "$text" --skip-tokens "$skip" \
    --max-tokens "$TOKENS" --plugin-dir "$RUNS" "${plugins[@]}" "${knn[@]}" \
    --out "$OUT/$name.json" --plot "$OUT/$name.svg" | tee -a "$OUT/run.txt"
}
SETS=${SETS:-"python-docs-valid licenses-valid python-docs licenses english"}
for set in $SETS; do
  case $set in
    *-valid) d=${set%-valid}; [ -f "$RUNS/$d/config.json" ] && score "$set" "$CORPORA/$d/train" "$TRAIN_TOKENS" ;;
    english) score english "$CORPORA/english/test" 0 ;;
    *) score "$set" "$CORPORA/$set/test" 0 "$set" ;;
  esac
done
python3 "$ROOT/scripts/bench/memory_ppl_report.py" "$OUT" | tee "$OUT/table.md"
