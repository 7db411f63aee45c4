"""Tool calls and structured outputs: constrained decoding makes every reply parse and validate."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from llmos.server.guidance import strict_schema
from tests.server.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60},
                                                        "limit": {"type": "integer", "minimum": 1,
                                                                  "maximum": 10}},
                       "required": ["query", "limit"], "additionalProperties": False},
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0},
                   "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20},
                               "maxItems": 3}},
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
# As clients write them: no lengths, no additionalProperties. Replies must still be strict and fit the budget.
LOOSE_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
LOOSE_SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"},
        "filters": {"type": "object", "properties": {"lang": {"type": "string"}}}},
    "required": ["query", "limit", "filters"]}}}
LOOSE_PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "hobbies": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "age", "hobbies"]}
TOPICS = ["Paris", "a cat", "the ocean", "a teacher", "Tokyo", "a robot", "music", "a chef", "winter",
          "a pilot"]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask_tool(client, i: int):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Weather near {TOPICS[i % 10]}?"}],
        tools=[LOOSE_WEATHER, LOOSE_SEARCH], tool_choice="required", temperature=0.8, seed=i,
        max_tokens=32 + i % 16)


def ask_json(client, i: int):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Describe a person who likes {TOPICS[i % 10]}."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": LOOSE_PERSON,
                                                                "strict": True}},
        temperature=0.8, seed=i, max_tokens=32 + i % 16)


def test_fifty_required_tool_calls_parse_and_validate(client, server):
    """Small budgets, loose schemas, temperature 0.8: every reply is a call, strict, complete in budget."""
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda i: ask_tool(client, i), range(50)))
    schemas = {t["function"]["name"]: strict_schema(t["function"]["parameters"])
               for t in (LOOSE_WEATHER, LOOSE_SEARCH)}
    assert schemas["search"]["properties"]["filters"]["additionalProperties"] is False
    for i, r in enumerate(replies):
        assert r.usage.completion_tokens <= 32 + i % 16
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert server.llm.engine.blocks.num_used_blocks == 0


def test_fifty_json_schema_replies_parse_and_validate(client):
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda i: ask_json(client, i), range(50)))
    for r in replies:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), strict_schema(LOOSE_PERSON))


def test_named_tool_choice_json_object_and_stream(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Find books about llamas."}],
        tools=[WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}},
        temperature=0, max_tokens=100)
    assert r.choices[0].message.tool_calls[0].function.name == "search"
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice="required", temperature=0, max_tokens=100, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_bad_guidance_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[WEATHER], tool_choice={"type": "function",
                                                                     "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "yaml"})
