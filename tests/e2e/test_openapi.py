"""The OpenAPI document at /openapi.json, checked against the running server by schemathesis:
every operation fuzzed with a bounded number of examples, positive and negative, and every reply
must be no 5xx, with a documented status, content type, headers and body schema.

Most examples run on the scripted fake engine (server/examples/fake_server.rs): random
`max_tokens` on the real model would take hours. A short run on the real model, with
`max_tokens` and `n` capped by schemathesis_real_model.py, checks the real engine's replies.
Streams are not validated by schemathesis, so the SSE chunks are checked here against the
documented chunk schemas. The seed is fixed so CI is reproducible; GRAFT_FUZZ_SEED changes it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest
import requests

from conftest import FAKE_BIN, ROOT, Server

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SEED = os.environ.get("GRAFT_FUZZ_SEED", "20250101")
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
])


@pytest.fixture(scope="module")
def fake():
    s = Server(command=(str(FAKE_BIN),))
    yield s
    assert s.stop() == 0, "fake_server did not exit 0 on SIGTERM"


def schemathesis(url: str, *args: str, env: dict | None = None) -> None:
    """Runs schemathesis on `url`'s document; fails the test with its report on any failure."""
    cmd = [
        str(SCHEMATHESIS), "run", url + "/openapi.json",
        "--checks", CHECKS, "--seed", SEED, "--workers", "2", "--no-color",
        "--request-timeout", "60", *args,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:]


def test_fuzzing_the_fake_engine_finds_no_5xx_and_only_documented_replies(fake):
    schemathesis(fake.url, "--max-examples", "40")


def test_a_short_run_on_the_real_model_finds_no_5xx_and_only_documented_replies():
    s = Server("--max-tokens-default", "4")
    try:
        hooks = ROOT / "tests" / "e2e" / "schemathesis_real_model.py"
        schemathesis(
            s.url, "--max-examples", "15", "--phases", "examples,fuzzing",
            # The registry routes never reach the model; the fake run covers them.
            "--exclude-path-regex", "^/v1/plugins",
            env={"SCHEMATHESIS_HOOKS": str(hooks)},
        )
    finally:
        assert s.stop() == 0


def validator(doc: dict, name: str) -> jsonschema_rs.Draft202012Validator:
    """A validator for component schema `name`; the document's `$ref`s resolve against the
    components carried along at the root."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema_rs.Draft202012Validator(schema)


def sse_events(r: requests.Response) -> list[str]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]


STREAMS = [
    ("/v1/chat/completions", "ChatCompletionChunk",
     {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "n": 2, "logprobs": True,
      "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", "ChatCompletionChunk",
     {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/completions", "TextCompletionChunk",
     {"prompt": ["ab", "cd"], "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True,
      "stream_options": {"include_usage": True}}),
    ("/v1/completions", "TextCompletionChunk", {"prompt": "hey", "echo": True, "stream": True}),
]


@pytest.mark.parametrize("path,schema,body", STREAMS)
def test_streamed_chunks_match_their_documented_schema(fake, path, schema, body):
    doc = requests.get(fake.url + "/openapi.json", timeout=10).json()
    check = validator(doc, schema)
    events = sse_events(requests.post(fake.url + path, json=body, timeout=30))
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        check.validate(json.loads(data))
