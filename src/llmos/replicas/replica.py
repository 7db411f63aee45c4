"""One engine replica: an `AsyncLLM` in a process of its own (a Ray actor the pool starts).

The replica is the embedded engine unchanged; it adds what its pool needs
across a process boundary: a description of itself (`info`), its metrics
with its latency histograms (`stats`), and, with a request's last output,
what the router learns from it (KV usage and capacity). It knows nothing of
other replicas or of routing. Ray is not imported here: the pool wraps this
class with `ray.remote` when a pool is asked for.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from llmos.engine import AsyncLLM, RequestOutput, SamplingParams

Report = dict[str, float]  # what a request's end tells the router: kv_usage, kv_blocks


class Replica:
    """The Ray actor's body: one engine on `num_threads` CPU threads (or the GPU Ray gave it)."""

    def __init__(self, index: int, model: str, engine_kwargs: dict[str, Any], num_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.index = index
        self.llm = AsyncLLM(model, **engine_kwargs)

    async def info(self) -> dict[str, Any]:
        engine = self.llm.engine
        return {"index": self.index, "pid": os.getpid(), "tokenizer": self.llm.tokenizer,
                "model_config": engine.model_config, "max_model_len": engine.max_model_len,
                "block_size": engine.config.block_size, "num_blocks": engine.blocks.num_blocks,
                "max_num_seqs": engine.config.max_num_seqs}

    async def generate(self, ids: list[int], params: SamplingParams | None, request_id: str,
                       priority: int) -> AsyncIterator[tuple[RequestOutput, Report | None]]:
        """The request's outputs as the engine yields them; the last comes with the replica's report."""
        async for out in self.llm.generate(ids, params, request_id, priority):
            yield out, (await self._report() if out.finished else None)

    async def _report(self) -> Report:
        bm = self.llm.engine.blocks
        used, capacity = await self.llm.call(lambda: (bm.num_used_blocks, bm.capacity))
        return {"kv_usage": used / capacity if capacity else 0.0, "kv_blocks": capacity}

    async def reset(self) -> None:
        """Start afresh with an empty prefix cache and zeroed counters (between benchmark runs)."""
        engine = self.llm.engine

        def reset() -> None:
            engine.blocks.reset_prefix_cache()
            engine.reset_metrics()

        await self.llm.call(reset)

    async def stats(self) -> dict[str, Any]:
        """The engine's metrics, with its pid and its latency histograms under "histograms"."""
        histograms = await self.llm.call(self.llm.engine.histograms.snapshot)
        return {**await self.llm.stats(), "pid": os.getpid(), "histograms": histograms}
