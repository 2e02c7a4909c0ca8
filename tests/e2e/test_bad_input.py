"""Bad input over raw HTTP: each gets an OpenAI-shaped error naming the problem, and the server
keeps serving afterwards."""
import json
import time

import pytest
import requests

from conftest import MODEL_ID, Server


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers={"content-type": "application/json"}, timeout=60, **kw)


def assert_error(r, status, *needles, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    for n in needles:
        assert n in err["message"], (n, err)
    if param is not None:
        assert err["param"] == param, err


CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

CASES = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, [], None),
    ("wrong type", "/v1/chat/completions", {**CHAT, "max_tokens": "four"}, 400, ["max_tokens"], None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL_ID}, 400, ["messages"], None),
    ("temperature out of range", "/v1/chat/completions", {**CHAT, "temperature": 7}, 400, ["temperature"], "temperature"),
    ("top_p out of range", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400, ["top_p"], "top_p"),
    ("negative max_tokens", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, ["max_tokens"], None),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404, ["no-such-model"], None),
    ("tool_choice names no tool", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, ["g"], "tool_choice"),
    ("tool calls on a user message", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, ["assistant"], "messages[0].tool_calls"),
    ("schema keyword not enforceable", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "not": {"const": "a"}}}}}, 400, ["response_format", "not"], "response_format"),
    ("unknown response_format type", "/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, ["yaml"], None),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, [], None),
    ("logit_bias token out of vocabulary", "/v1/chat/completions", {**CHAT, "logit_bias": {"999999": 5}}, 400, ["999999"], None),
    ("completions without prompt", "/v1/completions", {"model": MODEL_ID}, 400, ["prompt"], None),
]


@pytest.mark.parametrize("name,path,body,status,needles,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(server, name, path, body, status, needles, param):
    assert_error(post(server, path, body), status, *needles, param=param)
    server.assert_serving()


def test_prompt_over_the_context_names_both_numbers(server):
    long_prompt = "hello " * 9000  # well over the 8192-token context
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": long_prompt, "max_tokens": 16})
    assert_error(r, 400)
    msg = r.json()["error"]["message"]
    assert "8192" in msg and "16" in msg, msg
    server.assert_serving()


def test_oversized_body_is_413(server):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x" * (3 * 1024 * 1024)})
    assert_error(r, 413)
    server.assert_serving()


def test_unknown_route_is_404_in_the_same_shape(server):
    assert_error(requests.get(server.url + "/v1/nothing", timeout=10), 404)


def metric(server, name):
    """The sum of `name`'s samples over their labels."""
    values = [v for (sample, _), v in server.metrics().items() if sample == name]
    assert values, f"{name} missing from /metrics"
    return sum(values)


def test_disconnecting_streaming_client_is_cancelled(server):
    cancelled_before = metric(server, "graft_requests_cancelled_total")
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # first event arrived: the sequence is running
    # The connection is closed mid-generation. The server learns of it when a write fails (a few
    # steps later, longer on a loaded machine), so poll: it must count the request as cancelled
    # (a request that ran to its 400 tokens would not be), free the sequence and go on serving.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(server, "graft_requests_cancelled_total") > cancelled_before and metric(server, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "graft_requests_cancelled_total") == cancelled_before + 1
    assert metric(server, "vllm:num_requests_running") == 0
    server.assert_serving()


def test_api_key_is_required_when_configured():
    s = Server("--api-key", "sekret")
    try:
        assert_error(requests.get(s.url + "/v1/models", timeout=10), 401)
        bad = requests.get(s.url + "/v1/models", headers={"authorization": "Bearer nope"}, timeout=10)
        assert_error(bad, 401)
        ok = requests.get(s.url + "/v1/models", headers={"authorization": "Bearer sekret"}, timeout=10)
        assert ok.status_code == 200
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
    finally:
        assert s.stop() == 0
