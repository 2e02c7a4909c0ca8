#!/usr/bin/env python3
"""Prompts for scripts/bench/speculative.sh, as loadtest --prompts JSONL (chat messages, 128
output tokens each):

- grounded.jsonl: requests that quote, correct or reformat a given passage of 200-400 tokens
  (the workload prompt lookup is for). Passages are consecutive prose paragraphs of the
  project's own docs (README.md, docs/*.md), so the benchmark needs no download; the
  "correct" task gets a copy with seeded typos (adjacent letters swapped in one word in
  twelve).
- chat.jsonl: open chat, the first 64 harmless validation instructions of shared/data/refusal.

Standard library only. usage: speculative_prompts.py OUT_DIR [SHARED_DATA_REFUSAL]
"""
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = {
    "quote": "Repeat the following text exactly, word for word:\n\n{}",
    "correct": "The following text has spelling mistakes. Return it in full with the mistakes fixed:\n\n{}",
    "reformat": "Rewrite the following text as a bulleted list, one sentence per bullet, keeping its wording:\n\n{}",
}
# Characters per token of this prose under the SmolLM2 tokenizer, roughly (measured: 4.3).
CHARS_PER_TOKEN = 4.3


def prose_paragraphs(path: Path) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text())]
    return [p for p in paragraphs if len(p) > 120 and not p.startswith(tuple("#|`-*><!["))]


def passages() -> list[str]:
    """Runs of consecutive paragraphs of 200-400 tokens (about 860-1720 characters)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        run = ""
        for p in prose_paragraphs(path):
            run = f"{run}\n\n{p}" if run else p
            if len(run) >= 200 * CHARS_PER_TOKEN:
                if len(run) <= 400 * CHARS_PER_TOKEN:
                    out.append(run)
                run = ""
    return out


def with_typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 4 and w.isalpha() and rng.random() < 1 / 12:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def main():
    out = Path(sys.argv[1])
    refusal = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "data" / "refusal"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    found = passages()
    with open(out / "grounded.jsonl", "w") as f:
        for i, passage in enumerate(found):
            task = list(TASKS)[i % len(TASKS)]
            text = with_typos(passage, rng) if task == "correct" else passage
            message = {"role": "user", "content": TASKS[task].format(text)}
            f.write(json.dumps({"messages": [message], "max_tokens": 128}) + "\n")
    instructions = [e["instruction"] for e in json.loads((refusal / "harmless_val.json").read_text())][:64]
    with open(out / "chat.jsonl", "w") as f:
        for instruction in instructions:
            message = {"role": "user", "content": instruction}
            f.write(json.dumps({"messages": [message], "max_tokens": 128}) + "\n")
    print(f"{len(found)} grounded prompts, {len(instructions)} chat prompts in {out}")


if __name__ == "__main__":
    main()
