"""The kernel's backend on a replica pool: agents' LLM calls spread over engine replicas.

The agent scheduler keeps its policy (fifo, rr, priority, fair, sjf) and
decides which calls run, up to the kernel's `max_running`; as with a remote
server it admits calls and does not pause them (a call running in another
process cannot be paused from here). The pool's router places each admitted
call, with the call's process as its session: a process's calls stick to
the replica that holds its context while that replica is not overloaded.
A call whose replica dies is re-run from its prompt on another one.

This module sits above the kernel's interface (it implements `Backend`);
the kernel never imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from llmos.engine import SamplingParams
from llmos.kernel.api import ChatResult
from llmos.kernel.backend import GenerationParams, OnSwitch, Prompt
from llmos.kernel.sched import AgentScheduler, LLMCall
from llmos.replicas.pool import ReplicaPool


class ReplicaBackend:
    """A `ReplicaPool` as the kernel's `Backend`: the agent scheduler admits, the router places."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        name = pool.model_name  # a file or directory is named by its stem, as the embedded engine's
        self.model = Path(name).stem if name.endswith(".gguf") or "/" in name else name
        self.tokenizer = pool.tokenizer
        self.context_window = pool.engine.max_model_len
        self.sched: AgentScheduler | None = None
        self._on_switch: OnSwitch | None = None
        self._admitted: dict[str, asyncio.Event] = {}

    def attach(self, sched: AgentScheduler, on_switch: OnSwitch) -> None:
        self.sched, self._on_switch = sched, on_switch

    def _attached(self) -> tuple[AgentScheduler, OnSwitch]:
        if self.sched is None or self._on_switch is None:
            raise RuntimeError("ReplicaBackend has no scheduler: the kernel attach()es one before any call")
        return self.sched, self._on_switch

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self.tokenizer.encode_chat(messages))

    async def complete(self, call: LLMCall, prompt: Prompt, params: GenerationParams,
                       on_tokens: Callable[[int], None], context: str | None = None) -> ChatResult:
        """Wait for the scheduler to admit the call, then run it where the router places it."""
        sched, _ = self._attached()
        ids: str | list[int]
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            ids = cast("str | list[int]", prompt)  # raw text, or token ids (prompt[0] is an int)
        else:
            ids = self.tokenizer.encode_chat(prompt)
        schema = dict(params.json_schema) if params.json_schema else None
        sp = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                            stop=params.stop or [], seed=params.seed, json_schema=schema,
                            ignore_eos=params.ignore_eos)
        event = self._admitted[call.call_id] = asyncio.Event()
        sched.submit(call)
        self._schedule()
        try:
            await event.wait()
            final = await self.pool.generate_final(ids, sp, call.call_id, call.priority,
                                                   session=context or f"pid:{call.pid}")
        finally:
            self._admitted.pop(call.call_id, None)
            sched.finish(call)
            self._schedule()
        o = final.outputs[0]
        on_tokens(len(o.token_ids))
        call.cached_tokens, call.output_ids = final.num_cached_tokens, list(o.token_ids)
        return ChatResult(o.text, o.finish_reason, len(final.prompt_token_ids), len(o.token_ids))

    def _schedule(self) -> None:
        sched, on_switch = self._attached()
        started, _ = sched.schedule(preemptive=False)
        for call in started:
            event = self._admitted.get(call.call_id)
            if event is not None:
                event.set()
                on_switch(call, True)

    async def run_in_scheduler(self, fn: Callable[[], Any]) -> Any:
        return fn()

    async def stats(self) -> dict[str, Any]:
        return await self.pool.stats()

    def close(self) -> None:
        self.pool.shutdown()
