#!/usr/bin/env python3
"""Reference log-probs and greedy continuations of SmolLM2-135M-Instruct (GGUF, dequantized to
float32 by transformers) for a fixed prompt set; writes models/tests/fixtures/smollm2_reference.json.

usage: model_reference.py GGUF [--out PATH] [--threads N] [--steps 32]

Per prompt (see PROMPTS in smollm2_common.py):
  prompt_ids       token ids of the rendered prompt (corrected SmolLM tokenizer, no BOS added)
  top10            [[id, logprob], ...] the 10 most likely next tokens after the whole prompt
  prompt_logprobs  [log p(prompt_ids[i] | prompt_ids[:i]) for i in 1..n-1]  (n-1 values)
  greedy_ids       argmax continuation, exactly `steps` tokens, no stopping at EOS/<|im_end|>
  greedy_logprobs  log-prob of each greedy token at its step
  greedy_margins   at each greedy step, logprob(top-1) - logprob(top-2) in nats
All log-probs are natural-log log-softmax over the full vocabulary (computed in float64 from the
float32 logits), rounded to 5 decimals.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402


def r5(x: float) -> float:
    return round(float(x), 5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--out", default=os.path.join(C.FIXTURES, "smollm2_reference.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()

    import torch

    t0 = time.time()
    meta = C.gguf_meta(args.gguf)
    if meta["chat_template"] != C.EXPECTED_CHAT_TEMPLATE:
        C.eprint("note: the GGUF chat template differs from the expected SmolLM2 one; using the GGUF's")
    assert meta["add_bos_token"] is False, "expected tokenizer.ggml.add_bos_token = false"
    tok = C.build_tokenizer(meta)
    tok_hf = C.transformers_tokenizer(args.gguf, fix_pre_tokenizer=True)
    model = C.load_model(args.gguf, args.threads)
    C.eprint(f"loaded in {time.time() - t0:.1f}s")

    out_prompts = []
    with torch.inference_mode():
        for p in C.PROMPTS:
            text = C.prompt_text(meta, p)
            ids = C.encode(tok, text)
            assert ids == C.encode(tok_hf, text), f"{p['name']}: tokenizers disagree"
            x = torch.tensor([ids], dtype=torch.long)
            out = model(input_ids=x, use_cache=False)
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)  # [n, vocab]
            top = torch.topk(logp[-1], 10)
            top10 = [[int(i), r5(v)] for v, i in zip(top.values, top.indices)]
            tgt = x[0, 1:]
            prompt_lp = logp[:-1].gather(1, tgt[:, None])[:, 0].tolist()

            # Greedy decoding recomputes the whole sequence at every step (no KV cache), so each
            # step is an independent full forward pass: the plainest possible reference.
            seq = list(ids)
            last = logp[-1]
            g_ids, g_lp, g_margin = [], [], []
            for step in range(args.steps):
                t2 = torch.topk(last, 2)
                nxt = int(t2.indices[0])
                g_ids.append(nxt)
                g_lp.append(r5(t2.values[0]))
                g_margin.append(r5(t2.values[0] - t2.values[1]))
                if step + 1 == args.steps:
                    break
                seq.append(nxt)
                o = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
                last = torch.log_softmax(o.logits[0, -1].double(), dim=-1)

            eos = {meta["eos_token_id"], 0}
            first_stop = next((i for i, t in enumerate(g_ids) if t in eos), None)
            entry = {"name": p["name"], "kind": p["kind"]}
            if p["kind"] == "chat":
                entry["messages"] = p["messages"]
            else:
                entry["text"] = p["text"]
            entry.update({
                "prompt_text": text,
                "n_prompt": len(ids),
                "prompt_ids": ids,
                "top10": top10,
                "prompt_logprobs": [r5(v) for v in prompt_lp],
                "greedy_ids": g_ids,
                "greedy_text": tok.decode(g_ids, skip_special_tokens=False),
                "greedy_first_eos_index": first_stop,
                "greedy_logprobs": g_lp,
                "greedy_margins": g_margin,
            })
            out_prompts.append(entry)
            C.eprint(f"{p['name']}: n={len(ids)} top1={top10[0]} margin0={g_margin[0]} "
                     f"min_margin={min(g_margin):.5f} text={entry['greedy_text']!r}")

    doc = {
        "description": "SmolLM2-135M-Instruct reference: transformers, GGUF dequantized to float32",
        "generator": "scripts/reference/model_reference.py",
        "tools": C.versions(),
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256": C.sha256_file(args.gguf),
        "gguf": C.gguf_summary(meta),
        "dtype": "float32",
        "bos_added": False,
        "chat_template": meta["chat_template"],
        "tokenizer": "GGUF vocab+merges; pre-tokenizer Sequence[Digits(individual_digits=True), "
                     "ByteLevel(add_prefix_space=False, use_regex=True)] (llama.cpp pre 'smollm')",
        "definitions": {
            "logprob": "natural-log log_softmax over the full vocabulary, float64 from float32 logits, 5 decimals",
            "top10": "[[token_id, logprob]] of the next token after the full prompt, best first",
            "prompt_logprobs": "logprob of prompt_ids[i] given prompt_ids[:i], i = 1..n_prompt-1",
            "greedy_ids": f"{args.steps} argmax tokens after the prompt (full recompute each step, no KV cache), no stop on EOS",
            "greedy_logprobs": "logprob of the greedy token at each step",
            "greedy_margins": "logprob(top-1) - logprob(top-2) at each greedy step, nats; a small "
                              "margin means a near-tie that another implementation may break differently",
            "greedy_first_eos_index": "index in greedy_ids of the first <|im_end|> (2) or <|endoftext|> (0), or null",
        },
        "prompts": out_prompts,
    }
    C.write_json(args.out, doc)
    C.eprint(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
