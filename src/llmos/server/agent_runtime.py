"""Running API agents: each message is a run, and each run is a kernel process (cf. a shell that
forks one process per command and a job table that remembers them).

A run executes the MemGPT agent's step loop (`llmos.agents.memgpt.MemGPTAgent`) on the server's
kernel, so the scheduling policy, quotas and the reference monitor apply to it like to any agent;
the process is named after the agent's id, which keys its memory. Runs of one agent take turns in
arrival order (`System.turns`): a message to a busy agent waits, with run status "created", and
runs when the one before it ends. Every message the agent stores is handed, as it is stored, to
whoever watches the run (a streaming client). Each step is one transaction (the step journal of
`llmos.memory.agents`): a run that is cancelled or crashes mid-step loses that step entirely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from llmos.agents import memgpt
from llmos.agents.memgpt import DEFAULT_MAX_STEPS, MEMORY_FUNCTIONS, MemGPTAgent
from llmos.agents.messages import AgentMessage
from llmos.agents.tool_rules import ToolRules
from llmos.kernel.approvals import approvals_of
from llmos.memory import ContextConfig, MainContext, open_store
from llmos.memory.agents import AgentDef, AgentStore, Run

DEFAULT_REPLY_TOKENS = 128
RECENT_CONTEXTS = 16  # main contexts kept for the dashboard: those of the agents that ran last
DEFAULT_TOOLS = list(MEMORY_FUNCTIONS)
CANCELLED = "cancelled by the API"


def instructions(agent: AgentDef) -> str:
    """The system prompt the model sees: the agent's own, how to call functions, and its tool rules."""
    return memgpt.instructions(agent.system, ToolRules.from_letta(agent.tool_rules))


class _StepContext(MainContext):
    """Main context whose steps are journaled transactions (see llmos.memory.agents)."""

    def __init__(self, *args: Any, journal: AgentStore, run_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal, self.run_id = journal, run_id
        self.steps = 0
        self.prompt_tokens = 0
        self._open = False

    async def maintain(self, summarize) -> list[str]:
        """A step starts by assembling its prompt, which maintains first: commit the previous step,
        relieve memory pressure (its own transactions), then open this step."""
        self.end_step()
        done = await super().maintain(summarize)
        self.journal.begin_step(self.agent, self.run_id)
        self._open = True
        self.steps += 1
        return done

    def end_step(self) -> None:
        if self._open:
            self.journal.end_step(self.agent)
            self._open = False

    def note_prompt(self, prompt_tokens: int, max_tokens: int) -> None:
        super().note_prompt(prompt_tokens, max_tokens)
        self.prompt_tokens += prompt_tokens


@dataclass
class ActiveRun:
    """A run this server is handling now: its watchers and, once it runs, its process."""

    run: Run
    pid: int | None = None
    messages: list[AgentMessage] = field(default_factory=list)
    watchers: list[asyncio.Queue] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def watch(self) -> asyncio.Queue:
        """A queue of this run's new messages, then None when it ends."""
        q: asyncio.Queue = asyncio.Queue()
        for m in self.messages:
            q.put_nowait(m)
        if self.done.is_set():
            q.put_nowait(None)
        self.watchers.append(q)
        return q

    def add(self, message: AgentMessage) -> None:
        self.messages.append(message)
        for q in self.watchers:
            q.put_nowait(message)

    def finish(self) -> None:
        self.done.set()
        for q in self.watchers:
            q.put_nowait(None)


class AgentRuntime:
    """The agents of one running System: their store and the runs in flight."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.memory = open_store(system.home)
        self.store = AgentStore(system.home / "agents.db", self.memory)
        self.active: dict[str, ActiveRun] = {}
        self.recent: dict[str, MainContext] = {}  # agent id -> its latest run's context, oldest first
        self._tasks: set[asyncio.Task] = set()
        for run_id in self.store.recover():  # queued before a restart: they keep their order
            run = self.store.get_run(run_id)
            if run is not None:
                self._start(run)

    # -- runs -------------------------------------------------------------------------------------

    def submit(self, agent: AgentDef, text: str, max_steps: int | None = None,
               background: bool = False) -> ActiveRun:
        """Queue a message for the agent; it runs when the agent's earlier runs have ended."""
        return self._start(self.store.new_run(agent, text, max_steps, background))

    def _start(self, run: Run) -> ActiveRun:
        active = self.active[run.id] = ActiveRun(run)
        task = asyncio.get_running_loop().create_task(self._execute(active))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return active

    def refresh(self, active: ActiveRun) -> Run:
        active.run = self.store.get_run(active.run.id) or active.run
        return active.run

    async def _execute(self, active: ActiveRun) -> None:
        run = active.run
        try:
            async with self.system.turns.turn(run.agent_id):
                current = self.store.get_run(run.id)
                agent = self.store.get(run.agent_id)
                if current is None or current.status != "created":
                    return  # cancelled (or deleted with its agent) while it waited
                if agent is None:
                    self.store.set_run(run.id, status="failed", stop_reason="error",
                                       error="the agent was deleted", completed_at=time.time())
                    return
                await self._run(active, agent)
        except Exception as e:  # the server's own failure: the run says so, the server goes on
            self.store.set_run(run.id, status="failed", stop_reason="error",
                               error=f"{type(e).__name__}: {e}", completed_at=time.time())
        finally:
            self.refresh(active)
            self.active.pop(run.id, None)
            active.finish()

    async def _run(self, active: ActiveRun, agent: AgentDef) -> None:
        run, kernel = active.run, self.system.kernel
        self.store.set_run(run.id, status="running", started_at=time.time())
        reply_tokens = agent.max_tokens or DEFAULT_REPLY_TOKENS
        max_steps = max(1, run.max_steps or DEFAULT_MAX_STEPS)
        outcome: dict[str, Any] = {}

        async def program(sys: Any) -> None:
            window = min(agent.context_window_limit or sys.context_window, sys.context_window)
            config = ContextConfig(window, reply_tokens=reply_tokens)
            context = _StepContext(self.memory, agent.id, sys.count_tokens, config,
                                   system=instructions(agent), journal=self.store, run_id=run.id)
            outcome["context"] = context
            self.recent.pop(agent.id, None)
            self.recent[agent.id] = context
            while len(self.recent) > RECENT_CONTEXTS:
                self.recent.pop(next(iter(self.recent)))
            specs = {s["function"]["name"]: s for s in sys.tools()}
            loop = MemGPTAgent(sys, context, [specs[n] for n in agent.tools if n in specs],
                               tool_rules=ToolRules.from_letta(agent.tool_rules), max_steps=max_steps,
                               reply_tokens=reply_tokens)
            outcome["turn"] = await loop.turn(run.input, on_message=active.add)
            context.end_step()

        first = self.store.last_message(agent.id) + 1
        rules = ToolRules.from_letta(agent.tool_rules)
        active.pid = await kernel.spawn(program, name=agent.id, owner=run.owner)
        approvals = approvals_of(kernel)
        if needs := rules.requiring_approval():  # set before the process first runs
            approvals.require(*needs, pid=active.pid)
        try:
            await kernel.wait(active.pid)
        finally:
            approvals.release(active.pid)
        proc = kernel.process(active.pid)
        self.store.rollback_step(agent.id)  # a step left open (killed, crashed) did not happen
        context, turn = outcome.get("context"), outcome.get("turn")
        prompt = turn.prompt_tokens if turn else (context.prompt_tokens if context else 0)
        completion = turn.completion_tokens if turn else max(0, proc.tokens_used - prompt)
        usage = {"step_count": turn.steps if turn else (context.steps if context else 0),
                 "prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        reason = proc.exit_reason or ""
        if reason == "exited" and turn is not None:
            status, stop, error = "completed", turn.stop_reason, None
        elif CANCELLED in reason:
            status, stop, error = "cancelled", "cancelled", reason
        else:
            status, stop, error = "failed", "error", reason
        now = time.time()
        last = self.store.last_message(agent.id)  # the agent's rows from `first` on are this run's (its turn)
        self.store.set_run(run.id, status=status, stop_reason=stop, error=error, usage=usage,
                           completed_at=now, first_message=first if last >= first else None,
                           last_message=last if last >= first else None)
        with contextlib.suppress(Exception):  # the agent may have been deleted meanwhile
            self.store.update(agent.id, last_stop_reason=stop, last_run_completion=now)

    async def cancel(self, agent_id: str, run_ids: list[str] | None = None) -> list[str]:
        """Cancel the agent's queued and running runs (or those of `run_ids`); returns their ids."""
        done = []
        for active in list(self.active.values()):
            run = self.refresh(active)
            if run.agent_id != agent_id or (run_ids is not None and run.id not in run_ids):
                continue
            if run.status == "created":
                self.store.set_run(run.id, status="cancelled", stop_reason="cancelled", error=CANCELLED,
                                   completed_at=time.time())
                done.append(run.id)
            elif run.status == "running" and active.pid is not None:
                await self.system.kernel.kill(active.pid, CANCELLED)
                await active.done.wait()
                done.append(run.id)
        return done

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()

