"""The asyncio face of the engine: streams tokens per request, aborts at once.

The engine steps in one background thread (torch releases the GIL while it
computes); requests and aborts reach it as commands run between two steps,
so engine state is only ever touched by that thread.

A `step_hook` (the agent scheduler above) runs on that thread before every
step with the outputs of the step before: it may pause and resume requests,
so its decisions and the engine's KV memory always agree.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmos.engine.config import EngineConfig
from llmos.engine.engine import LLMEngine, RequestFailedError
from llmos.engine.outputs import RequestOutput
from llmos.engine.sampling_params import SamplingParams
from llmos.models.loader import LoadedModel


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncLLM:
    def __init__(self, model: str | LoadedModel | LLMEngine = "smollm2-135m-instruct",
                 config: EngineConfig | None = None, **kwargs) -> None:
        self.engine = model if isinstance(model, LLMEngine) else LLMEngine(model, config, **kwargs)
        self.tokenizer = self.engine.tokenizer
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.step_hook: Callable[[LLMEngine, list[RequestOutput]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        paused: bool = False,
        on_added: Callable[[str], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last is finished.

        Leaving the iteration early (a client went away) aborts the request. A
        `paused` request waits for the step hook to resume it; `on_added` runs on
        the engine thread right after the request is queued.
        """
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()

        def add() -> str:
            rid = self.engine.add_request(prompt, params, request_id, priority, paused)
            self._streams[rid] = (loop, queue)
            if on_added is not None:
                on_added(rid)
            return rid

        try:
            await self.call(add)
        except asyncio.CancelledError:  # the caller left while the request was being queued:
            self._abort_soon(request_id)  # it is (or will be) queued, so abort it right after
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are free."""
        if self._stopped:
            return
        await self.call(lambda: self._drop(request_id))

    def _abort_soon(self, request_id: str) -> None:
        """Queue an abort without waiting for it (for callers being cancelled)."""
        with self._wake:
            self._commands.append(lambda: self._drop(request_id))
            self._wake.notify()

    def _drop(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    async def stats(self) -> dict[str, float]:
        return await self.call(self.engine.stats)

    @property
    def is_dead(self) -> bool:
        return self._stopped or not self._thread.is_alive()

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the engine thread ----------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between two steps and return its result."""
        if self.is_dead:
            raise EngineDeadError("the engine is shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as e:  # handed to the caller, not raised in the engine thread
                _post(loop, _settle, future, None, e)
            else:
                _post(loop, _settle, future, result, None)

        with self._wake:
            self._commands.append(command)
            self._wake.notify()
        return await future

    def _run(self) -> None:
        outputs: list[RequestOutput] = []
        while True:
            with self._wake:
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            try:
                if self.step_hook is not None:
                    self.step_hook(self.engine, outputs)
                outputs = []
                if not self.engine.has_pending_work():
                    with self._wake:
                        while not self._stopped and not self._commands:
                            self._wake.wait()
                    continue
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, never the process
                self._fail_all(e)
                continue
            for out in outputs:
                failed = next((c.stop_reason for c in out.outputs if c.finish_reason == "error"), None)
                if failed is not None:  # this request alone failed in the step
                    self._deliver(out.request_id, RequestFailedError(f"the request failed: {failed}"), True)
                else:
                    self._deliver(out.request_id, out, out.finished)
        self._fail_all(EngineDeadError("the engine shut down"))

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            _post(loop, queue.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, error, True)
        for request_id in list(self._streams):
            self._deliver(request_id, error, True)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand a result to the event loop that asked for it; if that loop has closed (its caller
    gave up and left), the result has no reader and is dropped: the engine thread goes on."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
