"""The MemGPT agent through the real kernel: a scripted backend for exact loops, then the embedded model."""

import asyncio
import json
from typing import Any

import pytest
from rich.console import Console

from llmos.agents import memgpt
from llmos.bench.virtual_context import run_context
from llmos.kernel import ChatResult, Kernel
from llmos.memory import ArchivalStorage, CoreMemory, RecallStorage, open_store
from llmos.tools.base import ToolRegistry
from llmos.tools.memory import memory_tools
from tests.stub_backend import StubBackend


class ScriptedBackend(StubBackend):
    """A kernel backend that replays fixed model outputs (function calls) and writes summaries itself;
    tokens are counted with the real SmolLM2 tokenizer and chat template."""

    def __init__(self, count_tokens, outputs: list[Any], context_window: int = 8192) -> None:
        self.count_tokens = count_tokens
        self.outputs = list(outputs)
        self.context_window = context_window
        self.prompts: list[list[dict]] = []
        self.summaries = 0
        self.schemas: list[Any] = []

    async def complete(self, call, prompt, params, on_tokens) -> ChatResult:
        n = self.count_tokens(prompt)
        assert n + params.max_tokens <= self.context_window, "prompt and reply overflow the window"
        if prompt[0]["content"].startswith("You maintain the running summary"):  # the summarizer
            self.summaries += 1
            return ChatResult(f"summary {self.summaries}", "stop", n, 3)
        self.prompts.append(prompt)
        self.schemas.append(params.json_schema)
        out = self.outputs.pop(0)
        text = out if isinstance(out, str) else json.dumps(out)
        return ChatResult(text, "stop", n, 10)


def say(message: str, heartbeat: bool = False) -> dict:
    return {"function": "send_message", "arguments": {"message": message, "request_heartbeat": heartbeat}}


def registry(embedder) -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(*memory_tools(embedder))
    return reg


def run_agent(home, backend, embedder, name="sam", **args) -> Any:
    async def go():
        kernel = Kernel(backend, home=home, tools=registry(embedder))
        try:
            pid = await kernel.spawn(memgpt.main, name=name, args=args)
            result = await kernel.wait(pid)
            proc = kernel.process(pid)
            assert proc.exit_reason == "exited", proc.exit_reason
            return result
        finally:
            await kernel.shutdown()
    return asyncio.run(go())


def test_one_turn_edits_memory_then_answers(tmp_path, count_tokens, embedder):
    backend = ScriptedBackend(count_tokens, [
        {"function": "core_memory_append",
         "arguments": {"label": "human", "content": "Name: Ana. Has a dog, Rex.", "request_heartbeat": True}},
        say("Nice to meet you, Ana! Say hi to Rex."),
    ])
    reply = run_agent(tmp_path, backend, embedder, message="Hi, I'm Ana and my dog is Rex.")
    assert reply == "Nice to meet you, Ana! Say hi to Rex."
    store = open_store(tmp_path)
    assert CoreMemory(store, "sam").get("human").value.endswith("Name: Ana. Has a dog, Rex.")
    queue = RecallStorage(store, "sam").in_context()
    assert [m.role for m in queue] == ["user", "assistant", "tool", "system", "assistant", "tool"]
    assert json.loads(queue[2].content)["status"] == "OK"
    assert "request_heartbeat was true" in queue[3].content
    # the second step saw the edited core memory in its system prompt
    assert "Has a dog, Rex." in backend.prompts[1][0]["content"]
    # the model's output was constrained to calls of the seven functions
    names = sorted(alt["properties"]["function"]["const"] for alt in backend.schemas[0]["anyOf"])
    assert names == sorted(memgpt.MEMORY_FUNCTIONS)
    append = next(a for a in backend.schemas[0]["anyOf"]
                  if a["properties"]["function"]["const"] == "core_memory_append")
    args = append["properties"]["arguments"]["properties"]
    assert args["label"]["enum"] == ["persona", "human"]  # only blocks that exist
    assert args["content"]["maxLength"] == 2 * 128  # two characters per reply token
    # the agent's own reply is searchable, the function call plumbing is not
    hits = RecallStorage(store, "sam").search("Rex")
    assert sorted(m.role for m in hits.items) == ["assistant", "user"]


def test_errors_come_back_as_results_and_chain_a_step(tmp_path, count_tokens, embedder):
    backend = ScriptedBackend(count_tokens, [
        '{"function": "send_message", "arguments": ',  # cut short: not JSON
        {"function": "core_memory_replace",
         "arguments": {"label": "human", "old_content": "cats", "new_content": "dogs",
                       "request_heartbeat": False}},
        {"function": "launch_rocket", "arguments": {}},
        say("Sorry, all fixed."),
    ])
    assert run_agent(tmp_path, backend, embedder, message="hello", max_steps=4) == "Sorry, all fixed."
    queue = RecallStorage(open_store(tmp_path), "sam").in_context()
    texts = [m.content for m in queue]
    assert "Your reply was not a valid function call: the reply is not JSON" in texts[2]
    failed = json.loads(texts[4])
    assert failed["status"] == "Failed" and failed["function"] == "core_memory_replace"
    assert failed["message"] == "Error: core_memory_replace: 'cats' is not in core memory block 'human'"
    assert "Function core_memory_replace failed" in texts[5]  # a failure returns control despite no heartbeat
    assert "no function named 'launch_rocket'" in texts[7]


def test_the_last_step_may_only_reply(tmp_path, count_tokens, embedder):
    search = {"function": "archival_memory_search", "arguments": {"query": "x", "request_heartbeat": True}}
    backend = ScriptedBackend(count_tokens, [search, search, say("Found nothing.")])
    assert run_agent(tmp_path, backend, embedder, message="loop", max_steps=3) == "Found nothing."
    offered = [sorted(a["properties"]["function"]["const"] for a in s["anyOf"]) for s in backend.schemas]
    assert offered == [sorted(memgpt.MEMORY_FUNCTIONS)] * 2 + [["send_message"]]


def test_a_call_that_yields_without_a_reply_is_followed_by_one(tmp_path, count_tokens, embedder):
    note = {"function": "archival_memory_insert", "arguments": {"content": "x", "request_heartbeat": False}}
    backend = ScriptedBackend(count_tokens, [note, say("Saved.")])
    assert run_agent(tmp_path, backend, embedder, message="remember x", max_steps=5) == "Saved."
    assert [len(s["anyOf"]) for s in backend.schemas] == [7, 1]  # the second step could only reply


def test_an_unconstrained_model_cannot_break_the_rules(tmp_path, count_tokens, embedder):
    search = {"function": "archival_memory_search", "arguments": {"query": "x", "request_heartbeat": True}}
    backend = ScriptedBackend(count_tokens, [search, search, say("ok")])
    rules = [{"type": "run_first", "tool_name": "send_message"}]
    assert run_agent(tmp_path, backend, embedder, message="hi", max_steps=2, constrained=False,
                     tool_rules=rules) is None  # neither step made an allowed call
    queue = RecallStorage(open_store(tmp_path), "sam").in_context()
    alerts = [json.loads(m.content)["message"] for m in queue if m.role == "system"]
    assert alerts == ["Function archival_memory_search is not allowed now by the tool rules; "
                      "call one of: send_message."] * 2
    assert [m.role for m in queue].count("tool") == 0  # nothing ran
    assert backend.schemas == [None, None]


def test_agent_resumes_across_kernels(tmp_path, count_tokens, embedder):
    run_agent(tmp_path, ScriptedBackend(count_tokens, [say("Noted: your code is 4417.")]), embedder,
              name="bob", message="My locker code is 4417.")
    second = ScriptedBackend(count_tokens, [
        {"function": "conversation_search", "arguments": {"query": "locker code", "request_heartbeat": True}},
        say("It is 4417."),
    ])
    reply = run_agent(tmp_path, second, embedder, name="bob", message="What's my locker code?")
    assert reply == "It is 4417."
    contents = [m["content"] for m in second.prompts[0]]
    assert "My locker code is 4417." in contents  # the first run's messages are still in main context
    found = json.loads(second.prompts[1][-2]["content"])["message"]
    assert "My locker code is 4417." in found


def test_long_chat_pages_out_and_never_overflows(tmp_path, count_tokens, embedder):
    turns = [f"Turn {i}: let me tell you about my day, it involved {i} cups of coffee and a long walk."
             for i in range(40)]
    backend = ScriptedBackend(count_tokens, [say(f"Got it ({i}).") for i in range(40)], context_window=8192)
    run_agent(tmp_path, backend, embedder, message=turns, context_window=768, reply_tokens=64,
              summary_tokens=64, block_limit=200)
    store = open_store(tmp_path)
    row = store.agent("sam")
    assert row["summaries"] == backend.summaries > 0 and row["evictions"] > 0
    assert row["overflows"] == 0 and 0 < row["largest_prompt"] <= 768 - 64
    assert max(count_tokens(p) for p in backend.prompts) <= 768 - 64
    recall = RecallStorage(store, "sam")
    assert all(recall.search(f"Turn {i} coffee").total for i in range(40))
    user = [m.content for m in recall.search_date("2000-01-01", "2100-01-01", page_size=500).items
            if m.role == "user"]
    assert user == turns  # every message is in recall storage, in order
    warnings = store.query("SELECT count(*) FROM messages WHERE agent = 'sam' AND role = 'system' "
                           "AND content LIKE '%Memory pressure%'")[0][0]
    assert 1 <= warnings <= row["summaries"] + 1  # warned before each flush (at most once per cycle)


def test_end_to_end_on_the_embedded_model(tmp_path, embedder):
    from llmos.kernel import EngineBackend

    backend = EngineBackend("smollm2-135m-instruct")
    reply = run_agent(tmp_path, backend, embedder, name="smol", message="Hi! My name is Ana.",
                      max_steps=2, reply_tokens=96, context_window=2048)
    store = open_store(tmp_path)
    queue = RecallStorage(store, "smol").in_context()
    calls = [json.loads(m.content) for m in queue if m.role == "assistant"]
    assert calls and all(c["function"] in memgpt.MEMORY_FUNCTIONS for c in calls)  # constrained: valid
    assert isinstance(reply, str) and reply.strip()  # the reply guarantee: a message, every turn
    assert calls[-1]["function"] == "send_message" and calls[-1]["arguments"]["message"] == reply
    # Whatever the model chose, each call ran through the kernel once and its effect is in the store.
    assert [m.role for m in queue] == ["user"] + ["assistant", "tool"] * len(calls)
    results = [json.loads(m.content) for m in queue if m.role == "tool"]
    assert [(r["function"], r["status"]) for r in results] == [(c["function"], "OK") for c in calls]
    inserted = [c["arguments"]["content"] for c in calls if c["function"] == "archival_memory_insert"]
    archival = ArchivalStorage(store, "smol", embedder)
    assert archival.count() == len(inserted)
    assert sorted(p.text for p in archival.search("Ana", page_size=50).items) == sorted(inserted)
    edits = [c for c in calls if c["function"].startswith("core_memory_")]
    human = CoreMemory(store, "smol").get("human").value
    assert (human == "(nothing known about the user yet)") == (not edits)
    row = store.agent("smol")
    assert row["overflows"] == 0 and row["largest_prompt"] <= 2048 - 96


def test_bench_context_run_pages_and_never_overflows(tmp_path):
    """The context run of `llmos bench memory`, shrunk: the embedded model, evictions, no overflow."""
    c = run_context("smollm2-135m-instruct", tmp_path, Console(file=open(tmp_path / "log.txt", "w")),
                    messages=9, window=576, chunk=3)
    assert c["messages"] >= 9 and c["window_overflows"] == 0
    assert c["largest_prompt_plus_reply"] <= 576
    assert c["summaries"] >= 1 and c["evictions"] >= 1 and c["evicted_in_store"] == c["evictions"]
    assert c["every_message_in_recall"] is True


def test_parse_call_names_what_is_wrong():
    known = {"send_message"}
    assert memgpt.parse_call('{"function": "send_message", "arguments": {"message": "hi"}}', known) == \
        ("send_message", {"message": "hi"})
    bad = [("hello", "the reply is not JSON"),
           ('["send_message"]', 'an object with a "function" name'),
           ('{"function": "fly", "arguments": {}}', "no function named 'fly' (functions: send_message)"),
           ('{"function": "send_message", "arguments": "hi"}', '"arguments" must be an object')]
    for text, why in bad:
        with pytest.raises(ValueError) as e:
            memgpt.parse_call(text, known)
        assert why in str(e.value)


def test_paging_in_task_scores_what_the_agent_did(tmp_path, count_tokens, embedder):
    """The bench's paging-in task on a scripted agent: one that searches and answers from the result
    scores on every count; one that answers without searching scores on none."""
    from llmos.bench.virtual_context import paging_trials, run_paging

    trial = paging_trials(1, 12)[0]
    fact_turns = [say(f"Noted ({i}).") for i in range(13)]
    search = {"function": "conversation_search",
              "arguments": {"query": trial["question"], "request_heartbeat": True}}
    good = ScriptedBackend(count_tokens, [*fact_turns, search, say(f"It is {' '.join(trial['answer'])}.")])
    console = Console(file=open(tmp_path / "log.txt", "w"))
    r = run_paging("scripted", tmp_path / "good", console, trials=1, filler=12, backend=good)
    scores = ("evicted_before_question", "searched", "search_found_fact", "answered")
    assert [r[k] for k in scores] == [1, 1, 1, 1]
    assert r["per_trial"][0]["calls"] == ["conversation_search", "send_message"]
    guess = ScriptedBackend(count_tokens, [*fact_turns, say("I don't remember.")])
    r = run_paging("scripted", tmp_path / "guess", console, trials=1, filler=12, backend=guess)
    assert [r[k] for k in scores] == [1, 0, 0, 0]


def test_paging_in_task_counts_an_agent_that_fails_its_trial_and_goes_on(tmp_path, count_tokens, embedder):
    """An agent that fills its core memory until main context no longer fits the window ends with an error:
    the trial is scored as failed (with the reason) and the next trial still runs."""
    from llmos.bench.virtual_context import paging_trials, run_paging

    dense = " ".join(f"q{i}x{i * 7}z" for i in range(40))[:390]  # many tokens per character
    fill = [{"function": "core_memory_append", "arguments": {"label": label, "content": dense,
                                                              "request_heartbeat": True}}
            for label in ("human", "persona")]
    second = paging_trials(2, 12)[1]
    good = [*[say(f"Noted ({i}).") for i in range(13)],
            {"function": "conversation_search", "arguments": {"query": second["question"],
                                                              "request_heartbeat": True}},
            say(f"It is {' '.join(second['answer'])}.")]
    # 12 more replies fill the queue; then main context must evict and cannot fit the window any more
    backend = ScriptedBackend(count_tokens, [*fill, *[say("Noted.")] * 12, *good])
    r = run_paging("scripted", tmp_path, Console(file=open(tmp_path / "log.txt", "w")), trials=2, filler=12,
                   backend=backend)
    first = r["per_trial"][0]
    assert r["agent_errors"] == 1 and "context window of 576 tokens cannot hold" in first["error"]
    assert not first["answered"] and not first["searched"]
    assert [r[k] for k in ("searched", "answered")] == [1, 1] and r["trials"] == 2
