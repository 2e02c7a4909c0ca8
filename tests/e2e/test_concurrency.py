"""Continuous batching must not change results: 16 simultaneous streaming requests with
different seeds each produce exactly what the same request produces alone."""
from concurrent.futures import ThreadPoolExecutor

from conftest import MODEL_ID

PROMPTS = ["Tell me a short story about a robot.", "List three fruits.", "What is 2+2?", "Describe the sea."]


def request(client, i):
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=24,
        temperature=0.8,
        seed=1000 + i,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_sixteen_concurrent_streams_equal_each_request_alone(client):
    alone = [request(client, i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda i: request(client, i), range(16)))
    assert all(together), "a stream came back empty"
    assert together == alone
