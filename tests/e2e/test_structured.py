"""Structured outputs through the official openai client on the real default model: for each of
22 real-world schemas (tests/e2e/fixtures/schemas.json) the answer that ends with
`finish_reason: "stop"` parses and validates; `json_object` gives an object; a schema that
cannot be enforced is a 400 naming what, and the server keeps serving."""
import json
from pathlib import Path

import jsonschema_rs
import openai
import pytest

from conftest import MODEL_ID

SCHEMAS = json.loads((Path(__file__).parent / "fixtures" / "schemas.json").read_text())


def ask(client, prompt, response_format, **extra):
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=160,
        temperature=0,
        response_format=response_format,
        **extra,
    )


def test_every_finished_answer_validates_against_its_schema(client):
    finished, report = 0, []
    for case in SCHEMAS:
        fmt = {"type": "json_schema",
               "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}}
        reply = ask(client, case["prompt"], fmt).choices[0]
        report.append((case["name"], reply.finish_reason, reply.message.content))
        if reply.finish_reason != "stop":
            continue
        finished += 1
        value = json.loads(reply.message.content)
        assert jsonschema_rs.validator_for(case["schema"]).is_valid(value), report[-1]
    # The bounds in these schemas let every answer finish well inside max_tokens.
    assert finished == len(SCHEMAS), report


def test_json_object_and_n_choices(client):
    reply = ask(client, "Describe a cat as JSON.", {"type": "json_object"}, n=2,
                extra_body={"temperature": 0.9, "seed": 3})
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "numbers", fmt)
    body = e.value.response.json()["error"]
    assert body["param"] == "response_format" and "uniqueItems" in body["message"], body
    server.assert_serving()
