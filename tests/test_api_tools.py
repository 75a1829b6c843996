"""Tool calls end to end: the official openai package and langchain-openai against a real server on
the default model, plus EdgeQwen.chat. Every returned call must parse and validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tool_cases import CASES, SEARCH, WEATHER

pytestmark = pytest.mark.slow

WEATHER_Q = [{"role": "user", "content": "What's the weather like in Paris?"}]


def valid(call, tools) -> dict:
    """The call's arguments, after checking they parse and validate against the named tool."""
    fn = call.function if hasattr(call, "function") else call["function"]
    name = fn.name if hasattr(fn, "name") else fn["name"]
    arguments = fn.arguments if hasattr(fn, "arguments") else fn["arguments"]
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
    args = json.loads(arguments)
    jsonschema.validate(args, schema)
    return args


def test_auto_calls_the_tool(client):
    r = client.chat.completions.create(model="qwen2.5", messages=WEATHER_Q, tools=[WEATHER, SEARCH],
                                       temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert "paris" in valid(call, [WEATHER, SEARCH])["city"].lower()


def test_auto_answers_text_when_no_tool_fits(client):
    r = client.chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], temperature=0, max_tokens=20)
    msg = r.choices[0].message
    assert not msg.tool_calls and msg.content and r.choices[0].finish_reason in ("stop", "length")


def test_required_and_named_streamed(client):
    tools = [WEATHER, SEARCH]
    r = client.chat.completions.create(model="qwen2.5", messages=WEATHER_Q, tools=tools, tool_choice="required",
                                       temperature=0, max_tokens=80, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    valid(r.choices[0].message.tool_calls[0], tools)

    stream = client.chat.completions.create(
        model="qwen2.5", messages=WEATHER_Q, tools=tools, temperature=0, max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "search_web"}})
    first, args, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            if first is None:  # OpenAI's first call delta: id, type, name, empty arguments
                first = d
                assert d.index == 0 and d.id and d.type == "function" and d.function.name == "search_web"
            else:
                assert d.id is None and d.function.name is None
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert first is not None and finish == "tool_calls"
    schema = SEARCH["function"]["parameters"]
    jsonschema.validate(json.loads(args), schema)


def test_tool_result_round_trip(client):
    r = client.chat.completions.create(model="qwen2.5", messages=WEATHER_Q, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    history = WEATHER_Q + [r.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'}]
    r2 = client.chat.completions.create(model="qwen2.5", messages=history, tools=[WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=40)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls


@pytest.mark.parametrize("i", [10, 21, 29])  # array of objects, $defs/$ref, no arguments (all 30: bench_tools.py)
def test_varied_schemas_required(client, i):
    tools, prompt, target = CASES[i]
    r = client.chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": prompt}],
                                       tools=tools, tool_choice="required", temperature=0, max_tokens=120)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        valid(call, tools)


@pytest.mark.parametrize("body,param,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}]}, "tools[0].function.parameters", "invalid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"$ref": "https://example.com/a.json"}}}}}]}, "tools[0].function.parameters", "remote $ref"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id", "no earlier assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}]},
     "messages[1].tool_call_id", "without tool_call_id"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "given twice"),
])
def test_bad_tool_requests_are_400(server, body, param, needle):
    import httpx

    payload = {"model": "qwen2.5", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
               "max_tokens": 5, **body}
    r = httpx.post(f"{server}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and needle in err["message"]


def test_qwen_api_shape_with_tools(server):
    import httpx

    r = httpx.post(f"{server}/api/v1/qwen/predict", timeout=300, json={
        "input": {"messages": WEATHER_Q}, "parameters": {"tools": [WEATHER], "tool_choice": "required",
                                                         "temperature": 0, "max_tokens": 60}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    valid(choice["message"]["tool_calls"][0], [WEATHER])


def test_edgeqwen_chat_tools(llm):
    r = llm.chat(WEATHER_Q, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=0, max_tokens=60)
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] is None
    valid(msg["tool_calls"][0], [WEATHER])


def test_arguments_are_generated_closed_to_the_declared_parameters(llm):
    # What simonw/llm sends for a function without parameters: JSON Schema lets the object hold any
    # key, and the 0.5B model filled it with a copy of the schema ({"properties": {...}}).
    version = {"type": "function", "function": {"name": "llm_version", "description": "Return the installed "
                                                "version of llm", "parameters": {"type": "object", "properties": {}}}}
    r = llm.chat([{"role": "user", "content": "What version of llm is this? Use the tool."}], tools=[version],
                 tool_choice="required", temperature=0, max_tokens=40)
    assert json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {}


VERSION = {"type": "function", "function": {"name": "llm_version", "description": "Return the installed version "
                                            "of llm", "parameters": {"type": "object", "properties": {}}}}


def _answered(name: str, args: str = "{}") -> list[dict]:
    return [{"role": "user", "content": "What version of llm is this? Use the tool."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "0.27.1"}]


def test_repeat_guard_withdraws_answered_functions_without_arguments():
    from edge_qwen.engine.tool_calls import parse_tools

    tools = parse_tools([VERSION, WEATHER])
    turn = tools.for_turn(_answered("llm_version"))
    assert turn.names == ["get_weather"] and turn.withdrawn == ["llm_version"] and turn.offered
    only = parse_tools([VERSION]).for_turn(_answered("llm_version"))
    assert only.offered and not only.active  # in the prompt, nothing callable: the reply is text
    # A function with arguments stays callable; a new user message gives everything back;
    # required and named choices are the caller's word.
    assert tools.for_turn(_answered("get_weather", '{"city": "Paris"}')).names == ["llm_version", "get_weather"]
    again = _answered("llm_version") + [{"role": "assistant", "content": "0.27.1"},
                                         {"role": "user", "content": "And now?"}]
    assert tools.for_turn(again).names == ["llm_version", "get_weather"]
    assert parse_tools([VERSION], "required").for_turn(_answered("llm_version")).names == ["llm_version"]
    free = {"type": "function", "function": {"name": "free", "parameters": {"type": "object"}}}
    assert parse_tools([free]).for_turn(_answered("free")).names == ["free"]  # may take any arguments


def test_answered_function_without_arguments_is_not_called_again(client):
    # simonw/llm's `llm -T llm_version`: the 0.5B model called the tool again after its result,
    # in a loop until llm's chain limit.
    for stream in (False, True):
        r = client.chat.completions.create(model="qwen2.5", messages=_answered("llm_version"), tools=[VERSION],
                                           temperature=0, max_tokens=40, stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            assert not any(c.choices[0].delta.tool_calls for c in chunks)
            text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert not r.choices[0].message.tool_calls
        assert finish in ("stop", "length") and text.strip() and "<tool_call>" not in text


def test_close_open_objects_keeps_what_the_schema_leaves_open():
    from edge_qwen.engine.json_normalize import close_open_objects

    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "l": {"type": "array", "items": {"type": "object", "properties": {}}},
                                               "free": {"type": "object"}, "ref": {"$ref": "#/$defs/D"}},
              "$defs": {"D": {"properties": {"x": {}}}}}
    closed = close_open_objects(nested)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["l"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]  # a free-form object stays free
    jsonschema.validate({"a": {"b": 1}, "l": [{}], "free": {"k": 1}, "ref": {"x": 2}}, closed)
    # Left as sent: an explicit choice, keys needed beyond the declared ones, allOf anywhere.
    for schema in ({"properties": {"a": {}}, "additionalProperties": True},
                   {"properties": {"a": {}}, "required": ["b"]},
                   {"properties": {"a": {}}, "minProperties": 2},
                   {"properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]},
                   {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}):
        assert close_open_objects(schema) == schema


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Get the current weather in a city."""

        city: str = Field(description="The city name")

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="qwen2.5", temperature=0, max_tokens=60,
                      max_retries=0, timeout=300)
    msg = chat.bind_tools([GetWeather]).invoke("What's the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    assert "paris" in msg.tool_calls[0]["args"]["city"].lower()

    class Person(BaseModel):
        """A person mentioned in the text."""

        name: str
        age: int

    out = chat.with_structured_output(Person, method="function_calling").invoke("Alice is 31 years old.")
    assert isinstance(out, Person) and out.name.lower().startswith("alice") and out.age == 31
