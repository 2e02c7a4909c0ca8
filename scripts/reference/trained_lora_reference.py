#!/usr/bin/env python3
"""Reference for an adapter written by `server train lora`: Hugging Face `peft` loads it with
PeftModel.from_pretrained onto SmolLM2-135M-Instruct (GGUF dequantized to float32, as
model_reference.py loads it), which fails on anything in the files peft does not accept, and
records the adapted model's last-position top-10 log-probs and its greedy continuation on the
shared prompt set. plugins/tests/peft_reference.rs checks that graft serves the same numbers.

usage: trained_lora_reference.py GGUF [--adapter-dir data/ahoy/adapter]
                                      [--out plugins/tests/fixtures/ahoy_reference.json]
                                      [--threads 2] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402
import lora_reference as L  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--adapter-dir", default=os.path.join(C.REPO_ROOT, "data", "ahoy", "adapter"))
    ap.add_argument("--out", default=os.path.join(L.PLUGIN_FIXTURES, "ahoy_reference.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    t0 = time.time()
    meta = C.gguf_meta(args.gguf)
    tok = C.build_tokenizer(meta)
    model = PeftModel.from_pretrained(C.load_model(args.gguf, args.threads), args.adapter_dir)
    model.eval()
    n_lora = sum(".lora_A." in n or ".lora_B." in n for n, _ in model.named_parameters())
    C.eprint(f"peft loaded {n_lora} LoRA tensors from {args.adapter_dir} in {time.time() - t0:.1f}s")
    assert n_lora > 0
    with torch.inference_mode():
        prompts = L.run_prompts(model, tok, meta, args.steps)
    for e in prompts:
        e.pop("top1_logprob_unrounded", None)
    with open(os.path.join(args.adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    doc = {
        "description": "SmolLM2-135M-Instruct + an adapter trained by `server train lora`, loaded by "
                       "peft's PeftModel.from_pretrained; GGUF dequantized to float32",
        "generator": "scripts/reference/trained_lora_reference.py",
        "tools": L.tool_versions(),
        "gguf_sha256": C.sha256_file(args.gguf),
        "adapter": {"path": os.path.relpath(args.adapter_dir, C.REPO_ROOT), "config": config},
        "steps": args.steps,
        "prompts": prompts,
    }
    C.write_json(args.out, doc)
    C.eprint(f"wrote {args.out} ({len(prompts)} prompts) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
