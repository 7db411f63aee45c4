"""Every malformed request is a 400 (404 for unknown routes) in OpenAI's error shape, never a 500,
and leaves nothing allocated in the engine."""

import json

import httpx
import pytest

from tests.server.conftest import MODEL

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**body):
    return ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, **body})


def completion(**body):
    return ("/v1/completions", {"model": MODEL, "max_tokens": 4, **body})


CASES = {
    "lone surrogate in content": (chat(messages=[{"role": "user", "content": "\ud800"}]),
                                  "messages[0].content"),
    "lone surrogate in prompt": (completion(prompt="a\udfffb"), "prompt"),
    "message {}": (chat(messages=[{}]), "messages[0].role"),
    "message not an object": (chat(messages=["hello"]), "messages[0]"),
    "unknown role": (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    "user content null": (chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    "image part": (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                   "messages[0].content[0]"),
    "tool message without id": (chat(messages=[*USER, {"role": "tool", "content": "x"}]),
                                "messages[1].tool_call_id"),
    "tool_calls not a list": (chat(messages=[{"role": "assistant", "tool_calls": "f()"}]),
                              "messages[0].tool_calls"),
    "json_schema a string": (chat(messages=USER, response_format={"type": "json_schema", "json_schema": "x"}),
                             "response_format.json_schema"),
    "response_format unknown": (chat(messages=USER, response_format={"type": "yaml"}),
                                "response_format.type"),
    "tool function a string": (chat(messages=USER, tools=[{"type": "function", "function": "f"}]),
                               "tools.0.function"),
    "tool_choice.function a string": (chat(messages=USER, tools=[TOOL],
                                           tool_choice={"type": "function", "function": "f"}),
                                      "tool_choice"),
    "tool_choice unknown": (chat(messages=USER, tools=[TOOL], tool_choice="sometimes"), "tool_choice"),
    "unsupported suffix": (completion(prompt="a", suffix="b"), "suffix"),
    "unsupported functions": (chat(messages=USER, functions=[{"name": "f"}]), "functions"),
    "unsupported best_of": (completion(prompt="a", best_of=3), "best_of"),
    "echo with logprobs": (completion(prompt="a", echo=True, logprobs=1), "echo"),
    "logit_bias key": (chat(messages=USER, logit_bias={"abc": 1}), "logit_bias"),
    "logit_bias value": (chat(messages=USER, logit_bias={"5": 101}), "logit_bias"),
    "logit_bias token": (chat(messages=USER, logit_bias={"99999999": 1}), None),
    "prompt list over 2048": (completion(prompt=["a"] * 2049), "prompt"),
    "min_p out of range": (chat(messages=USER, min_p=1.5), None),
    "presence_penalty out of range": (chat(messages=USER, presence_penalty=3), None),
    "repetition_penalty zero": (chat(messages=USER, repetition_penalty=0), None),
    "empty embeddings input": (("/v1/embeddings", {"input": [""]}), "input"),
    "embeddings of token ids": (("/v1/embeddings", {"input": [1, 2, 3]}), "input"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_is_a_400(server, case):
    (path, body), param = CASES[case]
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body),  # \ud800 escapes stay escapes
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert not server.llm.engine.requests and server.llm.engine.blocks.num_used_blocks == 0


HI = b'{"messages": [{"role": "user", "content": "hi"}], '


@pytest.mark.parametrize("raw", [b'{"model": "x", "messages": [', b"not json", b"[1, 2]",
                                 HI + b'"temperature": Infinity}', HI + b'"top_p": NaN}',
                                 HI + b'"temperature": -Infinity}'])
def test_unparseable_or_non_finite_bodies_are_400(server, raw):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nothing", 404), ("POST", "/v2/chat", 404), ("GET", "/v1/chat/completions", 405)])
def test_unknown_routes_have_openai_shape(server, method, path, status):
    r = httpx.request(method, f"{server.url}{path}")
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and path in error["message"]
