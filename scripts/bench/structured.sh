#!/usr/bin/env bash
# Structured outputs: the decode cost of a constrained row against an unconstrained one, through
# the server on the default model (streaming chat, concurrency 1, 128 tokens with ignore_eos, one
# graft server for all configurations, prefix caching off). Constrained rows use schemas that
# cannot close within 128 tokens (with `ignore_eos` a closed one would go on with end tokens
# only), so every step computes a mask over the model's output:
#   plain    no response_format
#   string   {"story": <string of at least 2000 characters>}: one long string lexeme
#   records  an array of at least 50 {"name": <string of at most 20>, "score": <0..100>,
#            "tier": <enum>} objects: a parser state change every few tokens
#   tool     tool_choice "required" with one function whose arguments hold a string of at
#            least 2000 characters: the tool-call grammar (tags, then the arguments' schema),
#            the calls parsed and streamed as delta.tool_calls; its prompt also carries the
#            tools prompt (about 160 tokens more than the others)
# Configurations alternate within each repetition. Writes under target/bench/structured/:
# rep-N/<config>/{summary.json,...}, server.log, run.txt and table.md (medians of TPOT and
# TTFT over repetitions, ratios against plain).
#
# usage: scripts/bench/structured.sh [REPS]   (default 3)
# env:   REQUESTS (per configuration and repetition, 10), THREADS (2), OUT, PORT
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REQUESTS=${REQUESTS:-10}
THREADS=${THREADS:-2}
PORT=${PORT:-18093}
OUT=${OUT:-$ROOT/target/bench/structured}
# shellcheck source=lib.sh
. "$ROOT/scripts/bench/lib.sh"
graft_binaries "$ROOT"
rm -rf "$OUT"; mkdir -p "$OUT"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $0 $REPS (REQUESTS=$REQUESTS THREADS=$THREADS)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "graft: $(git -C "$ROOT" rev-parse --short HEAD), RAYON_NUM_THREADS=$THREADS"
} | tee "$OUT/run.txt"
start_graft "$PORT" "$OUT/server.log" --prefix-caching false --max-running 4

string='{"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}'
records='{"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "score": {"type": "integer", "minimum": 0, "maximum": 100}, "tier": {"enum": ["gold", "silver", "bronze"]}}, "required": ["name", "score", "tier"], "additionalProperties": false}, "minItems": 50}'
notes='{"type": "object", "properties": {"notes": {"type": "string", "minLength": 2000}}, "required": ["notes"]}'
body() {  # config
  case $1 in
    plain) echo '{"temperature": 0.7}' ;;
    string) echo "{\"temperature\": 0.7, \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"s\", \"schema\": $string}}}" ;;
    records) echo "{\"temperature\": 0.7, \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"r\", \"schema\": $records}}}" ;;
    tool) echo "{\"temperature\": 0.7, \"tool_choice\": \"required\", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"save_notes\", \"description\": \"Save notes\", \"parameters\": $notes}}]}" ;;
  esac
}

for rep in $(seq "$REPS"); do
  for config in plain string records tool; do
    echo "rep $rep $config: load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$LOADTEST" --url "http://127.0.0.1:$PORT" --endpoint chat --concurrency 1 \
      --requests "$REQUESTS" --warmup 1 --input-tokens 64 --output-tokens 128 --ignore-eos \
      --seed "$rep" --extra-body "$(body $config)" --no-progress \
      --out "$OUT/rep-$rep/$config" > "$OUT/rep-$rep-$config.txt"
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import glob, json, os, statistics, sys
out = sys.argv[1]
def med(config, get):
    vals = [get(json.load(open(p))["levels"][0])
            for p in glob.glob(os.path.join(out, "rep-*", config, "summary.json"))]
    return statistics.median(vals)
rows = [("TPOT p50 ms", lambda l: l["tpot_ms"]["p50"]), ("TTFT p50 ms", lambda l: l["ttft_ms"]["p50"]),
        ("out tok/s", lambda l: l["output_token_rate"])]
configs = ("plain", "string", "records", "tool")
print("| metric | " + " | ".join(configs) + " | string / plain | records / plain | tool / plain |")
print("|---" * (len(configs) + 4) + "|")
for name, get in rows:
    p, s, r, t = (med(c, get) for c in configs)
    print(f"| {name} | {p:.2f} | {s:.2f} | {r:.2f} | {t:.2f} | {s / p:.3f}x | {r / p:.3f}x | {t / p:.3f}x |")
PY
