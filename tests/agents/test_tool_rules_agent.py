"""Tool rules and the reply guarantee in the MemGPT agent: the grammar each step offers (checked
token by token with the engine's own matcher), the turn's Letta messages, and the embedded model."""

import asyncio
import functools
import json
from typing import Any

import llguidance
import pytest

from llmos.agents import memgpt
from llmos.agents.messages import (
    AssistantMessage,
    ToolCallMessage,
    ToolReturnMessage,
    UserMessage,
    from_recall,
)
from llmos.agents.tool_rules import Call, ToolRuleError, ToolRules
from llmos.engine.guided import json_schema_grammar
from llmos.kernel import Kernel
from llmos.memory import RecallStorage, open_store
from llmos.tools.base import ToolRegistry
from llmos.tools.memory import memory_tools
from tests.memory.test_agent import ScriptedBackend, say


@pytest.fixture(scope="module")
def registry(embedder) -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(*memory_tools(embedder))
    return reg


def in_agent(home, backend, registry, body, name="sam") -> Any:
    """Run `body(sys)` as a kernel process; returns its result."""
    async def go():
        kernel = Kernel(backend, home=home, tools=registry)
        try:
            pid = await kernel.spawn(body, name=name)
            result = await kernel.wait(pid)
            assert kernel.process(pid).exit_reason == "exited", kernel.process(pid).exit_reason
            return result
        finally:
            await kernel.shutdown()
    return asyncio.run(go())


@functools.cache
def _ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=49152, eos_token=[2])


def accepts(tokenizer, schema: dict, text: str) -> bool:
    """Does the grammar the engine would build from `schema` accept `text`, token by token?"""
    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), json_schema_grammar(schema))
    ids = tokenizer.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def call(name: str, **args) -> str:
    return json.dumps({"function": name, "arguments": {**args, "request_heartbeat": False}})


def test_the_grammar_offers_only_the_allowed_tools(tmp_path, count_tokens, tokenizer, registry):
    async def schemas(sys):
        agent = memgpt.open_agent(sys, tool_rules=ToolRules.from_letta([
            {"type": "run_first", "tool_name": "archival_memory_search", "args": {"query": "today"}}]))
        first = agent.schema(agent.rules.plan(agent.tools, [], 4))
        last = agent.schema(agent.rules.plan(agent.tools, [], 1))
        return first, last
    first, last = in_agent(tmp_path, ScriptedBackend(count_tokens, []), registry, schemas)
    assert accepts(tokenizer, first, call("archival_memory_search", query="today"))
    assert not accepts(tokenizer, first, call("archival_memory_search", query="other"))  # args prefilled
    assert not accepts(tokenizer, first, call("send_message", message="hi"))  # the init rule
    assert accepts(tokenizer, last, call("send_message", message="hi"))
    assert not accepts(tokenizer, last, call("archival_memory_search", query="today"))  # only the reply
    for empty in ("", " ", "\n hi"):  # the message has a non-space first character
        assert not accepts(tokenizer, last, call("send_message", message=empty))


SAMPLE_ARGS = {
    "send_message": {"message": "hi"},
    "core_memory_append": {"label": "human", "content": "x"},
    "core_memory_replace": {"label": "human", "old_content": "a", "new_content": "b"},
    "conversation_search": {"query": "q"},
    "conversation_search_date": {"start_date": "2026-01-01", "end_date": "2026-01-02"},
    "archival_memory_insert": {"content": "x"},
    "archival_memory_search": {"query": "q"},
}


def test_each_rule_shapes_the_grammar(tmp_path, count_tokens, tokenizer, registry):
    rules = ToolRules.from_letta([
        {"type": "constrain_child_tools", "tool_name": "conversation_search",
         "children": ["archival_memory_search"]},
        {"type": "max_count_per_step", "tool_name": "core_memory_append", "max_count_limit": 1},
        {"type": "required_before_exit", "tool_name": "archival_memory_insert"},
        {"type": "parent_last_tool", "tool_name": "archival_memory_search",
         "children": ["conversation_search_date"]},
    ])
    cases = [  # (calls so far, steps left) -> the functions the grammar accepts
        ([], 4, {"core_memory_append", "core_memory_replace", "conversation_search", "archival_memory_insert",
                 "archival_memory_search"}),  # no reply before the required insert; no parent's child
        (["conversation_search"], 4, {"archival_memory_search"}),  # the child rule
        (["core_memory_append"], 4, {"core_memory_replace", "conversation_search", "archival_memory_insert",
                                     "archival_memory_search"}),  # the max count
        (["archival_memory_search"], 4, {"conversation_search_date"}),  # the parent rule
        (["archival_memory_insert"], 4, {"send_message", "core_memory_append", "core_memory_replace",
                                         "conversation_search", "archival_memory_insert",
                                         "archival_memory_search"}),
        (["core_memory_replace"], 2, {"archival_memory_insert"}),  # the required call must fit
        (["core_memory_replace"], 1, {"send_message"}),  # the reply guarantee
    ]

    async def schemas(sys):
        agent = memgpt.open_agent(sys, tool_rules=rules)
        return [agent.schema(agent.rules.plan(agent.tools, [Call(n) for n in done], left))
                for done, left, _ in cases]

    for schema, (done, left, expect) in zip(in_agent(tmp_path, ScriptedBackend(count_tokens, []), registry,
                                                     schemas), cases, strict=True):
        got = {n for n, args in SAMPLE_ARGS.items() if accepts(tokenizer, schema, call(n, **args))}
        assert got == expect, (done, left)


def test_a_turn_returns_letta_messages_as_they_happen(tmp_path, count_tokens, registry):
    backend = ScriptedBackend(count_tokens, [
        {"function": "core_memory_append",
         "arguments": {"label": "human", "content": "Likes tea.", "request_heartbeat": True}},
        {"function": "core_memory_replace",
         "arguments": {"label": "human", "old_content": "coffee", "new_content": "x",
                       "request_heartbeat": False}},
        say("Tea it is."),
    ])
    seen = []

    async def body(sys):
        agent = memgpt.open_agent(sys, max_steps=4)
        return await agent.turn("I like tea.", on_message=seen.append)

    turn = in_agent(tmp_path, backend, registry, body)
    assert turn.stop_reason == "end_turn" and turn.steps == 3 and turn.replies == ["Tea it is."]
    assert seen == turn.messages
    kinds = [type(m).__name__ for m in turn.messages]
    assert kinds == ["ToolCallMessage", "ToolReturnMessage", "ToolCallMessage", "ToolReturnMessage",
                     "AssistantMessage"]
    append, appended, replace, failed, reply = turn.messages
    assert append.name == "core_memory_append" and append.arguments["content"] == "Likes tea."
    assert appended.status == "success" and appended.tool_call_id == append.tool_call_id
    assert failed.status == "error" and "'coffee' is not in core memory block 'human'" in failed.tool_return
    letta = reply.to_letta()
    assert letta["message_type"] == "assistant_message" and letta["content"] == "Tea it is."
    assert append.to_letta()["tool_call"] == {
        "name": "core_memory_append", "tool_call_id": append.tool_call_id,
        "arguments": json.dumps(append.arguments)}
    # a history listing from recall storage gives the same messages, after the user's
    stored = from_recall(RecallStorage(open_store(tmp_path), "sam").in_context())
    assert stored[0] == UserMessage(turn.user_message_id, stored[0].date, "I like tea.")
    assert stored[1:] == turn.messages


def test_a_reply_cut_by_the_token_budget_is_delivered_as_far_as_it_got(tmp_path, count_tokens, registry):
    cut = '{"function": "send_message", "arguments": {"message": "Hello Ana, nice to me'
    backend = ScriptedBackend(count_tokens, [cut])

    async def body(sys):
        return await memgpt.open_agent(sys, max_steps=1).turn("Hi, I'm Ana")

    turn = in_agent(tmp_path, backend, registry, body)
    assert turn.replies == ["Hello Ana, nice to me"] and turn.stop_reason == "end_turn"
    assert memgpt.salvage_reply(cut + '\\u00') == "Hello Ana, nice to me"  # a partial escape is dropped
    assert memgpt.salvage_reply(cut + '", "request_he') == "Hello Ana, nice to me"
    assert memgpt.salvage_reply('{"function": "send_message", "arguments": {"message": "  ') is None
    assert memgpt.salvage_reply('{"function": "core_memory_append", "arguments": {"label": "hu') is None


def test_prefilled_arguments_win_over_an_unconstrained_model(tmp_path, count_tokens, registry):
    rules = ToolRules.from_letta([{"type": "run_first", "tool_name": "archival_memory_search",
                                   "args": {"query": "today"}}])
    search = {"function": "archival_memory_search",
              "arguments": {"query": "secrets", "request_heartbeat": True}}
    backend = ScriptedBackend(count_tokens, [search, say("Nothing today.")])

    async def body(sys):
        return await memgpt.open_agent(sys, tool_rules=rules, constrained=False).turn("What's on?")

    turn = in_agent(tmp_path, backend, registry, body)
    assert turn.messages[0].name == "archival_memory_search"
    assert turn.messages[0].arguments == {"query": "today", "request_heartbeat": True}
    assert turn.replies == ["Nothing today."]


def test_text_on_a_reply_only_step_is_the_reply(tmp_path, count_tokens, registry):
    """A backend that ignores the grammar (a remote server without schema support) still replies."""
    note = {"function": "archival_memory_insert", "arguments": {"content": "x", "request_heartbeat": False}}
    backend = ScriptedBackend(count_tokens, ["Thinking about it...", note, "  Hello, Ana!  "])

    async def body(sys):
        return await memgpt.open_agent(sys, max_steps=5).turn("Hi, I'm Ana")

    turn = in_agent(tmp_path, backend, registry, body)
    # plain text on a free step is an invalid call; after the model yields, text is the reply
    assert turn.replies == ["Hello, Ana!"] and turn.steps == 3 and turn.stop_reason == "end_turn"


def test_settings_that_cannot_keep_the_guarantee_are_refused(tmp_path, count_tokens, registry):
    def make(**kwargs):
        async def body(sys):
            try:
                memgpt.open_agent(sys, **kwargs)
            except (ValueError, ToolRuleError) as e:
                return str(e)
        return body
    backend = ScriptedBackend(count_tokens, [])
    assert in_agent(tmp_path, backend, registry, make(reply_tokens=40)) == \
        f"reply_tokens must be at least {memgpt.MIN_REPLY_TOKENS} (a send_message call's opening), got 40"
    assert in_agent(tmp_path, backend, registry, make(max_steps=0)) == "max_steps must be at least 1, got 0"
    assert "no terminal tool can be called" in in_agent(tmp_path, backend, registry, make(
        tool_rules=ToolRules.from_letta([{"type": "requires_approval", "tool_name": "send_message"}])))
    assert "names tool(s) the agent does not have: web_search" in in_agent(tmp_path, backend, registry, make(
        tool_rules=ToolRules.from_letta([{"type": "exit_loop", "tool_name": "web_search"}])))


# -- the embedded model ---------------------------------------------------------------------------------

@pytest.fixture
def engine():  # one per test: the kernel's shutdown closes it
    from llmos.kernel import EngineBackend

    return EngineBackend("smollm2-135m-instruct")


def test_init_rule_forces_the_first_call_on_the_model(tmp_path, engine, registry):
    rules = ToolRules.from_letta([{"type": "run_first", "tool_name": "conversation_search"},
                                  {"type": "exit_loop", "tool_name": "send_message"}])

    async def body(sys):
        agent = memgpt.open_agent(sys, tool_rules=rules, max_steps=3, reply_tokens=64, max_string=24,
                                  context_window=2048)
        return await agent.turn("Hi! What did I tell you yesterday?")

    turn = in_agent(tmp_path, engine, registry, body, name="smol")
    calls = [m for m in turn.messages if isinstance(m, ToolCallMessage | AssistantMessage)]
    assert isinstance(calls[0], ToolCallMessage) and calls[0].name == "conversation_search"
    assert isinstance(turn.messages[-1], AssistantMessage) and turn.messages[-1].content.strip()
    assert turn.stop_reason == "end_turn" and turn.steps <= 3


def test_twenty_messages_in_a_row_each_get_a_reply_on_the_model(tmp_path, engine, registry):
    rules = ToolRules.from_letta([{"type": "exit_loop", "tool_name": "send_message"}])
    texts = [f"Message {i}: {t}" for i, t in enumerate(
        ["hello", "my name is Ana", "I have a dog", "what is my name?", "tell me a joke", "how are you?",
         "I like tea", "what do I like?", "remember 4417", "what number?", "bye", "back again",
         "it is raining", "do you like rain?", "my dog is Rex", "who is Rex?", "thanks", "one more",
         "last but one", "goodbye"])]

    async def body(sys):
        agent = memgpt.open_agent(sys, tool_rules=rules, max_steps=2, reply_tokens=64, max_string=24,
                                  context_window=2048)
        return [await agent.turn(t) for t in texts]

    turns = in_agent(tmp_path, engine, registry, body, name="smol")
    assert len(turns) == 20
    for turn in turns:
        assert turn.steps <= 2 and turn.stop_reason == "end_turn", turn
        assert isinstance(turn.messages[-1], AssistantMessage) and turn.messages[-1].content.strip()
        assert all(not isinstance(m, ToolReturnMessage) or m.status == "success" for m in turn.messages)
    row = open_store(tmp_path).agent("smol")
    assert row["overflows"] == 0
