"""/metrics over real HTTP: the whole exposition parses with the official Prometheus client
library, the engine's step histograms account for every step of a request, and under overload
the request counters add up."""
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADAPTER, MODEL_ID, Server


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


def test_overload_outcomes_add_up_and_429s_are_not_cancellations():
    # One running sequence and one waiting place: while a long request runs, five more arrive;
    # one waits and is served, four are refused.
    s = Server("--max-running", "1", "--max-waiting", "1")
    try:
        def total(m, name, **labels):
            return sum(v for (sample, ls), v in m.items()
                       if sample == name and all(dict(ls).get(k) == w for k, w in labels.items()))

        before = s.metrics()
        route = "/v1/completions"
        long = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        short = {"model": MODEL_ID, "prompt": "The sky is", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(max_workers=6) as pool:
            first = pool.submit(requests.post, s.url + route, json=long, timeout=120)
            deadline = time.monotonic() + 30
            while s.metrics()[("vllm:num_requests_running", ())] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            rest = [pool.submit(requests.post, s.url + route, json=short, timeout=120) for _ in range(5)]
            codes = [f.result().status_code for f in [first, *rest]]
        assert sorted(codes) == [200, 200, 429, 429, 429, 429], codes
        after = s.metrics()
        delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)
        assert delta("graft_requests_total", route=route) == 6
        assert delta("graft_requests_total", route=route, status="429") == 4
        assert delta("graft_requests_cancelled_total") == 0
    finally:
        assert s.stop() == 0


def test_lora_info_reads_as_the_inference_gateways_picker_reads_it(server):
    """The endpoint picker takes the vllm:lora_requests_info series with the newest value
    (a Unix time), splits its adapter labels on commas and parses max_lora as an integer."""
    r = requests.post(server.url + "/v1/completions", timeout=60,
                      json={"model": ADAPTER, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
    text = requests.get(server.url + "/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:lora_requests_info"]
    assert samples, text
    latest = max(samples, key=lambda s: s.value)
    assert abs(latest.value - time.time()) < 60, "valued at the scrape's Unix time"
    running = [a for a in latest.labels["running_lora_adapters"].split(",") if a]
    waiting = [a for a in latest.labels["waiting_lora_adapters"].split(",") if a]
    assert ADAPTER in running, latest.labels
    assert waiting == [], "nothing is queued now"
    assert int(latest.labels["max_lora"]) >= len(running)
