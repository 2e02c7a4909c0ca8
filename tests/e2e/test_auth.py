"""API keys from a TOML key file, per-key permissions and limits, the request timeout and CORS,
on the real binary over real HTTP with the official openai client: what a client sees (status,
code, Retry-After), the key label on /metrics, a timed-out generation freeing its sequence, and
a bad key file stopping the server at start-up without printing the key.
"""
import hashlib
import subprocess
import time

import openai
import pytest
import requests

from conftest import BIN, MODEL_ID, Server, free_port

ADMIN_KEY = "sk-e2e-admin"
KEY_FILE = f"""
# e2e keys
[[keys]]
name = "admin"
sha256 = "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"
admin = true

[[keys]]
name = "alice"
key = "sk-e2e-alice"
models = ["{MODEL_ID}"]

[[keys]]
name = "limited"
key = "sk-e2e-limited"
requests_per_minute = 1
"""
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEY_FILE)
    s = Server("--api-key-file", str(path), "--request-timeout", "2", "--allowed-origins", ORIGIN)
    yield s
    assert s.stop() == 0


def client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_keys_from_the_toml_file_authenticate_in_any_scheme_case(keyed):
    for key, scheme in [(ADMIN_KEY, "Bearer"), ("sk-e2e-alice", "bearer")]:
        r = requests.get(keyed.url + "/v1/models", headers={"authorization": f"{scheme} {key}"}, timeout=10)
        assert r.status_code == 200, r.text
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "sk-wrong").models.list()


def test_a_model_outside_the_keys_list_is_403(keyed):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(keyed, "sk-e2e-alice").chat.completions.create(
            model="elsewhere", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert e.value.code == "model_not_allowed"
    reply = client(keyed, "sk-e2e-alice").chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert reply.usage.completion_tokens == 1
    samples = keyed.metrics()
    labels = (("key", "alice"), ("route", "/v1/chat/completions"), ("status", "200"))
    assert samples[("graft_requests_total", labels)] >= 1


def test_over_requests_per_minute_is_429_with_retry_after(keyed):
    limited = client(keyed, "sk-e2e-limited")
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        limited.models.list()
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60


def test_a_generation_past_the_request_timeout_is_408_and_freed(keyed):
    r = requests.post(
        keyed.url + "/v1/completions",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    deadline = time.time() + 10
    while keyed.metrics()[("vllm:num_requests_running", ())] != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert keyed.metrics()[("vllm:num_requests_running", ())] == 0


def test_cors_preflight_is_answered_for_the_allowed_origin(keyed):
    headers = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    r = requests.options(keyed.url + "/v1/chat/completions", headers=headers, timeout=10)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"]


def test_a_bad_key_file_stops_the_server_naming_the_line_not_the_key(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nkey = "sk-never-printed"\nrpm = 5\n')
    done = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port()), "--api-key-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "line 4: unknown field `rpm`" in output, output
    assert "sk-never-printed" not in output
