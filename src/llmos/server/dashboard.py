"""The live dashboard: the running OS drawn from its own state (cf. a system monitor reading /proc).

`GET /dashboard` serves a static page (HTML, one script, one stylesheet, no
build step); the page reads `GET /v1/dashboard/events`, a server-sent event
stream with one snapshot every `interval` seconds, or `GET
/v1/dashboard/snapshot` for one. A snapshot holds the KV block map (one cell
per device block: free, used, shared, cached prefix; host swap blocks beside
it), the engine's waiting / running / swapped / paused queues, the kernel's
processes and scheduler, each API agent's main context (occupancy against its
window, core memory, queue, summary, evictions and recall hits), the audit
log's tail and chain status, tok/s, TTFT and queue time over time (a ring
buffer of samples kept per server), and the operator's findings and actions.
Guarantees:

- every figure is read from live state: the engine's block manager and
  scheduler are read on the engine thread between two steps (`AsyncLLM.call`),
  never concurrently with a step, so a snapshot is one consistent instant; a
  main context is read without writing anything (`MainContext.view`);
- the page is open (it holds no data); every snapshot is behind the API's
  authentication, and a user sees only their own processes, agents' contexts,
  audit rows and the names of their own requests in the block map (an
  OpenAI-API request is named by the user who sent it; other users' blocks
  show as "other": their state, never whose they are); an admin sees all, and
  only an admin gets the audit chain verified and the operator's log.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from llmos.kernel.users import User
from llmos.server.auth import CurrentUser

STATIC = Path(__file__).parent / "static"
PAGE_PATHS = frozenset({"/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"})
FREE, USED, SHARED, CACHED, OFF = "f", "u", "s", "c", "x"  # block-map cell states
OTHER = "other"  # the holder of a block the viewer may not name
_VERIFY_EVERY_S = 2.0  # the audit chain is re-verified at most this often per stream
AUDIT_ROWS = 60  # the audit log's latest rows shown (the page folds runs of routine ones)
SAMPLES = 240  # the time series keep this many samples...
SAMPLE_EVERY_S = 0.5  # ...taken at most this often (by whichever viewer asks first): two minutes
SUMMARY_CHARS = 400  # a context's recursive summary, cut to this many characters
BLOCK_CHARS = 160  # a core memory block's value, cut likewise
OPERATOR_LINES = 30  # the operator's latest log lines shown
_TOKEN_CACHE = 64  # token counts of assembled contexts remembered per viewer

router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text())


@router.get("/dashboard/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if f"/dashboard/{name}" not in PAGE_PATHS:
        raise HTTPException(404)
    kind = "text/javascript" if name.endswith(".js") else "text/css"
    return FileResponse(STATIC / name, media_type=kind)


@router.get("/v1/dashboard/snapshot")
async def snapshot(request: Request, user: CurrentUser) -> dict[str, Any]:
    """One snapshot of the running OS as `user` may see it."""
    return await Snapshotter(request.app, user).take()


@router.get("/v1/dashboard/events")
async def events(request: Request, user: CurrentUser, interval: float = 0.5) -> StreamingResponse:
    """A snapshot every `interval` seconds (0.1 to 10) as server-sent events, until the client leaves."""
    interval = min(max(interval, 0.1), 10.0)
    shooter = Snapshotter(request.app, user)

    async def stream() -> AsyncIterator[str]:
        while not await request.is_disconnected():
            yield f"data: {json.dumps(await shooter.take())}\n\n"
            await asyncio.sleep(interval)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Snapshotter:
    """Takes successive snapshots for one viewer; keeps the audit chain's last verdict and the token
    counts of the contexts it drew between them (the rates are the server's, in `Throughput`)."""

    def __init__(self, app: Any, user: User) -> None:
        self.app = app
        self.system: Any = getattr(app.state, "system", None)
        self.llm: Any = getattr(app.state, "dashboard_llm", None)
        self.user = user
        self._verdict: dict[str, Any] | None = None
        self._verified_at = 0.0
        backend = getattr(self.system, "backend", None)
        self._count = _TokenCounts(backend.count_tokens) if backend is not None else None

    async def take(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {"t": now, "user": {"id": self.user.id, "admin": self.user.admin}}
        calls = self._calls()
        if self.llm is not None and not self.llm.is_dead:
            out["engine"] = await self.llm.call(lambda: _engine_view(self.llm.engine, calls))
            series = self.app.state.dashboard_series
            series.sample(now, out["engine"]["stats"], out["engine"].pop("histograms"))
            out["series"] = series.as_dict()
            out["engine"]["tok_s"] = series.tok_s[-1] if series.tok_s else 0.0
        pool = self.app.state.dashboard_pool
        if pool is not None:  # engine replicas: each one's queues, KV and routing counters
            keep = ("replica", "up", "pid", "in_flight", "num_running", "num_waiting", "kv_blocks_used",
                    "kv_blocks_total", "routed", "served", "restarts", "prefix_cache_hits",
                    "prefix_cache_queries")
            stats = await pool.stats()
            out["replicas"] = {"router": stats["router"],
                               "replicas": [{k: r.get(k) for k in keep} for r in stats["replicas"]]}
        if self.system is not None:
            out["processes"], visible = self._processes()
            out["kernel"] = await self._kernel()
            out["contexts"] = self._contexts()
            out["audit"] = await self._audit()
            out["operator"] = self._operator()
        else:
            visible = set()
        if "engine" in out:
            agents = {c["agent_id"]: c["name"] for c in out.get("contexts", [])}  # API agents: their names
            names = {p["pid"]: agents.get(p["name"], p["name"]) for p in out.get("processes", [])}
            _name_holders(out["engine"], names, visible, self.user, self.app.state.dashboard_owners)
        return out

    def _calls(self) -> dict[str, Any] | None:
        backend = getattr(self.system, "backend", None)
        return getattr(backend, "_calls", None)  # request id -> the kernel's LLMCall (pid)

    def _contexts(self) -> list[dict[str, Any]]:
        """The main contexts of the API agents that ran last (the viewer's own), newest first."""
        runtime = getattr(self.app.state, "agent_runtime", None)
        if runtime is None or self._count is None:
            return []
        pids = {a.run.agent_id: a.pid for a in list(runtime.active.values()) if a.pid is not None}
        rows = []
        for agent_id, context in reversed(list(runtime.recent.items())):
            agent = runtime.store.get(agent_id)
            if agent is None or not self.user.can_see(agent.owner) or context.store.agent(agent_id) is None:
                continue  # deleted, or not the viewer's
            view = context.view(self._count)
            view["summary"] = _cut(view["summary"], SUMMARY_CHARS)
            for block in view["core"]:
                block["chars"], block["value"] = len(block["value"]), _cut(block["value"], BLOCK_CHARS)
            rows.append({"agent_id": agent_id, "name": agent.name, "owner": agent.owner,
                         "pid": pids.get(agent_id), **view})
        return rows

    def _operator(self) -> dict[str, Any] | None:
        """The operator's log (`llmos serve --operator`): its findings and what it did; admins only."""
        pid = getattr(self.system, "operator_pid", None)
        if pid is None or not self.user.admin or pid not in self.system.kernel.procs:
            return None
        proc = self.system.kernel.process(pid)
        lines = [_operator_line(text) for text in proc.output]
        return {"pid": pid, "state": proc.state.value, "events": len(lines),
                "findings": sum(e["step"] == "finding" for e in lines),
                "actions": sum(e["step"] == "acted" for e in lines), "log": lines[-OPERATOR_LINES:]}

    def _processes(self) -> tuple[list[dict[str, Any]], set[int]]:
        rows = [p.info() for p in self.system.kernel.ps() if p.alive and self.user.can_see(p.owner)]
        return rows, {r["pid"] for r in rows}

    async def _kernel(self) -> dict[str, Any]:
        kernel = self.system.kernel

        def sched_state() -> dict[str, Any]:
            s = kernel.sched
            return {"running_pids": [c.pid for c in s.running], "waiting_pids": [c.pid for c in s.waiting],
                    "preemptions": s.preemptions, "tick": s.tick}

        return {**kernel.settings(), **await kernel.backend.run_in_scheduler(sched_state)}

    async def _audit(self) -> dict[str, Any]:
        system, user = self.system, self.user
        if user.admin:
            rows = await run_in_threadpool(system.audit.tail, AUDIT_ROWS)
            if time.monotonic() - self._verified_at > _VERIFY_EVERY_S:
                v = await run_in_threadpool(system.audit.verify)
                self._verdict = {"ok": v.ok, "status": v.status, "rows": v.rows, "message": v.message}
                self._verified_at = time.monotonic()
            chain = self._verdict
        else:
            names = await run_in_threadpool(system.kernel.table.names_only_of, user.id)
            rows = await run_in_threadpool(system.audit.tail, AUDIT_ROWS, names)
            chain = {"ok": None, "status": "admin only", "rows": None,
                     "message": "verifying needs an admin key"}
        keep = ("id", "ts", "agent", "tool", "args_preview", "labels", "decision", "reason")
        return {"rows": [{k: r.get(k) for k in keep} for r in rows], "chain": chain}


def _engine_view(engine: Any, calls: dict[str, Any] | None) -> dict[str, Any]:
    """On the engine thread: the block map, the queues and the engine's statistics."""
    bm, sched = engine.blocks, engine.scheduler
    holders: list[dict[str, Any]] = []  # one per live sequence
    owner_of = [-1] * bm.num_blocks
    host_owner = [-1] * sched.swap.num_blocks
    queues: dict[str, list[int]] = {}
    for name in ("running", "waiting", "swapped", "paused"):
        queues[name] = []
        for seq in getattr(sched, name):
            call = calls.get(seq.request_id) if calls else None
            index = len(holders)
            holders.append({"request_id": seq.request_id, "pid": getattr(call, "pid", None),
                            "seq": seq.index, "tokens": len(seq), "computed": seq.num_computed_tokens,
                            "blocks": len(seq.block_table), "queue": name, "status": seq.status.value})
            queues[name].append(index)
            table = host_owner if seq.status.value == "swapped" else owner_of
            for block in seq.block_table:
                if table[block] == -1:
                    table[block] = index
    cached = set(bm._evictor)
    cells = []
    for block, refs in enumerate(bm.ref_counts):
        if refs > 1:
            cells.append(SHARED)
        elif refs == 1:
            cells.append(USED)
        elif block in cached:
            cells.append(CACHED)
        else:
            cells.append(FREE)
    off = bm.num_blocks - bm.capacity  # a runtime cap: that many free blocks may not be handed out
    for block in range(bm.num_blocks - 1, -1, -1):
        if off <= 0:
            break
        if cells[block] == FREE:
            cells[block], off = OFF, off - 1
    return {"block_size": bm.block_size, "num_blocks": bm.num_blocks, "capacity": bm.capacity,
            "cells": "".join(cells), "owner": owner_of, "refs": list(bm.ref_counts),
            "host_blocks": sched.swap.num_blocks, "host_owner": host_owner,
            "holders": holders, "queues": queues, "stats": engine.stats(),
            "histograms": engine.histograms.snapshot()}


def _name_holders(view: dict[str, Any], names: dict[int, str], visible: set[int], user: User,
                  owners: RequestOwners) -> None:
    """Label each holder with its agent (`names`: pid -> name), or the user of its API request, or
    "other" where the viewer may not see whose it is."""
    for h in view["holders"]:
        sender = owners.of(h["request_id"]) if h["pid"] is None else None
        if h["pid"] is not None and h["pid"] in visible:
            h["label"] = f"{names[h['pid']]} (pid {h['pid']})"
        elif sender is not None and user.can_see(sender.id):
            h["label"] = f"API: {sender.name}"
        elif user.admin:
            h["label"] = f"pid {h['pid']}" if h["pid"] is not None else h["request_id"]
        else:
            h["label"], h["request_id"], h["pid"] = OTHER, None, None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


_OPERATOR_STEPS = frozenset({"finding", "proposal", "refused", "queued", "dry_run", "acted", "failed",
                             "recovered", "unrecovered", "rolled_back"})


def _operator_line(text: str) -> dict[str, str]:
    """One line the operator printed ("STEP SUBJECT [ACTION] DETAIL", agents/operator/agent.py), the
    action (a dict's repr) shown as its kind and arguments."""
    step, _, rest = text.partition(" ")
    if step not in _OPERATOR_STEPS:
        return {"step": "", "subject": "", "action": "", "text": text}
    subject, _, rest = rest.partition(" ")
    action = ""
    end = rest.find("}") if rest.startswith("{") else -1
    while end >= 0:
        try:
            fields = ast.literal_eval(rest[:end + 1])
        except (ValueError, SyntaxError):
            end = rest.find("}", end + 1)
            continue
        if isinstance(fields, dict):
            args = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("kind", "reason"))
            action, rest = f"{fields.get('kind', '')} {args}".strip(), rest[end + 1:].strip()
        break
    return {"step": step, "subject": subject, "action": action, "text": rest}


class RequestOwners:
    """The user who sent each OpenAI-API request in flight (server/app.py adds and discards them), so
    the block map can name whose blocks those are. Bounded: a request whose stream never started is
    forgotten after `limit` newer ones."""

    def __init__(self, limit: int = 4096) -> None:
        self._owners: OrderedDict[str, User] = OrderedDict()
        self._limit = limit

    def add(self, request_id: str, user: User) -> None:
        self._owners[request_id] = user
        while len(self._owners) > self._limit:
            self._owners.popitem(last=False)

    def discard(self, request_id: str) -> None:
        self._owners.pop(request_id, None)

    def of(self, engine_request_id: str | None) -> User | None:
        """The sender of an engine request (the API request's id, "-PROMPT_INDEX" appended)."""
        if engine_request_id is None:
            return None
        return self._owners.get(engine_request_id.rpartition("-")[0])

    def __len__(self) -> int:
        return len(self._owners)


def owners_of(app: Any) -> RequestOwners:
    return app.state.dashboard_owners


class Throughput:
    """A ring buffer of the engine's rates over time: tok/s, and the mean TTFT and queue time (time from
    arrival to the first step) of the requests that reached that point since the previous sample
    (None where none did); each is a difference of the engine's own counters and histograms."""

    def __init__(self, size: int = SAMPLES, every_s: float = SAMPLE_EVERY_S) -> None:
        self.every_s = every_s
        self.t: deque[float] = deque(maxlen=size)
        self.tok_s: deque[float] = deque(maxlen=size)
        self.ttft_s: deque[float | None] = deque(maxlen=size)
        self.queue_s: deque[float | None] = deque(maxlen=size)
        self._last: tuple[float, int, Any] | None = None  # time, generated tokens, histograms

    def sample(self, now: float, stats: dict[str, Any], histograms: dict[str, Any]) -> bool:
        """Add a sample unless the last is under `every_s` old; True when one was added."""
        tokens = int(stats["generation_tokens"])
        last = self._last
        if last is not None and now - last[0] < self.every_s:
            return False
        self._last = (now, tokens, histograms)
        if last is None:
            return False  # the first reading is the baseline
        self.t.append(now)
        self.tok_s.append(max(0, tokens - last[1]) / (now - last[0]))
        self.ttft_s.append(_mean_since(histograms["ttft"], last[2]["ttft"]))
        self.queue_s.append(_mean_since(histograms["queue"], last[2]["queue"]))
        return True

    def as_dict(self) -> dict[str, Any]:
        return {"t": list(self.t), "tok_s": list(self.tok_s), "ttft_s": list(self.ttft_s),
                "queue_s": list(self.queue_s), "every_s": self.every_s, "size": self.t.maxlen}


def _mean_since(now: Any, before: Any) -> float | None:
    n = now.count - before.count
    return (now.total - before.total) / n if n > 0 else None


class _TokenCounts:
    """The backend's token count of a message list, remembered (a context is mostly unchanged between
    two snapshots, and counting tokens means running the tokenizer)."""

    def __init__(self, count: Callable[[list[dict[str, Any]]], int]) -> None:
        self._count = count
        self._cache: OrderedDict[bytes, int] = OrderedDict()

    def __call__(self, messages: list[dict[str, Any]]) -> int:
        key = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=16).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        n = self._cache[key] = self._count(messages)
        if len(self._cache) > _TOKEN_CACHE:
            self._cache.popitem(last=False)
        return n


def install(app: Any, llm: Any = None, pool: Any = None) -> None:
    """Mount the dashboard on `app`; `llm` is the AsyncLLM whose engine it shows (None: no block map),
    `pool` a ReplicaPool whose replicas it lists instead."""
    app.state.dashboard_llm = llm
    app.state.dashboard_pool = pool
    app.state.dashboard_owners = RequestOwners()
    app.state.dashboard_series = Throughput()
    app.include_router(router)
