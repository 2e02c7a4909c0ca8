"""POST /v1/responses through the official openai client on the real default model: a text
response, its event stream, a conversation continued with `previous_response_id` (served from
the prefix cache), structured output through `text.format`, and the 400s."""
import json

import openai
import pytest

from conftest import MODEL_ID


def test_a_response_and_its_stream_say_the_same(client):
    args = dict(model=MODEL_ID, input="Name a colour.", instructions="Answer in one word.",
                max_output_tokens=12, temperature=0)
    resp = client.responses.create(**args)
    assert resp.object == "response" and resp.status in ("completed", "incomplete")
    assert resp.output_text.strip()
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    events = list(client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == resp.output_text


def test_a_conversation_continues_from_a_stored_response(client):
    first = client.responses.create(model=MODEL_ID, input="My name is Ada. Say hello.",
                                    max_output_tokens=16, temperature=0)
    second = client.responses.create(model=MODEL_ID, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=16,
                                     temperature=0)
    assert second.previous_response_id == first.id
    # The earlier turn is resent to the model, and its keys and values come from the cache.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    unstored = client.responses.create(model=MODEL_ID, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input="again", previous_response_id=unstored.id)
    assert e.value.response.json()["error"]["param"] == "previous_response_id"


def test_text_format_gives_json_that_fits(client):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    resp = client.responses.create(
        model=MODEL_ID, input="Pick a colour.", max_output_tokens=32, temperature=0,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
    )
    assert json.loads(resp.output_text)["colour"] in ("red", "green", "blue")


def test_hosted_tools_are_a_400_naming_them(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input="x", tools=[{"type": "web_search"}])
    assert e.value.response.json()["error"]["param"] == "tools[0].type"
    server.assert_serving()
