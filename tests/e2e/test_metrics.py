"""/metrics over real HTTP: the whole exposition parses with the official Prometheus client
library, and the engine's step histograms account for every step of a request."""
import time

import requests

from conftest import MODEL_ID


def step_counts(m: dict) -> tuple:
    forward = m[("graft_engine_step_seconds_count", (("phase", "forward"),))]
    sampling = m[("graft_engine_step_seconds_count", (("phase", "sampling"),))]
    return forward, sampling, m[("graft_engine_step_tokens_sum", ())]


def test_step_histograms_count_each_step_of_a_request_and_its_tokens(server):
    forward0, sampling0, tokens0 = step_counts(server.metrics())
    body = {"model": MODEL_ID, "prompt": "The sky is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 8
    # The reply can arrive before the engine records the step that finished it.
    deadline = time.monotonic() + 10
    while step_counts(server.metrics())[1] < sampling0 + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = server.metrics()
    forward, sampling, tokens = step_counts(m)
    # One step takes the whole prompt and yields the first token; each later token is a step.
    assert (forward - forward0, sampling - sampling0) == (8, 8)
    assert tokens - tokens0 == usage["prompt_tokens"] + 7
    assert m[("vllm:iteration_tokens_total_sum", ())] == tokens
    inf = m[("graft_engine_step_seconds_bucket", (("le", "+Inf"), ("phase", "forward")))]
    assert inf == forward
