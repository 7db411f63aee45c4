"""A real llmos server (System + create_app + uvicorn) whose model is scripted, for agents-API tests.

The scripted model answers every step in order from a list of function calls and then says "ok"
with send_message; `delay` seconds per call make runs take time (queueing, cancel). The server also
has `slow_tool`: it appends "SHOULD VANISH" to the caller's `human` block and then sleeps, so a test
can kill the server in the middle of a step that has already written. Run as a program it serves
one llmos home on a port: `python -m tests.server.scripted_server HOME PORT [CALL_JSON ...]`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import uvicorn
from letta_client import Letta

from llmos.kernel import ChatResult
from llmos.memory import CoreMemory, open_store
from llmos.security.capabilities import Capabilities, Grant, default_capabilities
from llmos.server import create_app
from llmos.server.system import System, boot
from llmos.tools.base import Tool
from tests.server.conftest import _free_port
from tests.stub_backend import StubBackend

SLOW_TOOL_S = 600.0


def say(message: str) -> dict[str, Any]:
    return {"function": "send_message", "arguments": {"message": message, "request_heartbeat": False}}


class ScriptedBackend(StubBackend):
    """Replays `calls` (one per step, across runs), then answers every step with send_message."""

    model = "scripted"

    def __init__(self, calls: list[dict[str, Any]] | None = None, delay: float = 0.0) -> None:
        self.calls = list(calls or [])
        self.delay = delay
        self.steps = 0
        self.offered: list[list[str]] = []  # the functions each step's grammar allowed

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(len(m.get("content") or "") for m in messages) // 4

    async def complete(self, call, prompt, params, on_tokens) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        if params.json_schema is None:  # the summarizer
            return ChatResult("summary", "stop", 10, 1)
        self.steps += 1
        self.offered.append([c["properties"]["function"]["const"] for c in params.json_schema["anyOf"]])
        out = self.calls.pop(0) if self.calls else say(f"ok {self.steps}")
        return ChatResult(json.dumps(out), "stop", self.count_tokens(prompt), 10)


def _slow(args: dict[str, Any], ctx) -> str:
    CoreMemory(open_store(ctx.home), ctx.agent).append("human", "SHOULD VANISH")
    time.sleep(SLOW_TOOL_S)
    return "done"


def scripted_system(home, calls: list[dict[str, Any]] | None = None, delay: float = 0.0) -> System:
    system = boot(home, backend=ScriptedBackend(calls, delay))
    params = {"type": "object", "properties": {"request_heartbeat": {"type": "boolean"}}, "required": [],
              "additionalProperties": False}
    system.kernel.tools.register(Tool("slow_tool", "Writes to core memory, then takes a long time.", params,
                                      _slow))
    system.kernel.default_capabilities = lambda workdir: Capabilities.of(
        [*default_capabilities(workdir).grants, Grant(tool="slow_tool")])
    return system


def serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """`app` served on a free port of 127.0.0.1 in a thread."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    home, port, *script = sys.argv[1:]
    app = create_app(system=scripted_system(home, [json.loads(c) for c in script]))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


def client(scripted: dict[str, Any], user: str) -> Letta:
    """The official letta-client for `user` of a server from a `scripted` fixture."""
    return Letta(base_url=scripted["url"], api_key=scripted["keys"][user], max_retries=0)


def wait_run(c: Letta, run_id: str, timeout: float = 30) -> Any:
    """An async run once it has ended (completed, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        run = c.runs.retrieve(run_id)
        if run.status in ("completed", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.05)
