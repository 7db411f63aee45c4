"""The running OS: what `llmos serve` boots once and every client then shares.

A `System` is one llmos home brought up as a service (cf. init bringing up a
machine's services): the model backend (the embedded engine, or any
OpenAI-compatible server), one kernel with its scheduling policy, the
reference monitor with the default grants, the hash-chained audit log,
virtual-context memory (memory.db) and the users with their keys, all on the
same home. Guarantees:

- one kernel per server: every agent the API runs is a process of
  `System.kernel`, so `llmos ps` and the scheduler see them all;
- one agent does one thing at a time: `System.turns` hands an agent's
  messages the agent in arrival order, and says how many wait (a message to
  a busy agent queues behind the current one instead of interleaving);
- the server says where it is: `publish` writes `server.json` (url, OS pid,
  a per-boot local key) into the home, readable only by the home's owner;
  `find_server` ignores a file whose process is gone (a crashed server), and
  a clean shutdown removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.kernel.table import os_pid_alive
from llmos.kernel.users import UserStore

SERVER_FILE = "server.json"


class AgentTurns:
    """Per-agent FIFO turns: one message at a time per agent, the rest wait in arrival order."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    def busy(self, agent_id: str) -> bool:
        lock = self._locks.get(agent_id)
        return lock is not None and lock.locked()

    def queued(self, agent_id: str) -> int:
        """Messages waiting for the agent (not counting the one it is on)."""
        return self._waiting.get(agent_id, 0)

    @contextlib.asynccontextmanager
    async def turn(self, agent_id: str) -> AsyncIterator[None]:
        """Hold the agent for one message; asyncio.Lock wakes waiters first come, first served."""
        lock = self._locks.setdefault(agent_id, asyncio.Lock())
        self._waiting[agent_id] = self._waiting.get(agent_id, 0) + 1
        try:
            await lock.acquire()
        finally:
            self._waiting[agent_id] -= 1
        try:
            yield
        finally:
            lock.release()
            if not self._waiting[agent_id] and not lock.locked():
                self._locks.pop(agent_id, None)
                self._waiting.pop(agent_id, None)


@dataclass
class System:
    """One booted llmos: backend, kernel, monitor, audit log and users on one home."""

    home: Path
    backend: Any  # a kernel Backend: the embedded engine or an OpenAI-compatible URL
    llm: Any  # the AsyncLLM of the embedded engine, or None for a remote backend
    kernel: Any  # llmos.kernel.Kernel
    monitor: Any
    audit: Any  # llmos.security.AuditLog
    users: UserStore
    model_name: str
    api_key: str | None = None  # `llmos serve --api-key`: its holder is the local admin
    local_key: str = field(default_factory=lambda: "llmos-local-" + secrets.token_urlsafe(32))
    turns: AgentTurns = field(default_factory=AgentTurns)
    operator_pid: int | None = None
    owns_backend: bool = True
    _closed: bool = False

    @property
    def server_file(self) -> Path:
        return self.home / SERVER_FILE

    def publish(self, url: str) -> None:
        """Write server.json (url, pid, local key), readable by the home's owner only."""
        body = json.dumps({"url": url, "pid": os.getpid(), "started": time.time(),
                           "local_key": self.local_key, "model": self.model_name})
        tmp = self.server_file.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.server_file)

    def unpublish(self) -> None:
        """Remove server.json if it is this process's."""
        info = read_server_file(self.home)
        if info is not None and info.get("pid") == os.getpid():
            self.server_file.unlink(missing_ok=True)

    async def start_operator(self, interval_s: float = 1.0) -> int:
        """Run the operator agent on this kernel (privileged syscalls granted, like `llmos run operator`),
        with the deterministic policy proposing its actions."""
        from llmos.agents.operator import agent as operator_agent
        from llmos.security import Capabilities

        caps = Capabilities.of([*self.kernel.default_capabilities(None).grants, *operator_agent.CAPABILITIES])
        self.operator_pid = await self.kernel.spawn(
            operator_agent.main, "operator", capabilities=caps,
            args={"duration_s": None, "interval_s": interval_s, "use_model": False})
        return self.operator_pid

    async def aclose(self) -> None:
        """End every agent, close the kernel (and the backend it owns), the audit log and users."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.kernel.shutdown(close_backend=self.owns_backend)
        finally:
            self.audit.close()
            self.users.close()
            self.unpublish()


def boot(
    home: Path | str | None = None,
    *,
    model: str = "smollm2-135m-instruct",
    llm: Any = None,
    pool: Any = None,
    backend: Any = None,
    backend_url: str | None = None,
    backend_api_key: str | None = None,
    backend_model: str | None = None,
    kv_budget: str = "0.9",
    policy: str = "fifo",
    max_running: int = 8,
    quantum: int = 16,
    grants: str | None = None,
    api_key: str | None = None,
) -> System:
    """Bring up the OS on `home` (default: the llmos home).

    The model comes from, in order: `pool` (a `ReplicaPool` of engine replicas: the API serves on it and
    the kernel's calls go to it; closed with the system), `backend` (any kernel Backend, e.g. a
    scripted one), `backend_url` (an OpenAI-compatible server), `llm` (an
    AsyncLLM already loaded; the caller keeps it), else the embedded engine
    loads `model`. `grants`: a capability policy file for agents (default:
    the ordinary grants). The kernel must then be used from one event loop
    (the server's).
    """
    from llmos.home import llmos_home
    from llmos.kernel import EngineBackend, Kernel, OpenAIBackend
    from llmos.security import AuditLog, ReferenceMonitor, default_capabilities, load_policy
    from llmos.tools import builtin_tools

    home = Path(home) if home is not None else llmos_home()
    home.mkdir(parents=True, exist_ok=True)
    owns_backend = True
    if pool is not None:
        from llmos.replicas import ReplicaBackend

        backend, engine_llm = ReplicaBackend(pool), pool
        model_name = backend.model
    elif backend is not None:
        model_name, engine_llm, owns_backend = getattr(backend, "model", None) or "scripted", None, False
    elif backend_url:
        backend = OpenAIBackend(backend_url, backend_api_key, backend_model)
        model_name, engine_llm = backend_model or "remote", None
    else:
        if llm is not None:
            owns_backend = False
        backend = EngineBackend(llm if llm is not None else model, kv_budget=kv_budget)
        engine_llm = backend.llm
        model_name = model if not model.endswith(".gguf") and "/" not in model else Path(model).stem
    tools = builtin_tools()
    audit = AuditLog(home / "audit.db")
    monitor = ReferenceMonitor(audit=audit, tools=tools)
    caps: Callable[[Path], Any] = ((lambda workdir: load_policy(grants, workdir, home)) if grants
                                   else default_capabilities)
    kernel = Kernel(backend, home=home, tools=tools, monitor=monitor, policy=policy, max_running=max_running,
                    quantum=quantum, default_capabilities=caps)
    return System(home=home, backend=backend, llm=engine_llm, kernel=kernel, monitor=monitor, audit=audit,
                  users=UserStore.of_home(home), model_name=model_name, api_key=api_key,
                  owns_backend=owns_backend)


def read_server_file(home: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(home) / SERVER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, PermissionError):
        return None


def find_server(home: Path | str) -> dict[str, Any] | None:
    """The running server of `home` ({"url", "pid", "local_key", ...}), or None (none, or a stale file)."""
    info = read_server_file(home)
    if info is None or not isinstance(info.get("pid"), int) or not os_pid_alive(info["pid"]):
        return None
    return info
