"""A pool of engine replicas on Ray, shaped like one `AsyncLLM` (scale-out behind one API).

`ReplicaPool` starts N replicas (replica.py) as Ray actors, each with its
own CPU share or GPU, and serves requests with `AsyncLLM`'s interface
(`generate`, leaving which aborts, `stats`, `call`, `tokenizer`, `engine.max_model_len`),
so the OpenAI routes and the kernel's backend run on it unchanged. The
router (router.py) places each request.

Failover: a replica whose actor dies (killed, crashed, its node gone) is
noticed on the first request that touches it (Ray raises `RayActorError`):
the router stops sending it work and forgets its cache, and the pool waits
for Ray to restart it (or starts a new actor if Ray will not) before
routing to it again. Guarantees: no request is lost silently —

- a request that has yielded nothing yet is re-run from its prompt on
  another replica;
- `generate_final` (a whole answer, as non-streamed API requests and the
  kernel's calls use) re-runs from its prompt however far it had got;
- a stream that has already yielded output ends with `ReplicaLostError`
  (re-running it would repeat text its reader has seen);
- with no replica left to try, `EngineDeadError` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmos.engine import RequestOutput, SamplingParams
from llmos.engine.async_engine import EngineDeadError
from llmos.engine.block_manager import prefix_hashes
from llmos.engine.histograms import Histogram
from llmos.replicas import metrics
from llmos.replicas.replica import Replica
from llmos.replicas.router import NoReplicaError, Router

logger = logging.getLogger("llmos.replicas")

_SUMMED = ("num_running", "num_waiting", "num_swapped", "num_paused", "kv_blocks_total", "kv_blocks_capacity",
           "kv_blocks_used", "kv_blocks_free", "prefix_cache_queries", "prefix_cache_hits", "preemptions",
           "prompt_tokens", "generation_tokens", "requests_finished", "steps", "generation_tok_per_s")
_WORST = ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s")


class ReplicaLostError(EngineDeadError):
    """The replica serving a stream died after the stream had sent output; it was not re-run."""


class _Lost(Exception):
    """Internal: the replica of an attempt died (the caller decides whether to re-run)."""


@dataclass
class PoolEngine:
    """What the API reads off `llm.engine`, for the pool: the model's limits and merged histograms."""

    max_model_len: int
    model_config: Any
    block_size: int
    histograms: _MergedHistograms


class _MergedHistograms:
    def __init__(self) -> None:
        self.merged: dict[str, Histogram] = {}

    def snapshot(self) -> dict[str, Histogram]:
        return {k: h.copy() for k, h in self.merged.items()}


class ReplicaPool:
    """N engine replicas as Ray actors behind `AsyncLLM`'s interface."""

    def __init__(self, model: str = "smollm2-135m-instruct", num_replicas: int = 2, *, router: str = "prefix",
                 ray_address: str | None = None, cpus_per_replica: float | None = None,
                 gpus_per_replica: float | None = None, max_imbalance: int = 4,
                 **engine_kwargs: Any) -> None:
        import ray
        import torch

        self.model_name = model
        self.router = Router(num_replicas, router, max_imbalance)  # checks the policy before Ray starts
        gpus = gpus_per_replica if gpus_per_replica is not None else (1 if torch.cuda.is_available() else 0)
        cpus = cpus_per_replica or max(1, (os.cpu_count() or 1) // num_replicas)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if ray_address:
                ray.init(address=ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, int(cpus * num_replicas)), num_gpus=torch.cuda.device_count(),
                         include_dashboard=False, log_to_driver=False)
        self._actor_class = ray.remote(Replica).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0, max_concurrency=10_000)
        self._spawn_args = (model, dict(engine_kwargs), max(1, int(cpus)))
        self.actors = [self._spawn(i) for i in range(num_replicas)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.pids = [info["pid"] for info in infos]
        first = infos[0]
        self.tokenizer = first["tokenizer"]
        self.block_size = first["block_size"]
        self.engine = PoolEngine(first["max_model_len"], first["model_config"], self.block_size,
                                 _MergedHistograms())
        for i, info in enumerate(infos):
            self.router.finished(i, 0.0, info["num_blocks"])  # capacity known before the first request
        self.restarts = [0] * num_replicas  # times each replica came back after dying
        self.served = [0] * num_replicas  # requests each replica finished for this pool
        self.replica_stats: list[dict[str, Any] | None] = [None] * num_replicas  # last polled
        self._recovering: dict[int, asyncio.Task] = {}
        self._closed = False

    def _spawn(self, i: int) -> Any:
        return self._actor_class.remote(i, *self._spawn_args)

    @property
    def num_replicas(self) -> int:
        return len(self.actors)

    @property
    def is_dead(self) -> bool:
        return self._closed or not any(r.up for r in self.router.replicas)

    # -- requests -------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       session: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs from the replica the router picks (as `AsyncLLM.generate`).

        `session` (an agent, a conversation) keeps a caller's requests together. Leaving early aborts.
        """
        ids, hashes, request_id = self._prepare(prompt, request_id)
        tried: list[int] = []
        while True:
            i = self._choose(hashes, session, tried)
            sent = 0
            stream = self._attempt(i, ids, params, request_id, priority, hashes, session)
            try:
                async for out in stream:
                    sent += 1
                    yield out
                return
            except _Lost:
                if sent:
                    raise ReplicaLostError(
                        f"engine replica {i} died after this stream had sent output; the request was not "
                        "re-run (it would repeat text): send it again") from None
                tried.append(i)
            finally:
                await stream.aclose()

    async def generate_final(self, prompt: str | list[int], params: SamplingParams | None = None,
                             request_id: str | None = None, priority: int = 0,
                             session: str | None = None) -> RequestOutput:
        """A request's last output; re-run from its prompt on another replica if its replica dies."""
        ids, hashes, request_id = self._prepare(prompt, request_id)
        tried: list[int] = []
        while True:
            i = self._choose(hashes, session, tried)
            last: RequestOutput | None = None
            try:
                async with contextlib.aclosing(self._attempt(i, ids, params, request_id, priority, hashes,
                                                             session)) as stream:
                    async for out in stream:
                        last = out
            except _Lost:
                logger.warning("request %s: replica %d died; re-running it from its prompt", request_id, i)
                tried.append(i)
                continue
            if last is None:
                raise RuntimeError(f"request {request_id}: engine replica {i} ended it without any output")
            return last

    def _prepare(self, prompt: str | list[int], request_id: str | None) -> tuple[list[int], list[int], str]:
        if self._closed:
            raise EngineDeadError("the replica pool is shut down")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return ids, prefix_hashes(ids, self.block_size), request_id or uuid.uuid4().hex

    def _choose(self, hashes: list[int], session: str | None, tried: list[int]) -> int:
        try:
            return self.router.choose(hashes, session, exclude=tried)
        except NoReplicaError:
            what = "replica it was tried on died" if tried else "replica is up"
            raise EngineDeadError(f"no engine replica can serve the request: every {what}") from None

    async def _attempt(self, i: int, ids: list[int], params: SamplingParams | None, request_id: str,
                       priority: int, hashes: list[int], session: str | None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """One try on replica i; raises `_Lost` if the replica dies, the request's own error otherwise."""
        from ray.exceptions import RayActorError, RayTaskError

        self.router.routed(i, hashes, session)
        actor = self.actors[i]
        refs = actor.generate.remote(ids, params, request_id, priority)
        finished = lost = False
        report: dict[str, float] = {}
        try:
            async for ref in refs:
                out, done = await ref
                finished, report = out.finished, done or report
                yield out
        except RayActorError as e:
            lost = True
            self._lost(i, e)
            raise _Lost() from e
        except RayTaskError as e:  # the request failed inside the replica: its own error, unwrapped
            raise e.cause if isinstance(e.cause, Exception) else e from None
        finally:
            if not lost:
                self.router.finished(i, report.get("kv_usage"),
                                     int(report["kv_blocks"]) if "kv_blocks" in report else None)
                if finished:
                    self.served[i] += 1
                else:  # the caller left or the request failed: cancelling aborts it there, freeing its KV
                    _cancel(refs)

    # -- failover -------------------------------------------------------------

    def _lost(self, i: int, error: BaseException) -> None:
        if not self.router.replicas[i].up:
            return
        logger.warning("engine replica %d died (%s); routing around it until it is back", i,
                       type(error).__name__)
        self.router.lost(i)
        if i not in self._recovering and not self._closed:
            self._recovering[i] = asyncio.get_running_loop().create_task(self._recover(i))

    async def _recover(self, i: int) -> None:
        """Wait for Ray to restart replica i (or start a new actor when Ray will not), then route to it."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        try:
            while not self._closed:
                try:
                    info = await self.actors[i].info.remote()
                except ActorUnavailableError:  # being restarted
                    await asyncio.sleep(0.2)
                    continue
                except (ActorDiedError, RayActorError):  # for good: start another in its place
                    self.actors[i] = self._spawn(i)
                    continue
                self.pids[i] = info["pid"]
                self.restarts[i] += 1
                self.router.finished(i, 0.0, info["num_blocks"])
                self.router.restored(i)
                logger.warning("engine replica %d is back (pid %d)", i, info["pid"])
                return
        finally:
            self._recovering.pop(i, None)

    async def wait_up(self, timeout: float = 300.0) -> None:
        """Return once no replica is being recovered."""
        async with asyncio.timeout(timeout):
            while self._recovering:
                await asyncio.gather(*list(self._recovering.values()), return_exceptions=True)

    async def reset(self, router: str | None = None) -> None:
        """Empty every replica's prefix cache and counters, and start a fresh router (under `router`, or
        the same policy): runs that follow start equal. Call it with no request in flight."""
        infos = await asyncio.gather(*(a.info.remote() for a in self.actors))
        await asyncio.gather(*(a.reset.remote() for a in self.actors))
        self.router = Router(self.num_replicas, router or self.router.policy, self.router.max_imbalance)
        for i, info in enumerate(infos):
            self.router.finished(i, 0.0, info["num_blocks"])
        self.served = [0] * self.num_replicas

    # -- metrics --------------------------------------------------------------

    async def refresh(self) -> list[dict[str, Any] | None]:
        """Poll every replica's metrics (None for one that is down)."""
        from ray.exceptions import RayActorError

        async def poll(i: int) -> dict[str, Any] | None:
            if not self.router.replicas[i].up:
                return None
            try:
                return await asyncio.wait_for(self.actors[i].stats.remote(), timeout=10)
            except (RayActorError, TimeoutError) as e:
                self._lost(i, e)
                return None

        self.replica_stats = list(await asyncio.gather(*(poll(i) for i in range(self.num_replicas))))
        merged: dict[str, Histogram] = {}
        for s in self.replica_stats:
            for key, h in (s or {}).get("histograms", {}).items():
                into = merged.setdefault(key, Histogram(h.bounds))
                into.counts = [a + b for a, b in zip(into.counts, h.counts, strict=True)]
                into.total += h.total
                into.count += h.count
        self.engine.histograms.merged = merged
        return self.replica_stats

    async def stats(self) -> dict[str, Any]:
        """The pool's metrics: counters and queues summed over replicas, latency percentiles of the
        slowest replica, and each replica's own under "replicas"."""
        polled = await self.refresh()
        up = [s for s in polled if s is not None]
        out: dict[str, Any] = {k: sum(s.get(k, 0) for s in up) for k in _SUMMED}
        out.update({k: max((s.get(k, 0.0) for s in up), default=0.0) for k in _WORST})
        out["kv_usage"] = out["kv_blocks_used"] / out["kv_blocks_total"] if out["kv_blocks_total"] else 0.0
        queries = out["prefix_cache_queries"]
        out["prefix_cache_hit_rate"] = out["prefix_cache_hits"] / queries if queries else 0.0
        out["replicas"] = [self._replica_view(i, s) for i, s in enumerate(polled)]
        out["router"] = self.router.policy
        return out

    def _replica_view(self, i: int, s: dict[str, Any] | None) -> dict[str, Any]:
        r = self.router.replicas[i]
        view = {"replica": i, "up": int(r.up), "pid": self.pids[i], "in_flight": r.in_flight,
                "routed": r.routed, "served": self.served[i], "restarts": self.restarts[i],
                "cached_blocks_known": len(r.blocks)}
        if s is not None:
            view.update({k: v for k, v in s.items() if k not in ("histograms", "pid")})
        return view

    def replica_metrics(self) -> bytes:
        """Each replica's metrics as of the last `refresh`, in Prometheus' text format."""
        return metrics.render([self._replica_view(i, s) for i, s in enumerate(self.replica_stats)])

    async def call(self, fn: Callable[[], Any]) -> Any:
        """`AsyncLLM.call` for the pool: `fn` runs here, on metrics refreshed from every replica."""
        await self.refresh()
        return fn()

    def shutdown(self) -> None:
        """Stop every replica (and the local Ray this pool started)."""
        import ray

        if self._closed:
            return
        self._closed = True
        for task in self._recovering.values():
            task.cancel()
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if self._owns_ray:
            ray.shutdown()


def _cancel(refs: Any) -> None:
    import ray

    with contextlib.suppress(Exception):  # it may have ended meanwhile
        ray.cancel(refs)
