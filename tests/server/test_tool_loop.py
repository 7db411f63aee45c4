"""The tool loop every agent framework runs, with the official openai client against the real server:
request with tools, tool calls back, results in, answer out; several turns, streamed and not."""

import json

import httpx
import jsonschema
import openai
import pytest

from llmos.server import messages as msgs
from tests.server.conftest import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
RESULTS = {"get_weather": {"temperature_c": 21, "sky": "sunny"}, "get_time": {"time": "14:05"}}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def streamed(client, **kw) -> tuple[str | None, str, list[dict]]:
    """(finish reason, content, tool calls) rebuilt from a stream, as SDKs do."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                               "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += tc.function.name or ""
            call["function"]["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return finish, content, [calls[i] for i in sorted(calls)]


def run_tools(history: list, calls: list[dict]) -> None:
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        history.append({"role": "tool", "tool_call_id": call["id"],
                        "content": json.dumps(RESULTS[call["function"]["name"]])})


@pytest.mark.parametrize("stream", [False, True])
def test_multi_turn_tool_loop(client, server, stream):
    system = [{"type": "text", "text": "You are a helpful assistant."}]
    history: list = [{"role": "system", "content": system}]
    for question in ["What is the weather in Paris?", "And what time is it in Oslo?"]:
        history.append({"role": "user", "content": [{"type": "text", "text": question}]})
        kw = {"model": MODEL, "messages": history, "tools": TOOLS, "temperature": 0, "max_tokens": 40}
        if stream:
            finish, content, calls = streamed(client, tool_choice="required", **kw)
            assert finish == "tool_calls" and content == ""
            history.append({"role": "assistant", "tool_calls": calls})  # content absent
        else:
            r = client.chat.completions.create(tool_choice="required", **kw)
            assert r.choices[0].finish_reason == "tool_calls"
            message = r.choices[0].message
            assert message.content is None
            history.append(message)  # the SDK sends it back with "content": null
            calls = [c.model_dump() for c in message.tool_calls]
        assert len(calls) == 1 and calls[0]["id"].startswith("call_")
        run_tools(history, calls)
        kw["max_tokens"] = 24
        for choice in ("auto", "none"):  # the loop runs tools while the model calls them (here: once more)
            if stream:
                finish, content, calls = streamed(client, tool_choice=choice, **kw)
            else:
                r = client.chat.completions.create(tool_choice=choice, **kw)
                finish, content = r.choices[0].finish_reason, r.choices[0].message.content
                calls = [c.model_dump() for c in r.choices[0].message.tool_calls or []]
            if finish != "tool_calls":
                break
            history.append({"role": "assistant", "content": None, "tool_calls": calls})
            run_tools(history, calls)
        assert finish in ("stop", "length") and content  # an answer in words, after the results
        history.append({"role": "assistant", "content": content})
    # What the model read: its own calls and the results, in the form it was taught to call in.
    prompt = server.llm.tokenizer.decode(httpx.post(
        f"{server.url}/tokenize", json={"messages": [m if isinstance(m, dict) else m.model_dump()
                                                     for m in history]}).json()["tokens"])
    assert '"name": "get_weather"' in prompt and '"name": "get_time"' in prompt
    assert 'Result of get_weather (call call_' in prompt and '{"temperature_c": 21, "sky": "sunny"}' in prompt


def test_parallel_calls_in_history_and_answer(client, server):
    history = [
        {"role": "user", "content": "Weather and time in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city": "Rome"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time",
                                                                "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature_c": 25}'},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "09:30"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                       max_tokens=20, parallel_tool_calls=True)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    rendered = msgs.normalise(history, knows_tools=False)
    assert rendered[1] == {"role": "assistant", "content": json.dumps(
        [{"name": "get_weather", "arguments": {"city": "Rome"}},
         {"name": "get_time", "arguments": {"city": "Rome"}}])}
    assert rendered[3] == {"role": "user", "content": "Result of get_time (call call_b): 09:30"}


def test_parallel_tool_calls_parse_from_a_list():
    text = '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]'
    from llmos.server.guidance import tool_calls

    calls = tool_calls(text, TOOLS, parallel=True)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2
    assert tool_calls(text, TOOLS, parallel=False) is None  # parallel_tool_calls false: not calls
    assert tool_calls('{"name": "get_weather", "arguments": "Rome"}', TOOLS) is None


def test_templates_that_know_tools_get_structured_calls():
    history = [{"role": "developer", "content": "Be brief."},
               {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "cold"}]
    assert msgs.normalise(history, knows_tools=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "cold", "tool_call_id": "c1", "name": "get_weather"}]
