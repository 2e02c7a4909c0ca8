#!/usr/bin/env python3
"""Cross-checks smollm2_reference.json against llama.cpp (writes no fixture; prints a report).

usage: llamacpp_crosscheck.py GGUF [--server PATH/llama-server] [--port 8094] [--threads 2]

Two llama.cpp runs on the same prompt ids, each through llama-server /completion
(n_probs=10, greedy, 32 tokens, no prompt cache):
  f32   the GGUF with every tensor dequantized to F32 (written to a temporary file): llama.cpp
        then does plain float32 matmuls, so it should match the transformers float32 reference
        to ~1e-3 nats. This checks the reference itself (rope layout, norms, tied head, template).
  quant the GGUF as is: llama.cpp quantizes activations for the quantized dot products, so the
        log-probs move by up to a few tenths of a nat; this shows what tolerance a quantized
        implementation needs against the float32 reference.
llama.cpp stops at EOS, so greedy ids are compared up to the shorter length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402
from tokenizer_reference import DEFAULT_SERVER, free_port, post  # noqa: E402


def dequantize_to_f32(src: str, dst: str) -> None:
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        val = 0 if f.name == "general.file_type" else f.contents()  # 0 = ALL_F32
        w.add_key_value(f.name, val, vt, sub_type=sub)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, a.reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_server(server: str, gguf_path: str, port: int, threads: int, ref: dict) -> dict:
    log = open(os.path.join(tempfile.gettempdir(), f"llama-server-crosscheck-{port}.log"), "w")
    proc = subprocess.Popen([server, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-c", "1024", "-np", "1", "--no-warmup"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    out = {}
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        for p in ref["prompts"]:
            r = post(base + "/completion", {"prompt": p["prompt_ids"], "n_predict": 32, "temperature": 0,
                                            "samplers": ["top_k"], "top_k": 1, "n_probs": 10,
                                            "cache_prompt": False, "return_tokens": True})
            out[p["name"]] = (r["tokens"], r["completion_probabilities"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return out


def report(label: str, ref: dict, got: dict) -> float:
    worst = 0.0
    print(f"--- llama.cpp {label} vs transformers float32 reference")
    for p in ref["prompts"]:
        ids, probs = got[p["name"]]
        n = min(len(ids), len(p["greedy_ids"]))
        agree = next((k for k in range(n) if ids[k] != p["greedy_ids"][k]), n)
        at = f"diverges at {agree} (ref margin there {p['greedy_margins'][agree]})" if agree < n else "all agree"
        # llama-server reports probabilities per emitted piece: a token that is an incomplete UTF-8
        # character gets none of its own, so the first entry only describes step 0 when ids match.
        if probs and probs[0]["id"] == ids[0]:
            first = {t["id"]: t["logprob"] for t in probs[0]["top_logprobs"]}
            diffs = [abs(first[i] - lp) for i, lp in p["top10"] if i in first]
            worst = max(worst, max(diffs))
            top = (f"top1 {probs[0]['top_logprobs'][0]['id']:6d} (ref {p['top10'][0][0]:6d}) max|dlogprob| over "
                   f"shared top10 {max(diffs):.5f} ({len(diffs)}/10 shared)")
        else:
            top = "top10 n/a (first token is part of a UTF-8 character)"
        print(f"{p['name']:24s} {top}; greedy {agree}/{n} {at}")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--server", default=DEFAULT_SERVER)
    ap.add_argument("--reference", default=os.path.join(C.FIXTURES, "smollm2_reference.json"))
    ap.add_argument("--port", type=int, default=8094)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ref = json.load(open(args.reference, encoding="utf-8"))
    assert ref["gguf_sha256"] == C.sha256_file(args.gguf), "reference was made from another GGUF"
    port = free_port(args.port)
    with tempfile.TemporaryDirectory() as d:
        f32 = os.path.join(d, "model-f32.gguf")
        dequantize_to_f32(args.gguf, f32)
        got_f32 = run_server(args.server, f32, port, args.threads, ref)
    got_q = run_server(args.server, args.gguf, port, args.threads, ref)
    w32 = report("F32-dequantized GGUF", ref, got_f32)
    wq = report("quantized GGUF as is", ref, got_q)
    print(f"worst |dlogprob| over the shared top-10 entries: f32 {w32:.5f}, quantized {wq:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
