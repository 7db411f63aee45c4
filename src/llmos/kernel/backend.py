"""LLM backends: the kernel's one interface to a model, embedded or remote.

`EngineBackend` runs the agent scheduler on the engine's own thread before
every step, so a preempted call is paused inside the engine (KV blocks kept
or swapped) and resumed without recomputation; a call that names its
process's `context` leaves that context's KV retained when it ends, the
kernel's `RetentionPolicy` decides per tool call whether it stays pinned, is
swapped to host or released (`between_calls`), and the process's next call
reuses it. `OpenAIBackend` talks to any
OpenAI-compatible server through the official client; there the scheduler
only admits calls (a remote generation cannot be paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from llmos.kernel.api import ChatResult
from llmos.kernel.retention import Memory, RetentionDecision, RetentionPolicy
from llmos.kernel.sched import AgentScheduler, LLMCall

Prompt = str | list[dict[str, Any]] | list[int]  # raw text, chat messages, or token ids (embedded)
OnSwitch = Callable[[LLMCall, bool], None]  # a call started (True) or was paused (False)


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    stop: list[str] | None = None
    json_schema: Mapping[str, Any] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks: every configuration, the same work)


class Backend(Protocol):
    context_window: int

    def attach(self, sched: AgentScheduler, on_switch: OnSwitch) -> None: ...
    def count_tokens(self, messages: list[dict[str, Any]]) -> int: ...
    async def complete(self, call: LLMCall, prompt: Prompt, params: GenerationParams,
                       on_tokens: Callable[[int], None], context: str | None = None) -> ChatResult: ...
    async def run_in_scheduler(self, fn: Callable[[], Any]) -> Any: ...
    async def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class EngineBackend:
    """The embedded engine (an `AsyncLLM`, or a model name to build one)."""

    def __init__(self, llm: Any = "smollm2-135m-instruct", **engine_kwargs: Any) -> None:
        from llmos.engine import AsyncLLM

        self.llm = llm if isinstance(llm, AsyncLLM) else AsyncLLM(llm, **engine_kwargs)
        self.engine = self.llm.engine
        self.tokenizer = self.llm.tokenizer
        self.context_window = self.engine.max_model_len
        self.sched: AgentScheduler | None = None
        self._on_switch: OnSwitch | None = None
        self._calls: dict[str, LLMCall] = {}
        self.retention = RetentionPolicy()

    def attach(self, sched: AgentScheduler, on_switch: OnSwitch) -> None:
        self.sched, self._on_switch = sched, on_switch
        self.llm.step_hook = self._step_hook

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self.tokenizer.encode_chat(messages))

    async def complete(self, call: LLMCall, prompt: Prompt, params: GenerationParams,
                       on_tokens: Callable[[int], None], context: str | None = None) -> ChatResult:
        """Run one LLM call; with a `context` key, the KV it leaves is retained under that key
        and a call whose prompt extends it reuses it."""
        from llmos.engine import SamplingParams

        raw = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
        ids = prompt if raw else self.tokenizer.encode_chat(prompt)
        schema = dict(params.json_schema) if params.json_schema else None
        sp = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                            stop=params.stop or [], seed=params.seed, json_schema=schema,
                            ignore_eos=params.ignore_eos)

        def added(request_id: str) -> None:  # on the engine thread
            self._calls[request_id] = call
            if context is not None:
                retained = self.engine.scheduler.retained
                retained.claims[request_id] = retained.retain_on_finish[request_id] = context
            self.sched.submit(call)

        final = None
        stream = self.llm.generate(ids, sp, request_id=call.call_id, priority=call.priority,
                                   paused=True, on_added=added)
        async with contextlib.aclosing(stream):  # leaving early (a quota) aborts the request now
            async for out in stream:
                final = out
                on_tokens(len(out.outputs[0].token_ids))
        o = final.outputs[0]
        call.cached_tokens, call.output_ids = final.num_cached_tokens, list(o.token_ids)
        return ChatResult(o.text, o.finish_reason, len(final.prompt_token_ids), len(o.token_ids))

    def _step_hook(self, engine: Any, outputs: list[Any]) -> None:
        """On the engine thread: account progress, drop ended calls, apply the policy's choice."""
        sched = self.sched
        for out in outputs:
            call = self._calls.get(out.request_id)
            if call is not None:
                sched.progress(call, len(out.outputs[0].token_ids))
        for call in sched.calls():
            if call.call_id not in engine.requests:  # finished or aborted
                sched.finish(call)
                self._calls.pop(call.call_id, None)
        started, paused = sched.schedule()
        for call in paused:
            engine.pause_request(call.call_id)
            self._on_switch(call, False)
        for call in started:
            engine.resume_request(call.call_id)
            self._on_switch(call, True)

    async def between_calls(self, context: str, agent: str, tool: str) -> RetentionDecision | None:
        """The process's call ended and it runs `tool`: keep, swap or release its context's KV,
        whichever the retention policy finds cheapest now. None when nothing is retained."""

        def decide() -> RetentionDecision | None:
            retained, bm = self.engine.scheduler.retained, self.engine.blocks
            ctx = retained.contexts.get(context)
            if ctx is None or ctx.on_host:
                return None
            memory = Memory(bm.capacity, bm.num_used_blocks, retained.swap.num_free_blocks,
                            self.engine.metrics.prefill_s_per_token)
            d = self.retention.decide(agent, tool, len(ctx.blocks), ctx.num_tokens, memory)
            if d.action == "keep":
                retained.keep(context, d.ttl)
            elif d.action == "swap":
                retained.swap_out(context, d.ttl)
            else:
                retained.release(context)
            return d

        return await self.llm.call(decide)

    def tool_finished(self, agent: str, tool: str, seconds: float) -> None:
        """Teach the retention policy how long `tool` takes for `agent`."""
        self.retention.predictor.observe(agent, tool, seconds)

    async def forget(self, context: str) -> None:
        """The process ended: its retained context goes to the prefix cache."""
        await self.llm.call(lambda: self.engine.scheduler.retained.release(context))

    async def run_in_scheduler(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` where the scheduler lives (the engine thread), between two steps."""
        return await self.llm.call(fn)

    async def stats(self) -> dict[str, Any]:
        """The engine's metrics, and KV retention's: contexts and blocks held now, decisions so far."""

        def retention() -> dict[str, int]:
            retained = self.engine.scheduler.retained
            return {"kv_retained_contexts": len(retained.contexts),
                    "kv_retained_blocks": retained.device_blocks(),
                    **{f"kv_retention_{k}": v for k, v in retained.stats.as_dict().items()}}

        return {**await self.llm.stats(), **await self.llm.call(retention)}

    def set_kv_capacity(self, num_blocks: int) -> int:
        return self.engine.set_kv_capacity(num_blocks)

    def close(self) -> None:
        self.llm.shutdown()


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, llmos serve, a hosted API)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 context_window: int = 4096) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=1)
        self.model = model
        self.context_window = context_window
        self.sched: AgentScheduler | None = None
        self._on_switch: OnSwitch | None = None
        self._admitted: dict[str, asyncio.Event] = {}

    def attach(self, sched: AgentScheduler, on_switch: OnSwitch) -> None:
        self.sched, self._on_switch = sched, on_switch

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """An upper estimate (the server's tokenizer is not here): a token per 3 characters."""
        return sum(len(str(m.get("content") or "")) // 3 + 4 for m in messages) + 2

    async def _model(self) -> str:
        if self.model is None:
            models = await self.client.models.list()
            if not models.data:
                raise RuntimeError("the server lists no model; pass one explicitly")
            self.model = models.data[0].id
        return self.model

    async def complete(self, call: LLMCall, prompt: Prompt, params: GenerationParams,
                       on_tokens: Callable[[int], None], context: str | None = None) -> ChatResult:
        """`context` is accepted and ignored: a remote server's KV is not ours to retain."""
        model = await self._model()
        event = self._admitted[call.call_id] = asyncio.Event()
        self.sched.submit(call)
        self._schedule()
        try:
            await event.wait()
            return await self._request(model, prompt, params, on_tokens)
        finally:
            self._admitted.pop(call.call_id, None)
            self.sched.finish(call)
            self._schedule()

    async def _request(self, model: str, prompt: Prompt, params: GenerationParams,
                       on_tokens: Callable[[int], None]) -> ChatResult:
        kwargs: dict[str, Any] = {"model": model, "max_tokens": params.max_tokens,
                                  "temperature": params.temperature, "stop": params.stop or None,
                                  "seed": params.seed}
        if isinstance(prompt, str):
            r = await self.client.completions.create(prompt=prompt, **kwargs)
            choice, text = r.choices[0], r.choices[0].text
        else:
            if params.json_schema:
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": dict(params.json_schema)}}
            r = await self.client.chat.completions.create(messages=prompt, **kwargs)
            choice, text = r.choices[0], r.choices[0].message.content or ""
        usage = r.usage
        completion = usage.completion_tokens if usage else len(text) // 3
        on_tokens(completion)
        return ChatResult(text, choice.finish_reason, usage.prompt_tokens if usage else 0, completion)

    def _schedule(self) -> None:
        started, _ = self.sched.schedule(preemptive=False)
        for call in started:
            event = self._admitted.get(call.call_id)
            if event is not None:
                event.set()
                self._on_switch(call, True)

    async def run_in_scheduler(self, fn: Callable[[], Any]) -> Any:
        return fn()

    async def stats(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model}

    def close(self) -> None:
        pass


def new_call_id() -> str:
    return uuid.uuid4().hex
