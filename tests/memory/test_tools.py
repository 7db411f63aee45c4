"""The memory functions as the kernel runs them: success and error paths, state from the tool context."""

import json
from pathlib import Path

import pytest

from llmos.memory import CoreMemory, RecallStorage, open_store
from llmos.tools.base import ToolContext, ToolError, ToolRegistry
from llmos.tools.memory import memory_tools


@pytest.fixture
def tools(embedder) -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(*memory_tools(embedder))
    return reg


@pytest.fixture
def ctx(tmp_path) -> ToolContext:
    c = ToolContext(pid=1, agent="ana", workdir=tmp_path / "work", home=tmp_path / "home")
    core = CoreMemory(open_store(c.home), "ana")
    core.define("persona", "I am Sam.", 60)
    core.define("human", "Name: Ana", 40)
    return c


def call(tools, ctx, name, **args):
    return tools.get(name).fn(args, ctx)


def test_seven_functions_with_heartbeat_flag(tools):
    assert sorted(tools.tools) == sorted([
        "send_message", "core_memory_append", "core_memory_replace", "conversation_search",
        "conversation_search_date", "archival_memory_insert", "archival_memory_search"])
    for t in tools.tools.values():
        assert "request_heartbeat" in t.parameters["required"]
        assert t.parameters["additionalProperties"] is False


def test_send_message(tools, ctx):
    assert call(tools, ctx, "send_message", message="Hi!", request_heartbeat=False) == \
        "Sent message successfully."
    with pytest.raises(ToolError, match="send_message: message is empty"):
        call(tools, ctx, "send_message", message="  ")
    with pytest.raises(ToolError, match="send_message: missing required argument 'message'"):
        call(tools, ctx, "send_message")
    with pytest.raises(ToolError, match=r"send_message: 'message' must be a string, got 42"):
        call(tools, ctx, "send_message", message=42)
    with pytest.raises(ToolError, match=r"send_message: unknown argument\(s\) to \(takes message, "
                                        r"request_heartbeat\)"):
        call(tools, ctx, "send_message", message="x", to="bob")
    with pytest.raises(ToolError, match="send_message: 'request_heartbeat' must be a boolean, got 'yes'"):
        call(tools, ctx, "send_message", message="x", request_heartbeat="yes")


def test_core_memory_functions_edit_the_agents_blocks(tools, ctx):
    out = call(tools, ctx, "core_memory_append", label="human", content="Likes tea", request_heartbeat=True)
    assert out == "Appended to core memory block 'human'; it now holds 19 characters."
    out = call(tools, ctx, "core_memory_replace", label="human", old_content="tea", new_content="green tea")
    assert out == "Replaced in core memory block 'human'; it now holds 25 characters."
    assert CoreMemory(open_store(ctx.home), "ana").get("human").value == "Name: Ana\nLikes green tea"
    with pytest.raises(ToolError, match="core_memory_append: core memory block 'human' would hold 51 "
                                        "characters, over its limit of 40"):
        call(tools, ctx, "core_memory_append", label="human", content="x" * 25)
    with pytest.raises(ToolError, match="core_memory_replace: 'coffee' is not in core memory block 'human'"):
        call(tools, ctx, "core_memory_replace", label="human", old_content="coffee", new_content="tea")
    with pytest.raises(ToolError, match=r"no core memory block 'pets' \(blocks: persona, human\)"):
        call(tools, ctx, "core_memory_append", label="pets", content="Rex")
    other = ToolContext(pid=2, agent="bob", workdir=ctx.workdir, home=ctx.home)
    with pytest.raises(ToolError, match=r"no core memory block 'human' \(blocks: none\)"):
        call(tools, other, "core_memory_append", label="human", content="x")


def test_conversation_search_pages(tools, ctx):
    recall = RecallStorage(open_store(ctx.home), "ana")
    for i in range(7):
        day = 1714564800 + i * 86400  # 2024-05-01 + i days
        recall.append("user", f"my cat number {i} likes fish", created_at=day)
    recall.append("user", "the weather is nice", created_at=1714564800)
    first = call(tools, ctx, "conversation_search", query="cats and fish", request_heartbeat=False)
    assert first.startswith("Showing messages 1-5 of 7 (page 0 of 1; ask for page=1 for more):\n")
    rows = json.loads(first.split("\n", 1)[1])
    assert len(rows) == 5 and rows[0]["role"] == "user" and "fish" in rows[0]["content"]
    last = call(tools, ctx, "conversation_search", query="cats and fish", page=1)
    assert last.startswith("Showing messages 6-7 of 7 (last page):")
    assert call(tools, ctx, "conversation_search", query="cats", page=4) == \
        "Page 4 is past the last page (1) of 7 messages."
    assert call(tools, ctx, "conversation_search", query="submarine") == "No messages found."
    with pytest.raises(ToolError, match="conversation_search: 'page' must be >= 0, got -1"):
        call(tools, ctx, "conversation_search", query="cats", page=-1)
    day = call(tools, ctx, "conversation_search_date", start_date="2024-05-01", end_date="2024-05-01")
    assert [r["content"] for r in json.loads(day.split("\n", 1)[1])] == \
        ["my cat number 0 likes fish", "the weather is nice"]
    with pytest.raises(ToolError, match="conversation_search_date: end_date must be a date as YYYY-MM-DD"):
        call(tools, ctx, "conversation_search_date", start_date="2024-05-01", end_date="tomorrow")


def test_archival_insert_and_search(tools, ctx):
    assert call(tools, ctx, "archival_memory_insert", content="Ana's dog is called Rex.",
                request_heartbeat=True) == "Inserted into archival memory as passage 1."
    call(tools, ctx, "archival_memory_insert", content="The office wifi password is blue-falcon-42.")
    out = call(tools, ctx, "archival_memory_search", query="what is the name of Ana's pet?")
    assert out.startswith("Showing passages 1-2 of 2 (last page):")
    rows = json.loads(out.split("\n", 1)[1])
    assert rows[0]["content"] == "Ana's dog is called Rex." and rows[0]["score"] > rows[1]["score"]
    with pytest.raises(ToolError, match="archival_memory_insert: a passage must be non-empty text"):
        call(tools, ctx, "archival_memory_insert", content="")
    with pytest.raises(ToolError, match="archival_memory_search: missing required argument 'query'"):
        call(tools, ctx, "archival_memory_search")


def test_state_persists_for_a_new_process(tools, ctx, tmp_path):
    call(tools, ctx, "core_memory_append", label="human", content="Likes tea")
    open_store(ctx.home).close()  # the next call opens the database afresh, as a restarted kernel would
    again = ToolContext(pid=99, agent="ana", workdir=Path(tmp_path), home=ctx.home)
    assert call(tools, again, "core_memory_replace", label="human", old_content="Likes tea",
                new_content="") == "Replaced in core memory block 'human'; it now holds 10 characters."
