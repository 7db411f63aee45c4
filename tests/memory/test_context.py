"""Main context with the real SmolLM2 tokenizer: accounting, warning then flush, eviction cuts, summaries."""

import asyncio
import json
import random

import pytest

from llmos.memory import ContextConfig, ContextError, MainContext, Message


class Summarizer:
    """A scripted summarizer: returns S1, S2, ... and keeps every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[list[dict]] = []

    async def __call__(self, messages: list[dict], max_tokens: int) -> str:
        self.requests.append(messages)
        return f"S{len(self.requests)}: the user talked about topic {len(self.requests)}."


def make(store, count_tokens, window=1024, **kw) -> MainContext:
    return MainContext(store, "ana", count_tokens, ContextConfig(window, reply_tokens=128, **kw),
                       blocks={"persona": ("I am Sam, a helpful agent.", 200), "human": ("Name: Ana", 200)})


def run(coro):
    return asyncio.run(coro)


def test_token_count_is_the_chat_template_count(store, count_tokens, tokenizer):
    ctx = make(store, count_tokens)
    ctx.append("user", "Hello, I am Ana.")
    ctx.append("assistant", json.dumps({"function": "send_message", "arguments": {"message": "Hi Ana!"}}))
    msgs, tokens = run(ctx.prompt(Summarizer()))
    assert tokens == len(tokenizer.encode_chat(msgs)) == ctx.pressure().tokens
    text = tokenizer.apply_chat_template(msgs)
    assert text.startswith("<|im_start|>system\n")
    assert '<human characters="9/200">\nName: Ana\n</human>' in text
    assert msgs[1:] == [{"role": "user", "content": "Hello, I am Ana."},
                        {"role": "assistant", "content": ctx.queue()[1].content}]


def test_events_and_function_returns_reach_any_backend_as_user_turns(store, count_tokens):
    ctx = make(store, count_tokens)
    ctx.append("tool", '{"type": "function_return", "status": "OK"}', name="send_message")
    ctx.alert("heartbeat")
    assert [m["role"] for m in ctx.messages()] == ["system", "user", "user"]
    assert json.loads(ctx.messages()[2]["content"])["message"] == "heartbeat"


def test_warning_comes_before_flush_and_flush_keeps_prompt_in_budget(store, count_tokens):
    ctx = make(store, count_tokens)
    summarize = Summarizer()
    seen = []
    largest = 0
    for i in range(60):
        ctx.append("user" if i % 2 == 0 else "assistant",
                   f"Message {i}: the quick brown fox jumps over the lazy dog near river {i}.")
        did = run(ctx.maintain(summarize))
        seen += did
        _, tokens = run(ctx.prompt(summarize))
        largest = max(largest, tokens)
    assert seen[0] == "warning" and "flush" in seen
    assert seen.index("warning") < seen.index("flush")
    # one warning per flush cycle: a flush resets it
    assert all(a != b or a == "flush" for a, b in zip(seen, seen[1:], strict=False))
    assert largest <= ctx.config.budget
    warnings = [m for m in ctx.recall.search_date("2000-01-01", "2100-01-01", page_size=1000).items]
    assert len(warnings) == 60  # search_date lists user and assistant messages only
    stats = ctx.stats()
    assert stats["messages"] == 60 + seen.count("warning")  # every message, every alert: all in recall
    assert stats["summaries"] == len(summarize.requests) == seen.count("flush")
    assert stats["evictions"] == stats["messages"] - stats["in_context"]


def test_summary_is_recursive(store, count_tokens):
    ctx = make(store, count_tokens)
    summarize = Summarizer()
    for i in range(8):
        ctx.append("user", f"fact number {i}")
    run(ctx.flush(summarize))
    assert ctx.summary == "S1: the user talked about topic 1."
    assert "fact number 0" in summarize.requests[0][1]["content"]
    assert "fact number 4" not in summarize.requests[0][1]["content"]
    run(ctx.flush(summarize))
    second = summarize.requests[1][1]["content"]
    assert second.startswith("Earlier summary:\nS1: the user talked about topic 1.")
    assert "fact number 4" in second and "fact number 0" not in second
    assert ctx.summary.startswith("S2")
    assert "### Summary of evicted conversation\nS2" in ctx.messages()[0]["content"]
    assert [m.content for m in ctx.queue()] == ["fact number 6", "fact number 7"]


def roles(seq: str) -> list[Message]:
    names = {"u": "user", "a": "assistant", "t": "tool", "s": "system"}
    return [Message(i, names[c], c, 0.0) for i, c in enumerate(seq)]


@pytest.mark.parametrize("seq,cut", [
    ("uuuu", 2),
    ("uatuat", 3),     # half is 3: u a t | u a t
    ("uuatuu", 4),     # half is 3, but message 3 is a result: keep it with its call
    ("uatttu", 5),     # several results of one step stay together
    ("ua", 1),
    ("u", 1),
    ("at", 2),         # a call and its result only: cannot keep one without the other
    ("uat", 1),        # half rounds to 2, which would split a from t
])
def test_eviction_never_separates_a_call_from_its_result(store, count_tokens, seq, cut):
    ctx = make(store, count_tokens)
    queue = roles(seq)
    assert ctx.eviction_cut(queue) == cut
    assert cut == len(queue) or queue[cut].role != "tool"


def test_flush_cycles_never_leave_an_orphan_result(store, count_tokens):
    ctx = make(store, count_tokens, window=768)
    summarize = Summarizer()
    rng = random.Random(1)
    for _ in range(120):
        kind = rng.choice(["user", "call"])
        if kind == "user":
            ctx.append("user", "tell me about " + " ".join(rng.choice(["cats", "stars", "rivers"])
                                                           for _ in range(rng.randint(3, 40))))
        else:
            ctx.append("assistant", '{"function": "archival_memory_search", "arguments": {"query": "x"}}')
            ctx.append("tool", '{"type": "function_return", "status": "OK", "message": "' + "y" * 300 + '"}')
        msgs, tokens = run(ctx.prompt(summarize))
        assert tokens <= ctx.config.budget
        assert ctx.queue()[0].role != "tool"
    assert ctx.stats()["summaries"] > 3


def test_one_huge_message_is_cut_in_the_prompt_but_whole_in_recall(store, count_tokens, tokenizer):
    ctx = make(store, count_tokens)
    huge = "word " * 3000
    m = ctx.append("user", huge)
    msgs, tokens = run(ctx.prompt(Summarizer()))
    assert tokens <= ctx.config.budget
    assert tokens == len(tokenizer.encode_chat(msgs))
    assert msgs[-1]["content"].endswith("[truncated; the full text is in recall storage]")
    assert ctx.recall.get(m.id).content == huge


def test_summary_requests_fit_the_window(store, count_tokens):
    ctx = make(store, count_tokens, window=512, summary_tokens=64)
    for i in range(40):
        ctx.append("user", f"note {i}: " + "lorem ipsum dolor sit amet " * 6)
    summarize = Summarizer()
    run(ctx.flush(summarize))
    assert len(summarize.requests) > 1  # too much for one call: folded in several, recursively
    for req in summarize.requests:
        assert count_tokens(req) + 64 <= 512
    for prev, req in zip(summarize.requests, summarize.requests[1:], strict=False):
        assert f"Earlier summary:\nS{summarize.requests.index(prev) + 1}" in req[1]["content"]


def test_bad_configuration_is_named(store, count_tokens):
    with pytest.raises(ContextError, match="warning_fraction must be in"):
        ContextConfig(2048, warning_fraction=1.5)
    with pytest.raises(ContextError, match="reply_tokens must be in"):
        ContextConfig(100, reply_tokens=100)
    with pytest.raises(ContextError, match="a context window of 300 tokens cannot hold the system prompt"):
        MainContext(store, "tiny", count_tokens, ContextConfig(300, reply_tokens=64))


def test_state_resumes_after_restart(tmp_path, count_tokens):
    from llmos.memory import MemoryStore

    s = MemoryStore(tmp_path / "m.db")
    ctx = make(s, count_tokens)
    assert ctx.created
    for i in range(10):
        ctx.append("user", f"m{i}")
    run(ctx.flush(Summarizer()))
    before = ctx.messages()
    s.close()
    s2 = MemoryStore(tmp_path / "m.db")
    again = make(s2, count_tokens)
    assert not again.created
    assert again.messages() == before and again.summary.startswith("S1")
    s2.close()
