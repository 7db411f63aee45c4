"""A process is a program: its syscalls share one context key, so its context's KV is retained across
its tool calls and reused by its next call; what that saved, the time in the engine and in tools, and
every retention decision are in the process's stats, `Kernel.stats()`, the event stream and /metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llmos.kernel import Syscalls
from llmos.server.metrics import render
from llmos.tools.base import Tool, ToolRegistry
from tests.stub_backend import StubBackend

OPEN = {"type": "object"}
TASK = ("You are a careful assistant. Read the report below and answer in one word. The report: "
        "the river rose during the night, the bridge was closed at dawn, the school opened late and "
        "the market moved to the square by the church until the water went down. ")


def _tools(slept: list[float]) -> ToolRegistry:
    def lookup(args: dict, ctx: Any) -> str:
        time.sleep(0.05)
        slept.append(0.05)
        return "the bridge reopened at noon"

    reg = ToolRegistry()
    reg.register(Tool("lookup", "Looks something up.", OPEN, lookup))
    return reg


def test_a_process_calls_share_a_context_whose_kv_is_retained_across_its_tool_call(make_kernel, llm):
    slept: list[float] = []
    kernel = make_kernel(tools=_tools(slept), policy="las")
    retained = llm.engine.scheduler.retained
    seen: dict[str, Any] = {}

    async def agent(sys: Syscalls) -> str:
        first = await sys.llm_generate(TASK, max_tokens=6)
        seen["retained"] = set(retained.contexts)  # the call's context, under this process's key
        result = await sys.tool_call("lookup", {})
        second = await sys.llm_generate(TASK + first.text + " Result: " + result.content, max_tokens=6)
        return second.text

    async def main() -> None:
        events: list[dict[str, Any]] = []
        kernel.on_event = events.append
        pid = await kernel.spawn(agent, "reader")
        await kernel.wait(pid)
        proc = kernel.process(pid)
        key = kernel.context_key(proc)
        assert seen["retained"] == {key}
        program = proc.info()["program"]
        # The second call found the first one's context in KV: only the answer and the tool's
        # result were computed again.
        assert program["prompt_tokens_reused"] >= 48
        assert program["prompt_tokens_computed"] < program["prompt_tokens_reused"] + 48
        assert program["tool_s"] >= 0.05 and program["llm_s"] > 0
        assert sum(program["retention"].values()) == 1  # one decision, for the one tool call
        kinds = [e["kind"] for e in events if e["pid"] == pid]
        assert kinds.count("llm_call") == 2 and kinds.count("tool_call") == 1
        [decision] = [e for e in events if e["kind"] == "kv_retention"]
        assert decision["tool"] == "lookup" and decision["action"] in ("keep", "swap", "release")
        assert list(kernel.events)[-len(events):] == events
        await asyncio.sleep(0.2)  # the exit's forget runs on the engine thread
        assert key not in retained.contexts  # forgotten when the process ended
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_kernel_stats_and_metrics_show_each_live_process_as_a_program(make_kernel):
    kernel = make_kernel(tools=_tools([]))
    gate = asyncio.Event()

    async def agent(sys: Syscalls) -> None:
        await sys.llm_generate(TASK, max_tokens=2)
        await sys.tool_call("lookup", {})
        await gate.wait()

    async def main() -> None:
        pid = await kernel.spawn(agent, "worker")
        while kernel.process(pid).tool_calls < 1 or kernel.process(pid).program.tool_s == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        stats = await kernel.stats()
        [program] = [p for p in stats["programs"] if p["pid"] == pid]
        assert program["name"] == "worker" and program["prompt_tokens_computed"] > 0
        assert stats["engine"]["kv_retention_captured"] >= 1
        body = render(stats["engine"], None, stats["programs"])[0].decode()
        assert f'llmos_process_prompt_tokens_computed_total{{name="worker",pid="{pid}"}}' in body
        assert f'llmos_process_tool_seconds_total{{name="worker",pid="{pid}"}}' in body
        action = next(iter(program["retention"]))
        labels = f'action="{action}",name="worker",pid="{pid}"'
        assert f"llmos_process_kv_retention_decisions_total{{{labels}}} 1.0" in body
        assert "llmos_kv_retention_captured_total" in body and "llmos_kv_retained_blocks" in body
        gate.set()
        await kernel.wait(pid)
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_a_backend_that_retains_nothing_gets_no_context_key(tmp_path):
    from llmos.kernel import Kernel
    from llmos.kernel.api import ChatResult

    calls: list[dict[str, Any]] = []

    class Remote(StubBackend):  # no between_calls: a remote server's KV is not the kernel's to keep
        async def complete(self, call, prompt, params, on_tokens, **kwargs):
            calls.append(kwargs)
            return ChatResult("ok", "stop", 3, 1)

    async def agent(sys: Syscalls) -> None:
        await sys.llm_generate("hi")
        await sys.tool_call("lookup", {})

    async def main() -> None:
        kernel = Kernel(Remote(), home=tmp_path, tools=_tools([]), monitor="allow-all")
        pid = await kernel.spawn(agent, "remote")
        await kernel.wait(pid)
        program = kernel.process(pid).program
        assert calls == [{}] and program.retention == {} and program.prompt_tokens_computed == 3
        assert [e["kind"] for e in kernel.events] == ["llm_call", "tool_call"]
        await kernel.shutdown()

    asyncio.run(main())


def test_top_shows_each_process_as_a_program_and_the_retention_line():
    from rich.console import Console

    from llmos.commands.kernel import agents_view

    row = {"pid": 7, "name": "reader", "state": "waiting", "tokens_used": 900, "tool_calls": 2,
           "current_syscall": "tool_call", "exit_reason": None}
    status = {"policy": "las", "max_running": 8, "quantum": 16,
              "programs": [{"pid": 7, "name": "reader", "prompt_tokens_reused": 640,
                            "prompt_tokens_computed": 260, "llm_s": 3.25, "tool_s": 1.5,
                            "retention": {"keep": 1, "swap": 1}}],
              "engine": {"kv_blocks_total": 64, "kv_retained_contexts": 1, "kv_retained_blocks": 40,
                         "kv_retention_kept": 1, "kv_retention_swapped": 1,
                         "kv_retention_reused_tokens": 640}}
    console = Console(width=200, record=True)
    console.print(agents_view([row], status, "llmos top"))
    text = console.export_text()
    assert "640/900" in text and "3.2" in text and "1.5" in text and "keep 1 swap 1" in text
    assert "KV across tool calls: 1 contexts retained (40 blocks pinned)" in text
    assert "keep 1, swap 1, release 0" in text and "640 prompt tokens reused" in text
