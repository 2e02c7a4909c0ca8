"""Graceful drain on the real binary: after SIGTERM the server keeps accepting connections, so
a readiness probe sees /health answer 503 and a new request gets 503 with Retry-After, while
a stream that was running finishes normally; then the process exits 0."""
import json
import signal
import time

import requests

from conftest import MODEL_ID, Server


def running(server) -> float:
    return server.metrics()[("vllm:num_requests_running", ())]


def test_sigterm_drains_health_503_new_requests_503_running_stream_finishes():
    s = Server("--drain-seconds", "120")
    try:
        body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 300, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with requests.post(s.url + "/v1/completions", json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: ")
            s.proc.send_signal(signal.SIGTERM)
            # The signal is handled asynchronously: wait for the drain to show on /health.
            deadline = time.monotonic() + 10
            health = requests.get(s.url + "/health", timeout=10)
            while health.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
                health = requests.get(s.url + "/health", timeout=10)
            assert health.status_code == 503, health.text
            assert health.json()["error"]["code"] == "shutting_down"
            new = requests.post(s.url + "/v1/completions", timeout=10,
                                json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2})
            assert new.status_code == 503, new.text
            assert new.json()["error"]["code"] == "shutting_down"
            assert int(new.headers["retry-after"]) >= 1
            # Both answers came while the first request was still generating.
            assert running(s) == 1
            events = [line.removeprefix(b"data: ") for line in lines if line]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(timeout=60) == 0, "the drained server must exit 0"
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        s.log.close()
