"""A workload through an OpenAI-compatible server: the client every server row of the benches shares.

What is measured is the whole serving path a user meets: HTTP, the server's
queue and batching, and the engine. Every request of the workload is sent at
once to POST /v1/completions with its prompt as token ids, greedy, end of
sequence ignored, so every system gets exactly the same work. The throughput
counts the output tokens the workload requested, and a run is valid only if
each response reports exactly its requested completion tokens: a server that
stopped a request early fails the run instead of winning it.

`llmos serve` runs here in its own process on a fresh llmos home (so the
client does not share its interpreter), and its peak resident memory is read
from the kernel (/proc/PID/status VmHWM) before it stops.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from llmos.bench.peers import PeerResult
from llmos.bench.rss import peak_rss_bytes
from llmos.bench.workloads import BenchRequest, requested_output_tokens

Progress = Callable[[int], None]


class ServedRunError(RuntimeError):
    """A server refused a request or returned other than the tokens requested."""


async def _complete(http: httpx.AsyncClient, request: BenchRequest, progress: Progress | None) -> None:
    body = {"prompt": request.prompt_token_ids, "max_tokens": request.max_tokens, "temperature": 0,
            "ignore_eos": True}
    r = await http.post("/v1/completions", json=body)
    if r.status_code >= 400:
        raise ServedRunError(f"POST /v1/completions: HTTP {r.status_code}: {r.text[:300]}")
    got = r.json()["usage"]["completion_tokens"]
    if got != request.max_tokens:
        raise ServedRunError(f"asked for {request.max_tokens} tokens, the server returned {got} "
                             "(its context per request is too short for this workload?)")
    if progress:
        progress(got)


async def _run_all(url: str, requests: list[BenchRequest], key: str | None, progress: Progress | None,
                   timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(_complete(http, r, progress) for r in requests))


def run_served(name: str, url: str, requests: list[BenchRequest], key: str | None = None,
               progress: Progress | None = None, timeout_s: float = 1800) -> PeerResult:
    """Every request at once to /v1/completions; wall time from the first sent to the last answered."""
    t0 = time.perf_counter()
    asyncio.run(_run_all(url, requests, key, progress, timeout_s))
    wall = time.perf_counter() - t0
    requested = requested_output_tokens(requests)
    return PeerResult(name, requested, wall, requested / wall)


def run_llmos_served(model: str | Path, requests: list[BenchRequest], kv_budget_bytes: int,
                     progress: Progress | None = None, warmup: BenchRequest | None = None) -> PeerResult:
    """`llmos serve MODEL --kv-budget BYTES` in its own process on a fresh home; the workload through it."""
    from llmos.bench.service import _free_port, _Server

    with tempfile.TemporaryDirectory(prefix="llmos-bench-serve-") as home:
        argv = [sys.executable, "-m", "llmos.cli", "serve", "--model", str(model),
                "--port", str(_free_port()), "--kv-budget", str(kv_budget_bytes), "--log-level", "warning"]
        server = _Server(argv, Path(home))
        try:
            if warmup is not None:
                run_served("warm-up", server.url, [warmup], server.key)
            result = run_served("llmos serve", server.url, requests, server.key, progress)
            result.extra["peak_rss_bytes"] = peak_rss_bytes(server.proc.pid)
            result.extra["kv_budget_bytes"] = kv_budget_bytes
        finally:
            server.stop()
    return result
