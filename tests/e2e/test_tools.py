"""Tool calling through the official openai client on the real default model, whose chat
template ignores `tools` (so the server's Hermes-format fallback prompt describes them): a
two-step tool loop on chat completions and on the Responses API, streamed calls equal to
unstreamed ones, a named function, and forced arguments that always validate against the
function's schema."""
import json

import jsonschema_rs

from conftest import MODEL_ID

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid(name, arguments):
    return jsonschema_rs.validator_for(SCHEMAS[name]).is_valid(json.loads(arguments))


def test_two_step_tool_loop_on_chat(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS and valid(call.function.name, call.function.arguments)

    # The client's usual loop: the assistant message as returned, then the tool's result.
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "unit": "celsius"})})
    second = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert isinstance(answer.message.content, str) and answer.message.content.strip()
    # The second prompt is the first one, the call and the result: the first prompt comes
    # from the prefix cache.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_forced_arguments_always_validate(client):
    cities = ["Paris", "Tokyo", "a town with a very long name by the sea", "Zürich"]
    for i, city in enumerate(cities):
        reply = client.chat.completions.create(
            model=MODEL_ID, tools=TOOLS, tool_choice="required", max_tokens=120,
            messages=[{"role": "user", "content": f"Weather and time in {city}, please."}],
            temperature=0.8, seed=i)
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            assert valid(call.function.name, call.function.arguments), call


def test_named_function_is_the_one_called(client):
    reply = client.chat.completions.create(
        model=MODEL_ID, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=[{"role": "user", "content": "What is the weather in Rome?"}])
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert valid("get_time", calls[0].function.arguments)


def test_streamed_calls_equal_unstreamed(client):
    kwargs = dict(model=MODEL_ID, tools=TOOLS, tool_choice="required", temperature=0,
                  max_tokens=120, messages=[{"role": "user", "content": "Time in Oslo?"}])
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    expected = [{"name": c.function.name, "arguments": c.function.arguments}
                for c in whole.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == expected
    assert finish == whole.finish_reason == "tool_calls"


def test_two_step_tool_loop_on_responses(client):
    tools = [{"type": "function", "name": t["function"]["name"],
              "description": t["function"]["description"],
              "parameters": t["function"]["parameters"], "strict": True} for t in TOOLS]
    first = client.responses.create(
        model=MODEL_ID, input="What is the weather in Lisbon?", tools=tools,
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=100)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert valid("get_weather", calls[0].arguments)
    second = client.responses.create(
        model=MODEL_ID, previous_response_id=first.id, tools=tools,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": json.dumps({"temperature": 18, "unit": "celsius"})}],
        temperature=0, max_output_tokens=40)
    assert second.status in ("completed", "incomplete") and second.output_text.strip()
    assert not [item for item in second.output if item.type == "function_call"]
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
