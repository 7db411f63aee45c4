"""The kernel on the real engine: process states, kill, suspend, quotas, syscall log."""

import asyncio
import time

import pytest

from llmos.kernel import ProcessState, ProcessTable, Quotas, SyscallError, Syscalls
from llmos.security.monitor import Decision
from llmos.tools import Tool, ToolRegistry, builtin_tools

LONG = "Write a long story about a robot who learns to paint. Once upon a time"


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def generate(sys: Syscalls, prompt: str = LONG, max_tokens: int = 40) -> str:
    return (await sys.llm_generate(prompt, max_tokens=max_tokens)).text


def test_an_agent_runs_to_its_end_and_is_logged(make_kernel):
    async def agent(sys: Syscalls) -> str:
        r = await sys.llm_chat([{"role": "user", "content": "Say hi."}], max_tokens=8)
        t = await sys.tool_call("calculator", {"expression": "6 * 7"})
        sys.print(t.content)
        return r.text

    async def main():
        kernel = make_kernel(tools=builtin_tools())
        pid = await kernel.spawn(agent, "greeter")
        result = await kernel.wait(pid)
        proc = kernel.process(pid)
        assert proc.state is ProcessState.TERMINATED and proc.exit_reason == "exited"
        assert result == proc.result and isinstance(result, str) and result
        assert proc.output == ["42"] and proc.tool_calls == 1 and proc.syscalls == 2
        assert proc.tokens_used > 8
        log = kernel.table.syscall_log(pid)
        assert [(e["name"], e["status"]) for e in log] == [("llm_chat", "ok"), ("tool_call", "ok")]
        assert '"expression": "6 * 7"' in log[1]["args"]
        await kernel.shutdown(close_backend=False)
        row = ProcessTable(kernel.home / "kernel.db").process(pid)
        assert row["state"] == "terminated" and row["exit_reason"] == "exited" and row["name"] == "greeter"

    asyncio.run(main())


def test_kill_during_an_llm_call_aborts_it_and_frees_its_blocks(make_kernel, llm):
    async def main():
        kernel = make_kernel()
        pid = await kernel.spawn(generate, args={"max_tokens": 400})
        proc = kernel.process(pid)
        await _until(lambda: proc.tokens_used > 5)
        assert proc.state is ProcessState.RUNNING and proc.current_syscall == "llm_generate"
        await kernel.kill(pid, "test")
        assert proc.state is ProcessState.TERMINATED and proc.exit_reason == "killed: test"
        stats = await llm.stats()
        assert stats["kv_blocks_used"] == 0 and not llm.engine.requests
        assert kernel.table.syscall_log(pid)[-1]["status"] == "killed"
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def _slow_tool(started: asyncio.Event) -> Tool:
    async def slow(args, ctx):
        started.set()
        await asyncio.sleep(60)
        return "never"

    return Tool("slow", "Takes a minute.", {"type": "object"}, slow)


def test_kill_during_a_tool_call(make_kernel):
    async def agent(sys: Syscalls):
        await sys.tool_call("slow", {})

    async def main():
        started = asyncio.Event()
        tools = ToolRegistry()
        tools.register(_slow_tool(started))
        kernel = make_kernel(tools=tools)
        pid = await kernel.spawn(agent)
        await asyncio.wait_for(started.wait(), 10)
        assert kernel.process(pid).state is ProcessState.WAITING
        await kernel.kill(pid)
        assert kernel.process(pid).exit_reason == "killed: killed"
        assert kernel.table.syscall_log(pid)[-1]["status"] == "killed"
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_suspend_pauses_the_generation_and_resume_finishes_it_identically(make_kernel, llm):
    async def main():
        kernel = make_kernel()
        reference = await kernel.wait(await kernel.spawn(generate))
        pid = await kernel.spawn(generate)
        proc = kernel.process(pid)
        await _until(lambda: proc.tokens_used > 3)
        await kernel.suspend(pid)
        assert proc.state is ProcessState.SUSPENDED
        await _until(lambda: llm.engine.scheduler.paused)
        frozen = proc.tokens_used
        await asyncio.sleep(0.5)
        assert proc.tokens_used == frozen and not proc.task.done()
        await kernel.resume(pid)
        assert await kernel.wait(pid) == reference
        assert proc.exit_reason == "exited"
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["rr", "priority", "fair"])
def test_preempted_generations_resume_with_exactly_the_same_tokens(make_kernel, policy):
    prompts = [LONG, "List the planets of the solar system, one per line:", "Explain what a kernel is."]

    async def run(policy: str, max_running: int) -> tuple[list[str], int]:
        kernel = make_kernel(policy=policy, max_running=max_running, quantum=4)
        # A low-priority call holds the only slot and has generated a few tokens when two
        # higher-priority (and, for fair share, fresher) calls arrive: each policy must preempt it.
        first = await kernel.spawn(generate, args={"prompt": prompts[0], "max_tokens": 48}, priority=1)
        await _until(lambda: kernel.process(first).tokens_used > 3)
        pids = [first] + [await kernel.spawn(generate, args={"prompt": p, "max_tokens": 48}, priority=0)
                          for p in prompts[1:]]
        texts = [await kernel.wait(pid) for pid in pids]
        preemptions = kernel.sched.preemptions
        await kernel.shutdown(close_backend=False)
        return texts, preemptions

    async def main():
        alone, none = await run("fifo", max_running=8)
        switched, preemptions = await run(policy, max_running=1)
        assert none == 0
        assert preemptions >= (10 if policy == "rr" else 1)  # the scenario did preempt
        assert switched == alone

    asyncio.run(main())


def test_quotas_end_the_agent_with_the_reason(make_kernel, llm):
    async def loop_tools(sys: Syscalls):
        while True:
            await sys.tool_call("calculator", {"expression": "1 + 1"})

    async def sleeper(sys: Syscalls):
        await sys.sleep(30)

    async def main():
        kernel = make_kernel(tools=builtin_tools())
        tokens = await kernel.spawn(generate, args={"max_tokens": 200}, quotas=Quotas(llm_tokens=30))
        tools = await kernel.spawn(loop_tools, quotas=Quotas(tool_calls=3))
        wall = await kernel.spawn(sleeper, quotas=Quotas(wall_time_s=0.3))
        for pid in (tokens, tools, wall):
            await kernel.wait(pid)
        assert kernel.process(tokens).exit_reason == "quota exceeded: llm_tokens used 31 of 30"
        assert kernel.process(tools).exit_reason == "quota exceeded: tool_calls used 3 of 3"
        assert kernel.process(wall).exit_reason == "quota exceeded: wall_time_s 0.3"
        assert not llm.engine.requests  # the generation cut short was aborted
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())
    with pytest.raises(ValueError, match="quota llm_tokens must be positive"):
        Quotas(llm_tokens=0)


class _DenyWrites:
    def check(self, agent, tool, args, labels=None):
        return Decision(False, "writes are not granted") if tool == "write_file" else Decision(True)

    def record(self, agent, tool, args, decision, status):
        self.recorded.append((agent.pid, tool, decision.allowed, status))

    def attenuate(self, parent, requested):
        return requested

    def __init__(self):
        self.recorded = []


def test_the_monitor_decides_and_errors_come_back_as_results(make_kernel):
    async def agent(sys: Syscalls):
        results = [await sys.tool_call("write_file", {"path": "x.txt", "content": "hi"}),
                   await sys.tool_call("calculator", {"expression": "1 / 0"}),
                   await sys.tool_call("no_such_tool", {}),
                   await sys.tool_call("boom", {})]
        return [(r.ok, r.error) for r in results]

    def boom(args, ctx):
        raise RuntimeError("bad day")

    async def main():
        tools = builtin_tools()
        tools.register(Tool("boom", "Fails.", {"type": "object"}, boom))
        monitor = _DenyWrites()
        kernel = make_kernel(tools=tools, monitor=monitor)
        pid = await kernel.spawn(agent)
        results = await kernel.wait(pid)
        assert results[0] == (False, "denied: writes are not granted")
        assert results[1] == (False, "division by zero")
        assert results[2][0] is False and results[2][1].startswith("no tool named 'no_such_tool'")
        assert results[3] == (False, "boom failed: RuntimeError: bad day")
        assert not (kernel.workdir(pid) / "x.txt").exists()
        assert monitor.recorded == [(pid, "write_file", False, "denied"), (pid, "calculator", True, "error"),
                                    (pid, "boom", True, "error")]
        statuses = [e["status"] for e in kernel.table.syscall_log(pid)]
        assert statuses == ["denied", "error", "error", "error"]
        assert kernel.process(pid).syscall_errors == 4
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_bad_syscalls_and_crashing_agents(make_kernel):
    async def bad_messages(sys: Syscalls):
        try:
            await sys.llm_chat("hello")
        except SyscallError as e:
            return str(e)

    async def too_long(sys: Syscalls):
        await sys.llm_generate("word " * 3000, max_tokens=10)

    async def main():
        kernel = make_kernel()
        a = await kernel.spawn(bad_messages)
        b = await kernel.spawn(too_long)
        assert await kernel.wait(a) == "messages must be a list of {'role': ..., 'content': ...} objects"
        await kernel.wait(b)
        assert kernel.process(b).exit_reason == (
            "error: SyscallError: the request needs 189 KV blocks at most but the KV budget holds 91; "
            "raise kv_budget or lower max_tokens")
        with pytest.raises(SyscallError, match="must be an async function"):
            await kernel.spawn(lambda sys: None)
        with pytest.raises(SyscallError, match="no agent with pid 999"):
            await kernel.kill(999)
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_children_and_waiting(make_kernel):
    async def child(sys: Syscalls, n: int) -> int:
        return n * 2

    async def parent(sys: Syscalls) -> list[int]:
        pids = [await sys.spawn(child, "child", args={"n": i}) for i in range(3)]
        return [await sys.wait(p) for p in pids]

    async def main():
        kernel = make_kernel()
        pid = await kernel.spawn(parent)
        result = await kernel.wait(pid)
        assert kernel.process(pid).exit_reason == "exited"
        assert result == [0, 2, 4]
        children = [p for p in kernel.ps() if p.parent == pid]
        assert len(children) == 3 and all(c.exit_reason == "exited" for c in children)
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_shutdown_ends_live_agents(make_kernel, tmp_path):
    async def main():
        kernel = make_kernel()
        pid = await kernel.spawn(generate, args={"max_tokens": 400})
        await asyncio.sleep(0.2)
        await kernel.shutdown(close_backend=False)
        return pid

    pid = asyncio.run(main())
    row = ProcessTable(tmp_path / "kernel.db").process(pid)
    assert row["state"] == "terminated" and row["exit_reason"] == "kernel shut down"


def test_privileged_syscalls_need_kernel_capabilities(make_kernel, tmp_path):
    from llmos.security import AuditLog, Capabilities, ReferenceMonitor, default_capabilities

    async def sleeper(sys: Syscalls):
        await sys.sleep(30)

    async def admin(sys: Syscalls, victim: int):
        stats = await sys.kernel_stats()
        old = await sys.configure(policy="fair", quantum=8)
        try:
            await sys.kill(sys.pid)
        except SyscallError as e:
            self_kill = str(e)
        return stats["policy"], old, await sys.kill(victim, "cleanup"), self_kill

    async def intruder(sys: Syscalls):
        try:
            await sys.configure(max_running=1)
        except SyscallError as e:
            return str(e)

    async def main():
        tools = builtin_tools()
        monitor = ReferenceMonitor(audit=AuditLog(tmp_path / "audit.db"), tools=tools)
        kernel = make_kernel(tools=tools, monitor=monitor)
        kernel.default_capabilities = default_capabilities
        victim = await kernel.spawn(sleeper)
        caps = Capabilities.of([{"tool": f"kernel.{name}"} for name in ("stats", "configure", "signal")])
        policy, old, outcome, self_kill = await kernel.wait(
            await kernel.spawn(admin, args={"victim": victim}, capabilities=caps))
        assert (policy, old, outcome) == ("fifo", {"policy": "fifo", "quantum": 16}, "kill: done")
        assert self_kill == "an agent cannot signal itself"
        assert kernel.settings()["policy"] == "fair"
        assert kernel.process(victim).exit_reason == "killed: cleanup"
        denied = await kernel.wait(await kernel.spawn(intruder))
        assert denied == "denied: denied by capabilities: no capability for tool 'kernel.configure'"
        assert kernel.settings()["max_running"] == 8
        await kernel.shutdown(close_backend=False)

    asyncio.run(main())
