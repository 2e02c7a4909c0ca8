#!/usr/bin/env bash
# Plug-ins through the whole serving path: one graft server with a LoRA adapter, a steering
# vector and a steering controller loaded, driven by `loadtest` at a fixed concurrency with
#   base:  every request on the base model, and
#   mix:   25% each of base, the LoRA adapter, the vector (scale 2) and the controller,
# alternating base and mix within each repetition, so the mixed batches' cost is measured
# against the base model on the same server in the same run. The per-chain rows of the mix
# say what each chain's requests saw inside those shared batches.
# Writes under target/bench/plugins/: rep-N/{base,mix}/{summary.json,report.html,...},
# server.log and table.md (medians over repetitions).
#
# usage: scripts/bench/plugins_http.sh [REPS]   (default 3)
# env:   STEER (control-vector GGUF), CONTROLLER (controller folder): trained from
#        shared/data/refusal when unset (about 10 minutes); LORA (PEFT folder, default the
#        r4 all-projection test fixture); CONCURRENCY (8), DURATION (30s), THREADS (2), PORT, OUT
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DATA=$ROOT/../shared/data/refusal
CONCURRENCY=${CONCURRENCY:-8}
DURATION=${DURATION:-30s}
THREADS=${THREADS:-2}
PORT=${PORT:-18085}
OUT=${OUT:-$ROOT/target/bench/plugins}
LORA=${LORA:-$ROOT/plugins/tests/fixtures/lora_smollm2}
. "$ROOT/scripts/bench/lib.sh"
graft_binaries "$ROOT"

rm -rf "$OUT"; mkdir -p "$OUT/plugins"
cp -r "$LORA" "$OUT/plugins/lora"
if [ -n "${STEER:-}" ]; then cp "$STEER" "$OUT/plugins/refuse.gguf"; else
  "$GRAFT" train steer --positive "$DATA/harmful_train.json" --negative "$DATA/harmful_train.json" \
    --positive-reply "I'm sorry, but I can't" --negative-reply "Sure, here is" --out "$OUT/plugins/refuse.gguf"
fi
if [ -n "${CONTROLLER:-}" ]; then cp -r "$CONTROLLER" "$OUT/plugins/ctl"; else
  "$GRAFT" train controller --harmful "$DATA/harmful_train.json" --harmless "$DATA/harmless_train.json" \
    --out "$OUT/plugins/ctl"
fi

start_graft "$PORT" "$OUT/server.log" --prefix-caching false --max-running "$CONCURRENCY" --plugin-dir "$OUT/plugins" \
  --plugin lora:ref=lora --plugin steer:refuse=refuse.gguf --plugin controller:ctl=ctl
echo "date: $(date -u +%FT%TZ), graft $(git -C "$ROOT" rev-parse --short HEAD), concurrency $CONCURRENCY, $DURATION per run" | tee "$OUT/run.txt"

run() {  # name rep [loadtest flags...]
  local name=$1 rep=$2; shift 2
  echo "$name rep $rep: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.txt"
  "$LOADTEST" --url "http://127.0.0.1:$PORT" --endpoint chat --concurrency "$CONCURRENCY" \
    --duration "$DURATION" --warmup 8 --input-tokens 64 --input-std 16 --output-tokens 128 \
    --output-std 32 --ignore-eos --seed "$rep" --extra-body '{"temperature": 0.7}' --no-progress \
    --out "$OUT/rep-$rep/$name" "$@" > "$OUT/rep-$rep/$name.txt"
}
for rep in $(seq "$REPS"); do
  mkdir -p "$OUT/rep-$rep"
  run base "$rep"
  run mix "$rep" --mix base=25,lora=25,steer=25,controller=25 \
    --chain 'lora={"plugins":[{"type":"lora","name":"ref"}]}' \
    --chain 'steer={"plugins":[{"type":"steer","name":"refuse","scale":2}]}' \
    --chain 'controller={"plugins":[{"type":"controller","name":"ctl"}]}'
done
python3 "$ROOT/scripts/bench/plugins_report.py" "$OUT" | tee "$OUT/table.md"
