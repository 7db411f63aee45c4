"""The live dashboard: the running OS drawn from its own state (cf. a system monitor reading /proc).

`GET /dashboard` serves a static page (HTML, one script, one stylesheet, no
build step); the page reads `GET /v1/dashboard/events`, a server-sent event
stream with one snapshot every `interval` seconds, or `GET
/v1/dashboard/snapshot` for one. A snapshot holds the KV block map (one cell
per device block: free, used, shared, cached prefix; host swap blocks beside
it), the engine's waiting / running / swapped / paused queues, the kernel's
processes and scheduler, the audit log's tail and chain status, and tok/s and
TTFT. Guarantees:

- every figure is read from live state: the engine's block manager and
  scheduler are read on the engine thread between two steps (`AsyncLLM.call`),
  never concurrently with a step, so a snapshot is one consistent instant;
- the page is open (it holds no data); every snapshot is behind the API's
  authentication, and a user sees only their own processes, their own audit
  rows and the names of their own requests in the block map (other users'
  blocks show as "other": their state, never whose they are); an admin sees
  all, and only an admin gets the audit chain verified.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
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
_TTFT_WINDOW = 50  # TTFT shown: the median of the latest requests

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
    """Takes successive snapshots for one viewer; keeps what rates are computed from."""

    def __init__(self, app: Any, user: User) -> None:
        self.system: Any = getattr(app.state, "system", None)
        self.llm: Any = getattr(app.state, "dashboard_llm", None)
        self.user = user
        self._last: tuple[float, int] | None = None  # (time, generation tokens) of the last snapshot
        self._verdict: dict[str, Any] | None = None
        self._verified_at = 0.0

    async def take(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {"t": now, "user": {"id": self.user.id, "admin": self.user.admin}}
        calls = self._calls()
        if self.llm is not None and not self.llm.is_dead:
            out["engine"] = await self.llm.call(lambda: _engine_view(self.llm.engine, calls))
            out["engine"]["tok_s"] = self._rate(now, out["engine"]["stats"]["generation_tokens"])
        if self.system is not None:
            out["processes"], visible = self._processes()
            out["kernel"] = await self._kernel()
            out["audit"] = await self._audit()
        else:
            visible = set()
        if "engine" in out:
            _name_holders(out["engine"], out.get("processes", []), visible, self.user)
        return out

    def _calls(self) -> dict[str, Any] | None:
        backend = getattr(self.system, "backend", None)
        return getattr(backend, "_calls", None)  # request id -> the kernel's LLMCall (pid)

    def _rate(self, now: float, tokens: int) -> float:
        last, self._last = self._last, (now, tokens)
        if last is None or now <= last[0]:
            return 0.0
        return max(0, tokens - last[1]) / (now - last[0])

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
            rows = await run_in_threadpool(system.audit.tail, 20)
            if time.monotonic() - self._verified_at > _VERIFY_EVERY_S:
                v = await run_in_threadpool(system.audit.verify)
                self._verdict = {"ok": v.ok, "status": v.status, "rows": v.rows, "message": v.message}
                self._verified_at = time.monotonic()
            chain = self._verdict
        else:
            names = await run_in_threadpool(system.kernel.table.names_only_of, user.id)
            rows = await run_in_threadpool(system.audit.tail, 20, names)
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
            "ttft_recent_s": list(engine.metrics.ttft)[-_TTFT_WINDOW:]}


def _name_holders(view: dict[str, Any], processes: list[dict[str, Any]], visible: set[int],
                  user: User) -> None:
    """Label each holder with its agent, or "other" where the viewer may not see whose it is."""
    names = {p["pid"]: p["name"] for p in processes}
    for h in view["holders"]:
        if h["pid"] is not None and h["pid"] in visible:
            h["label"] = f"{names[h['pid']]} (pid {h['pid']})"
        elif user.admin:
            h["label"] = f"pid {h['pid']}" if h["pid"] is not None else h["request_id"]
        else:
            h["label"], h["request_id"], h["pid"] = OTHER, None, None


def install(app: Any, llm: Any = None) -> None:
    """Mount the dashboard on `app`; `llm` is the AsyncLLM whose engine it shows (None: no block map)."""
    app.state.dashboard_llm = llm
    app.include_router(router)
