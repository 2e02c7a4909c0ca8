#!/usr/bin/env bash
# The CUDA check for a machine with one NVIDIA GPU, in under 8 minutes: builds the server with
# the `cuda` feature (nvcc from PyPI wheels, as scripts/cuda/build.sh), serves the default model
# on the GPU and on the CPU side by side, and compares them: greedy completions token for
# token and the prompt log-probs of a fixed text (the CPU path is the one checked against
# transformers, tests/e2e/test_agreement.py); then a short load test on each (concurrency 1
# and 8). Results go to target/gpu-check/ (summary.json, a loadtest report folder per device) for
# docs/BENCHMARKS.md. Not run on the CPU-only build machines.
#
#   scripts/gpu_check.sh               # CUDA_COMPUTE_CAP from nvidia-smi (90 on H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
mkdir -p "$out"
cap=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
source scripts/cuda/env.sh
CUDA_COMPUTE_CAP=$cap cargo build -q --release --locked -p server --features cuda -p loadtest
bin=target/release/server
model=$("$bin" fetch)

start() {  # device port
  "$bin" serve --model "$model" --device "$1" --port "$2" > "$out/server-$1.log" 2>&1 &
  echo $!
}
gpu_pid=$(start cuda 18401)
cpu_pid=$(start cpu 18402)
trap 'kill $gpu_pid $cpu_pid 2> /dev/null || true' EXIT
for port in 18401 18402; do
  for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.5; done
  curl -sf "http://127.0.0.1:$port/health" > /dev/null || { tail -20 "$out"/server-*.log; exit 1; }
done

python3 - "$out" <<'PY'
import json, sys, urllib.request
out = sys.argv[1]
def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
model = "smollm2-135m-instruct"
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
summary = {"greedy": [], "prompt_logprobs": []}
for p in prompts:
    body = {"model": model, "prompt": p, "max_tokens": 32, "temperature": 0,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    gpu, cpu = post(18401, body), post(18402, body)
    g, c = gpu["choices"][0]["logprobs"]["tokens"], cpu["choices"][0]["logprobs"]["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(g, c)) if a != b), len(g))
    summary["greedy"].append({"prompt": p, "tokens": len(c), "agree_for": same})
text = open("README.md").read()[:4000]
body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}
gpu, cpu = post(18401, body), post(18402, body)
g = gpu["choices"][0]["logprobs"]["token_logprobs"][1:]
c = cpu["choices"][0]["logprobs"]["token_logprobs"][1:]
diffs = [abs(a - b) for a, b in zip(g, c)]
summary["prompt_logprobs"] = {"tokens": len(diffs), "max_abs_diff": max(diffs),
                              "mean_abs_diff": sum(diffs) / len(diffs),
                              "nll_gpu": -sum(g) / len(g), "nll_cpu": -sum(c) / len(c)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY

for port_device in 18401:cuda 18402:cpu; do
  port=${port_device%%:*} device=${port_device#*:}
  target/release/loadtest --url "http://127.0.0.1:$port" --model smollm2-135m-instruct \
    --sweep-concurrency 1,8 --duration 30s --warmup 4 --input-tokens 128 --output-tokens 128 \
    --ignore-eos --no-progress --out "$out/loadtest-$device" | tail -8
done
