"""Speculative decoding through the real server and the official openai client: a request's
`speculative` plug-in (prompt-lookup drafts, verified by the model) must return exactly what
the same request returns without it: the same tokens with the same log-probs, bit for bit,
greedy on 50 prompts (30 that quote, correct or reformat one of 10 passages, where drafts are
accepted often, and 20 open chat instructions) and seeded sampled. The engine's counters show the
drafts were fed and some accepted.
"""
import json
import re
import struct

import requests

from pathlib import Path

from conftest import MODEL_ID, ROOT

NGRAM = {"type": "speculative", "method": "ngram", "num_speculative_tokens": 4,
         "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text as a bulleted list, keeping its wording:\n\n{}",
    "Fix any spelling mistakes in the following text and return it in full:\n\n{}",
]
MAX_TOKENS = 40


def passages(n: int) -> list[str]:
    """Paragraphs of prose (no code, tables, lists or headings) of 300-900 characters (about
    60-200 tokens) from the project's own docs."""
    prose = []
    for doc in ("docs/ARCHITECTURE.md", "README.md"):
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", (ROOT / doc).read_text())]
        prose += [p for p in paragraphs if 300 <= len(p) <= 900 and not p.startswith(tuple("#|`-*><"))]
    assert len(prose) >= n, f"only {len(prose)} paragraphs of prose"
    return prose[:n]


def grounded_prompts(n: int) -> list[str]:
    """Each of `n` passages with every task."""
    return [task.format(p) for p in passages(n) for task in TASKS]


def chat_prompts() -> list[str]:
    return json.loads((Path(__file__).parent / "fixtures" / "agreement_prompts.json").read_text())


def answer(client, prompt: str, plugins: list, **sampling) -> tuple:
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        logprobs=True,
        extra_body={"plugins": plugins, "return_tokens_as_token_ids": True},
        **sampling,
    )
    choice = r.choices[0]
    tokens = [(e.token, struct.pack("<d", e.logprob)) for e in choice.logprobs.content]
    return choice.message.content, choice.finish_reason, tokens, r.usage.completion_tokens


def spec_counters(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=30).text
    names = ("drafts", "draft_tokens", "accepted_tokens")
    return {n: float(re.search(rf"^vllm:spec_decode_num_{n}_total (\S+)$", text, re.M).group(1)) for n in names}


def test_speculation_leaves_greedy_output_unchanged_on_50_prompts(client, server):
    prompts = grounded_prompts(10) + chat_prompts()[:20]
    assert len(prompts) == 50
    before = spec_counters(server.url)
    differ = []
    for i, prompt in enumerate(prompts):
        base = answer(client, prompt, [], temperature=0)
        drafted = answer(client, prompt, [NGRAM], temperature=0)
        if drafted != base:
            differ.append((i, base[0], drafted[0]))
    assert not differ, f"{len(differ)} of 50 differ, first: {differ[0]}"
    after = spec_counters(server.url)
    fed = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    assert fed > 0 and 0 < accepted <= fed, (before, after)


def test_seeded_sampling_is_identical_with_and_without_speculation(client):
    for prompt in grounded_prompts(1) + chat_prompts()[:3]:
        for seed in (1, 2):
            sampling = {"temperature": 0.8, "top_p": 0.95, "seed": seed}
            base = answer(client, prompt, [], **sampling)
            assert answer(client, prompt, [NGRAM], **sampling) == base, (prompt[:60], seed)
