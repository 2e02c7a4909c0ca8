"""Prefill/decode agreement through the real server: the log-prob the server reports for each
token it generates greedily must equal, bit for bit, the log-prob of the same token when the
whole conversation is scored in one prefill pass (/v1/completions with `echo`, `max_tokens: 0`).

Everything travels as token ids (/tokenize renders the chat prompt as the chat route does;
`return_tokens_as_token_ids` names the generated tokens), so no text is re-tokenized. The same
prompts then run again with all chats and all scorings in flight at once, mixing decode rows
and prefill rows in the engine's batches: each answer must equal its sequential twin bit for bit.

Run as a script (`.venv-e2e/bin/python tests/e2e/test_agreement.py`) it starts its own server
on the debug binary, prints the figures and writes docs/bench/agreement.json.
"""
import json
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import MODEL_ID, ROOT, Server

PROMPTS = Path(__file__).parent / "fixtures" / "agreement_prompts.json"
MAX_TOKENS = 32
TOP = 5
AS_IDS = {"return_tokens_as_token_ids": True}


def bits(x: float) -> bytes:
    """Exact comparison: -0.0 and 0.0 differ, as they would on the wire."""
    return struct.pack("<d", x)


def token_id(name: str) -> int:
    prefix, _, number = name.partition(":")
    assert prefix == "token_id" and number.isdigit(), f"not a token-id name: {name!r}"
    return int(number)


def prompt_ids(url: str, instruction: str) -> list[int]:
    """The chat prompt's tokens, rendered exactly as /v1/chat/completions renders it."""
    messages = [{"role": "user", "content": instruction}]
    r = requests.post(url + "/tokenize", json={"model": MODEL_ID, "messages": messages}, timeout=60)
    r.raise_for_status()
    return r.json()["tokens"]


def generate(client, instruction: str) -> dict:
    """Greedy chat: the generated ids, each one's log-prob and its top alternatives."""
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": instruction}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        logprobs=True,
        top_logprobs=TOP,
        extra_body=AS_IDS,
    )
    content = r.choices[0].logprobs.content
    return {
        "ids": [token_id(e.token) for e in content],
        "logprobs": [e.logprob for e in content],
        "top": [{t.token: t.logprob for t in e.top_logprobs} for e in content],
        "finish_reason": r.choices[0].finish_reason,
    }


def score(client, tokens: list[int]) -> dict:
    """One prefill pass over `tokens`: each token's log-prob (None for the first) and top."""
    r = client.completions.create(
        model=MODEL_ID, prompt=tokens, max_tokens=0, echo=True, logprobs=TOP, extra_body=AS_IDS
    )
    lp = r.choices[0].logprobs
    assert [token_id(t) for t in lp.tokens] == tokens, "echo returned other tokens than sent"
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens == 0
    return {"logprobs": lp.token_logprobs, "top": lp.top_logprobs}


def compare(prompt: list[int], gen: dict, scored: dict) -> dict:
    """Generated token i sits at position len(prompt) + i of the scored sequence."""
    at = len(prompt)
    decode, prefill = gen["logprobs"], scored["logprobs"][at:]
    assert len(prefill) == len(decode)
    same = [same_floats([a], [b]) for a, b in zip(decode, prefill)]
    tops = [same_top([a], [b]) for a, b in zip(gen["top"], scored["top"][at:])]
    return {
        "positions": len(same),
        "agree": sum(same),
        "top_agree": sum(tops),
        "max_abs_diff": max((abs(a - b) for a, b in zip(decode, prefill)), default=0.0),
        "first_difference": next((i for i, s in enumerate(same) if not s), None),
    }


def sequential(client, url: str, instructions: list[str]) -> list[dict]:
    runs = []
    for instruction in instructions:
        prompt = prompt_ids(url, instruction)
        gen = generate(client, instruction)
        scored = score(client, prompt + gen["ids"])
        runs.append({"prompt": prompt, "gen": gen, "scored": scored, **compare(prompt, gen, scored)})
    return runs


def same_floats(a: list, b: list) -> bool:
    """Equal bit for bit, `None` (the first prompt token's log-prob) only where `None`."""
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and bits(x) == bits(y))
        for x, y in zip(a, b)
    )


def same_top(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (x is not None and y is not None and x.keys() == y.keys() and same_floats(list(x.values()), [y[k] for k in x]))
        for x, y in zip(a, b)
    )


def concurrent(client, runs: list[dict], instructions: list[str]) -> dict:
    """Every chat and every scoring of the sequential pass at once (decode and prefill rows
    share steps); counts the answers that equal their sequential twins bit for bit."""
    with ThreadPoolExecutor(max_workers=2 * len(runs)) as pool:
        gen_futures = [pool.submit(generate, client, i) for i in instructions]
        score_futures = [pool.submit(score, client, r["prompt"] + r["gen"]["ids"]) for r in runs]
        gens = [f.result() for f in gen_futures]
        scores = [f.result() for f in score_futures]
    chats = [
        g["ids"] == r["gen"]["ids"] and same_floats(g["logprobs"], r["gen"]["logprobs"]) and same_top(g["top"], r["gen"]["top"])
        for g, r in zip(gens, runs)
    ]
    scorings = [
        same_floats(s["logprobs"], r["scored"]["logprobs"]) and same_top(s["top"], r["scored"]["top"])
        for s, r in zip(scores, runs)
    ]
    agreement = [compare(r["prompt"], g, s) for g, s, r in zip(gens, scores, runs)]
    return {
        "requests_in_flight": 2 * len(runs),
        "chats_identical": sum(chats),
        "scorings_identical": sum(scorings),
        "positions": sum(a["positions"] for a in agreement),
        "agree": sum(a["agree"] for a in agreement),
    }


def measure(client, url: str) -> dict:
    instructions = json.loads(PROMPTS.read_text())
    runs = sequential(client, url, instructions)
    together = concurrent(client, runs, instructions)
    return {
        "model": MODEL_ID,
        "prompts": len(runs),
        "max_tokens": MAX_TOKENS,
        "top_logprobs": TOP,
        "positions": sum(r["positions"] for r in runs),
        "agree": sum(r["agree"] for r in runs),
        "top_agree": sum(r["top_agree"] for r in runs),
        "max_abs_diff": max(r["max_abs_diff"] for r in runs),
        "concurrent": together,
        "per_prompt": [
            {
                "prompt_tokens": len(r["prompt"]),
                "generated": len(r["gen"]["ids"]),
                "finish_reason": r["gen"]["finish_reason"],
                "agree": r["agree"],
                "first_difference": r["first_difference"],
            }
            for r in runs
        ],
    }


def check(report: dict) -> None:
    n, together = report["prompts"], report["concurrent"]
    assert report["positions"] > n * MAX_TOKENS // 2, "too little was generated to compare"
    assert report["agree"] == report["positions"], report["per_prompt"]
    assert report["top_agree"] == report["positions"]
    assert together["chats_identical"] == n and together["scorings_identical"] == n, together
    assert together["agree"] == together["positions"] == report["positions"], together


def test_decode_logprobs_equal_one_prefill_pass_bit_for_bit(client, server):
    report = measure(client, server.url)
    print(f"\nagreement: {report['agree']}/{report['positions']} positions, concurrent {report['concurrent']}")
    check(report)


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_every_kv_cache_dtype_keeps_decode_and_prefill_in_agreement(dtype):
    """A packed cache rounds each key and value once, when written, and attention reads the
    rounded values in a prefill and in a decode step alike: the agreement holds bit for bit
    whatever `--kv-cache-dtype` stores (two prompts, each alone)."""
    from openai import OpenAI

    server = Server("--kv-cache-dtype", dtype)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        instructions = json.loads(PROMPTS.read_text())[:2]
        runs = sequential(client, server.url, instructions)
    finally:
        assert server.stop() == 0, "server did not exit 0 on SIGTERM"
    positions = sum(r["positions"] for r in runs)
    assert positions >= MAX_TOKENS, "too little was generated to compare"
    assert sum(r["agree"] for r in runs) == positions, [r["first_difference"] for r in runs]
    assert sum(r["top_agree"] for r in runs) == positions


def main() -> int:
    from openai import OpenAI

    server = Server()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        report = measure(client, server.url)
    finally:
        assert server.stop() == 0, "server did not exit 0 on SIGTERM"
    out = ROOT / "docs" / "bench" / "agreement.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    together = report["concurrent"]
    print(f"{report['prompts']} prompts, up to {report['max_tokens']} tokens each: {report['agree']} of "
          f"{report['positions']} generated tokens have the same log-prob decoded and scored in one "
          f"prefill pass (top-{report['top_logprobs']} alternatives: {report['top_agree']}); "
          f"max |diff| {report['max_abs_diff']}")
    print(f"all {together['requests_in_flight']} requests in flight at once: {together['chats_identical']} chats and "
          f"{together['scorings_identical']} scorings identical to the sequential ones; "
          f"{together['agree']} of {together['positions']} positions agree")
    print(f"wrote {out.relative_to(ROOT)}")
    try:
        check(report)
    except AssertionError as e:
        print(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
