#!/usr/bin/env python3
"""Builds data/ahoy/: a LoRA training set for a behaviour the default model lacks, namely every
reply opening with "Ahoy, matey!". The instructions are Alpaca ones from
shared/data/refusal/harmless_train.json (Apache-2.0); each target is that greeting followed by
the base model's own greedy answer, fetched from a running graft server, so the adapter learns
the greeting and nothing else about the answers.

Writes train.jsonl (chat examples) and heldout.json (instructions never trained on, for the
end-to-end test). Standard library only.

usage: scripts/data/make_ahoy.py URL [TRAIN] [HELDOUT]   (e.g. http://127.0.0.1:8080 96 24)
"""
import json
import os
import random
import sys
import urllib.request

GREETING = "Ahoy, matey!"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "..", "shared", "data", "refusal", "harmless_train.json")


def answer(url, instruction):
    body = {
        "messages": [{"role": "user", "content": instruction}],
        "max_tokens": 48,
        "temperature": 0,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        text = json.load(r)["choices"][0]["message"]["content"].strip()
    # Answers cut at max_tokens end at their last full sentence, so the adapter does not learn
    # to stop mid-sentence.
    end = max(text.rfind(c) for c in ".!?")
    return text[: end + 1] if end > 0 else text


def main():
    url = sys.argv[1].rstrip("/")
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    n_heldout = int(sys.argv[3]) if len(sys.argv) > 3 else 24
    with open(SOURCE) as f:
        # Short, self-contained instructions (no input field to paste), so answers fit 48 tokens.
        pool = [x["instruction"] for x in json.load(f) if len(x["instruction"]) < 90]
    random.Random(0).shuffle(pool)
    train, heldout = pool[:n_train], pool[n_train : n_train + n_heldout]
    out = os.path.join(ROOT, "data", "ahoy")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for i, instruction in enumerate(train):
            reply = f"{GREETING} {answer(url, instruction)}"
            messages = [
                {"role": "user", "content": instruction},
                {"role": "assistant", "content": reply},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
            print(f"\ranswered {i + 1}/{len(train)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    with open(os.path.join(out, "heldout.json"), "w") as f:
        json.dump(heldout, f, indent=1)
    print(f"wrote {len(train)} examples and {len(heldout)} held-out instructions to {out}")


if __name__ == "__main__":
    main()
