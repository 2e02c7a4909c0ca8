"""Automatic prefix caching through the official openai client on the real default model: the
next turn of a chat and a shared system prompt come from the cache (usage says how many tokens),
the answer and its log-probs are exactly what the same request gets with `cache_prompt: false`,
the vLLM metrics count it, and the load tester's multi-turn mode sees later turns served from
the cache."""
import json
import subprocess

from conftest import MODEL_ID
from test_loadtest import LOADTEST

SYSTEM = (
    "You are a careful assistant for a public library. You answer questions about opening "
    "hours, borrowing rules, late fees, study rooms, printing and the children's reading club. "
    "Keep every answer short, friendly and factual, and say when you do not know."
)


def chat(client, messages, **extra):
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=24,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=extra or None,
    )


def answer(reply):
    """The text and the log-probs of every token and alternative, exactly."""
    tokens = [
        (t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
        for t in reply.choices[0].logprobs.content
    ]
    return reply.choices[0].message.content, tokens


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def test_the_next_turn_comes_from_the_cache_and_answers_exactly_as_without(server, client):
    first = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "When does the library open on Saturdays?"},
    ]
    hits_before = server.metrics()[("vllm:prefix_cache_hits_total", ())]
    turn1 = chat(client, first, cache_prompt=False)
    assert cached(turn1) == 0
    second = first + [
        {"role": "assistant", "content": turn1.choices[0].message.content},
        {"role": "user", "content": "And can I print there?"},
    ]
    # Turn 1 opted out, so nothing of it was kept; this request leaves its own prefix.
    uncached = chat(client, second, cache_prompt=False)
    assert cached(uncached) == 0
    warm = chat(client, second)
    assert cached(warm) == 0, "a request that opted out leaves nothing"
    again = chat(client, second)
    assert cached(again) == again.usage.prompt_tokens - 1, "all but the last prompt token"
    assert answer(again) == answer(uncached) == answer(warm)

    # Another question after the same system prompt reuses the system prompt.
    other = chat(client, [first[0], {"role": "user", "content": "Are study rooms free?"}])
    system_only = client.chat.completions.create(
        model=MODEL_ID, messages=[first[0]], max_tokens=1, extra_body={"cache_prompt": False}
    )
    assert cached(other) >= system_only.usage.prompt_tokens - 2
    metrics = server.metrics()
    hits = metrics[("vllm:prefix_cache_hits_total", ())] - hits_before
    assert hits >= cached(again) + cached(other)
    info = [k for k in metrics if k[0] == "vllm:cache_config_info"]
    assert info and ("enable_prefix_caching", "True") in info[0][1]
    server.assert_serving()


def test_a_stream_reports_cached_tokens_in_its_usage(server, client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Late fees?"}]
    chat(client, messages)
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    assert usage[0].prompt_tokens_details.cached_tokens == usage[0].prompt_tokens - 1


def test_the_load_tester_sees_later_turns_served_from_the_cache(server, tmp_path):
    r = subprocess.run(
        [
            str(LOADTEST), "--url", server.url, "--no-progress", "--out", str(tmp_path),
            "--concurrency", "2", "--requests", "6", "--turns", "3", "--system-tokens", "64",
            "--input-tokens", "16", "--output-tokens", "8", "--extra-body", '{"temperature":0}',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    level = json.loads((tmp_path / "summary.json").read_text())["levels"][0]
    assert (level["completed"], level["errors"]) == (6, 0)
    turns = {t["turn"]: t for t in level["turns"]}
    assert [turns[t]["completed"] for t in ("1", "2", "3", "2+")] == [2, 2, 2, 4]
    # Each later turn resends the one before with its reply: all of that is cached.
    assert turns["2"]["mean_cached_tokens"] > turns["1"]["mean_input_tokens"]
    assert turns["3"]["mean_cached_tokens"] > turns["2"]["mean_input_tokens"]
    rows = [json.loads(l) for l in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sorted(r["turn"] for r in rows) == [1, 1, 2, 2, 3, 3]
    assert "turn" in r.stdout and "cached tok" in r.stdout
