#!/usr/bin/env python3
"""Reference perplexity of SmolLM2-135M-Instruct (GGUF dequantized to float32 by transformers);
writes models/tests/fixtures/smollm2_perplexity.json.

usage: perplexity_reference.py GGUF [--text /usr/share/common-licenses/GPL-3] [--out PATH]
                               [--windows 4] [--window 512] [--threads N]

Definition: tokenize the whole text file (UTF-8, corrected SmolLM tokenizer, no BOS, special-token
text not parsed), keep the first windows*window tokens, split them into `windows` non-overlapping
windows of `window` tokens, score each window independently from an empty context, take the NLL
of tokens 1..window-1 of each window given the tokens before it in that window (window-1
predictions per window; token 0 of each window is context only), and report
perplexity = exp(mean NLL over all windows*(window-1) predictions).
This is NOT llama-perplexity's figure (that one adds BOS and scores only the second half of
each window).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--out", default=os.path.join(C.FIXTURES, "smollm2_perplexity.json"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    t0 = time.time()
    meta = C.gguf_meta(args.gguf)
    tok = C.build_tokenizer(meta)
    tok_hf = C.transformers_tokenizer(args.gguf, fix_pre_tokenizer=True)
    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    all_ids = C.encode(tok, text, parse_special=False)
    assert all_ids == C.encode(tok_hf, text, parse_special=False), "tokenizers disagree on the text"
    n = args.windows * args.window
    assert len(all_ids) >= n, f"text has only {len(all_ids)} tokens, need {n}"
    ids = all_ids[:n]

    model = C.load_model(args.gguf, args.threads)
    win_out, nll_all = [], []
    with torch.inference_mode():
        for w in range(args.windows):
            chunk = ids[w * args.window:(w + 1) * args.window]
            x = torch.tensor([chunk], dtype=torch.long)
            logits = model(input_ids=x, use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            nll = (-logp[:-1].gather(1, x[0, 1:, None])[:, 0]).tolist()
            nll_all.extend(nll)
            mean = sum(nll) / len(nll)
            win_out.append({
                "start": w * args.window,
                "n_predictions": len(nll),
                "mean_nll": round(mean, 6),
                "perplexity": round(math.exp(mean), 5),
                "token_nll": [round(v, 4) for v in nll],
            })
            C.eprint(f"window {w}: mean nll {mean:.6f} ppl {math.exp(mean):.5f}")
    mean_nll = sum(nll_all) / len(nll_all)
    ppl = math.exp(mean_nll)
    C.eprint(f"perplexity {ppl:.6f} over {len(nll_all)} predictions ({time.time() - t0:.1f}s)")

    doc = {
        "description": "SmolLM2-135M-Instruct perplexity reference: transformers, GGUF dequantized to float32",
        "generator": "scripts/reference/perplexity_reference.py",
        "tools": C.versions(),
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256": C.sha256_file(args.gguf),
        "dtype": "float32",
        "definition": {
            "text_source": args.text,
            "text_sha256": C.sha256_file(args.text),
            "text_tokens_total": len(all_ids),
            "tokenization": "whole file as UTF-8, corrected SmolLM tokenizer (digits split), no BOS, "
                            "special-token text not parsed; first windows*window tokens kept",
            "bos": False,
            "windows": args.windows,
            "window": args.window,
            "n_tokens": n,
            "scoring": "each window evaluated independently from an empty context (no KV carried over); "
                       "NLL of tokens 1..window-1 of each window given the preceding tokens of that window",
            "predictions_per_window": args.window - 1,
            "n_predictions": len(nll_all),
            "formula": "perplexity = exp(sum of NLL over all predictions / n_predictions), natural log",
        },
        "perplexity": round(ppl, 6),
        "mean_nll": round(mean_nll, 7),
        "windows": win_out,
        "token_ids": ids,
    }
    C.write_json(args.out, doc)
    C.eprint(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
