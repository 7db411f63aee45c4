"""KV retention across tool calls: an ended request's context kept for the call that extends it.

When an agent's LLM call ends and it goes off to run a tool, the KV of its
context is what its next call will need first. A request registered with a
context key (`retain_on_finish`) leaves its full, prefix-cached blocks pinned
under that key when it finishes, instead of dropping them to the prefix
cache's LRU. The kernel then decides, per call, what happens to them:

- `keep(key, ttl)`: stay pinned on the device until `ttl` seconds pass;
- `swap_out(key)`: copy to host blocks, device blocks go to the prefix cache;
- `release(key)`: go to the prefix cache's eviction order now.

A new request that names the same key (`claims`) gets them back: pinned
blocks are prefix-cache hits; swapped blocks whose device copy was evicted
are swapped in (registered in the prefix cache again) just before it is
admitted, so it recomputes only its new tokens. After its admission the pin
is dropped: the request's own block table holds the blocks.

Guarantees: memory pressure always wins, since `reclaim` gives up pinned
contexts (unclaimed ones first, soonest expiry first) before the scheduler
swaps or preempts any sequence: to host memory when it has room (copied in
the same step, before any block is written), else to the prefix cache; a context whose time-to-live
ends leaves the device the same way (and one on the host is then released),
unless a queued request already claims it (its wait in the queue is not the
tool's time); pinned and host blocks are counted by the allocators like any
others; host blocks a swap-in read are freed only after the step that reads
them.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.engine.block_manager import BlockManager, SwapSpace
from llmos.engine.sequence import Sequence, SequenceStatus

DEFAULT_TTL = 5.0  # seconds a captured context stays pinned before anyone decides
HOST_TTL = 60.0  # seconds a context stays on the host after its device time-to-live ended


@dataclass
class RetainedContext:
    key: str
    blocks: list[int]  # device blocks (pinned) or host blocks (swapped)
    block_keys: list[tuple[int, tuple[int, ...]]]  # prefix-cache key of each block
    hashes: list[int]
    on_host: bool = False
    expires: float = math.inf

    @property
    def num_tokens(self) -> int:
        return sum(len(k[1]) for k in self.block_keys)


@dataclass
class RetentionStats:
    captured: int = 0
    kept: int = 0
    swapped: int = 0
    released: int = 0  # by decision (the kernel's, or no room on the host)
    expired: int = 0  # time-to-live ended: moved to the host (from the device) or released
    reclaimed: int = 0  # given up early because memory was needed (swapped when the host had room)
    swapped_in_blocks: int = 0
    reused_tokens: int = 0  # prompt tokens a claiming request found retained

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RetainedContexts:
    blocks: BlockManager
    swap: SwapSpace
    clock: Callable[[], float] = time.monotonic
    retain_on_finish: dict[str, str] = field(default_factory=dict)  # request id -> context key
    claims: dict[str, str] = field(default_factory=dict)  # request id -> context key it extends
    contexts: dict[str, RetainedContext] = field(default_factory=dict)
    stats: RetentionStats = field(default_factory=RetentionStats)
    _swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host) for the next step
    _host_to_free: list[int] = field(default_factory=list)  # read by the last step's swap-ins
    _prepared: set[str] = field(default_factory=set)  # brought back to the device in this step

    # -- capture and decisions (between steps) --------------------------------

    def capture(self, seq: Sequence) -> None:
        """A finishing sequence registered to be retained: pin its prefix-cached blocks."""
        key = self.retain_on_finish.pop(seq.request_id, None)
        self.claims.pop(seq.request_id, None)
        if key is None or seq.index != 0 or seq.status is not SequenceStatus.RUNNING:
            return
        self._drop(key)  # an older context under the same key is superseded
        n = min(seq.num_cached_blocks, len(seq.block_table), len(seq.block_hashes))
        registered = self.blocks._block_hash
        table = list(itertools.takewhile(lambda b: b in registered, seq.block_table[:n]))
        n = len(table)
        if not n:
            return
        self.blocks.pin(table)
        self.contexts[key] = RetainedContext(
            key, table, [self.blocks._block_key[b] for b in table], list(seq.block_hashes[:n]),
            expires=self.clock() + DEFAULT_TTL)
        self.stats.captured += 1

    def keep(self, key: str, ttl: float) -> bool:
        ctx = self.contexts.get(key)
        if ctx is None or ctx.on_host:
            return False
        ctx.expires = self.clock() + ttl
        self.stats.kept += 1
        return True

    def swap_out(self, key: str, ttl: float = HOST_TTL) -> bool:
        """Move a pinned context to host memory (copied at the next step) for `ttl` seconds, and
        at least HOST_TTL: host memory is plentiful, and a tool that outlasts its prediction should
        not cost a recompute; False when the host has no room (then it is released)."""
        pairs = self._to_host(key, max(ttl, HOST_TTL))
        if pairs is None:
            return False
        self._swap_out += pairs
        self.stats.swapped += 1
        return True

    def _to_host(self, key: str, ttl: float) -> list[tuple[int, int]] | None:
        """Unpin a device context onto host blocks; the (device, host) copies to run before any
        of those device blocks is written again. None (and the context released) when the host
        has no room; None too when it is not on the device."""
        ctx = self.contexts.get(key)
        if ctx is None or ctx.on_host:
            return None
        if self.swap.num_free_blocks < len(ctx.blocks):
            self.release(key)
            return None
        host = self.swap.allocate(len(ctx.blocks))
        pairs = list(zip(ctx.blocks, host, strict=True))
        self.blocks.unpin(ctx.blocks)  # to the prefix cache: still a hit until evicted
        ctx.blocks, ctx.on_host, ctx.expires = host, True, self.clock() + ttl
        return pairs

    def release(self, key: str) -> bool:
        if not self._drop(key):
            return False
        self.stats.released += 1
        return True

    def _drop(self, key: str) -> bool:
        ctx = self.contexts.pop(key, None)
        if ctx is None:
            return False
        if ctx.on_host:
            self._host_to_free += ctx.blocks
        else:
            self.blocks.unpin(ctx.blocks)
        return True

    def device_blocks(self) -> int:
        return sum(len(c.blocks) for c in self.contexts.values() if not c.on_host)

    # -- inside a schedule ------------------------------------------------------

    def begin_step(self) -> list[tuple[int, int]]:
        """Free last step's swap-in sources, move expired contexts off the device (to the host when
        it has room) and release expired host copies; returns the swap-outs decided since the last
        step (the engine copies them before this step writes any KV)."""
        self.swap.free(self._host_to_free)
        self._host_to_free = []
        self._prepared.clear()
        now, claimed = self.clock(), set(self.claims.values())
        for key in [k for k, c in self.contexts.items() if c.expires <= now and k not in claimed]:
            if self.contexts[key].on_host:
                self._drop(key)
            else:
                self._swap_out += self._to_host(key, HOST_TTL) or []
            self.stats.expired += 1
        pairs, self._swap_out = self._swap_out, []
        return pairs

    def reclaim(self, swap_out: list[tuple[int, int]]) -> bool:
        """Memory is needed: a device-pinned context leaves the device, to the host when it has room
        (its copies appended to `swap_out`, this step's), else to the prefix cache. Contexts no
        queued request claims go first, soonest expiry first; then claimed ones, which are still
        swapped, not released: copying a context back costs far less than recomputing it. One that
        `prepare` brought back in this step is released, and only when nothing else is pinned: its
        swap-in has not run yet, so there is nothing to copy out."""
        pinned = [c for c in self.contexts.values() if not c.on_host]
        if not pinned:
            return False
        claimed = set(self.claims.values())
        ctx = min(pinned, key=lambda c: (c.key in self._prepared, c.key in claimed, c.expires))
        self.stats.reclaimed += 1
        if ctx.key in self._prepared:
            self._drop(ctx.key)
        else:
            swap_out += self._to_host(ctx.key, HOST_TTL) or []
        return True

    def prepare(self, seq: Sequence, can_wait: bool = False) -> list[tuple[int, int]] | None:
        """Before a claiming sequence is matched against the prefix cache: bring its context's
        evicted blocks back from host memory. Returns (host, device) pairs to copy this step; with
        no room for them, None when the caller `can_wait` for memory (running sequences will free
        some: cheaper than recomputing the context), else the context is released."""
        key = self.claims.get(seq.request_id)
        ctx = self.contexts.get(key) if key is not None else None
        if ctx is None or not ctx.on_host:
            return []
        bm = self.blocks
        hits = {i: bm._cached[h] for i, h in enumerate(ctx.hashes)
                if bm._block_key.get(bm._cached.get(h, -1)) == ctx.block_keys[i]}
        missing = [i for i in range(len(ctx.hashes)) if i not in hits]
        # Hits still in the prefix cache's free list leave it when pinned, like fresh blocks.
        idle_hits = sum(1 for b in hits.values() if bm.ref_counts[b] == 0)
        if len(missing) + idle_hits > bm.num_free_blocks:
            if can_wait:
                return None
            self.release(ctx.key)  # no room, and none will come: the tokens are recomputed
            return []
        bm.pin(list(hits.values()))  # first, so that allocating the missing blocks cannot evict them
        fresh = bm.allocate_blocks(len(missing))
        pairs = []
        for i, block in zip(missing, fresh, strict=True):
            bm.adopt(block, ctx.hashes[i], ctx.block_keys[i])
            pairs.append((ctx.blocks[i], block))
        placed = dict(zip(missing, fresh, strict=True))
        table = [hits[i] if i in hits else placed[i] for i in range(len(ctx.hashes))]
        self._host_to_free += ctx.blocks
        ctx.blocks, ctx.on_host = table, False  # pinned on the device until the admission
        self._prepared.add(ctx.key)
        self.stats.swapped_in_blocks += len(pairs)
        return pairs

    def admitted(self, seq: Sequence) -> None:
        """A claiming sequence holds its blocks now: its context's pin is no longer needed."""
        key = self.claims.pop(seq.request_id, None)
        if key is None:
            return
        self.stats.reused_tokens += seq.num_cached_tokens
        ctx = self.contexts.get(key)
        if ctx is not None and not ctx.on_host:
            self._drop(key)  # handed over: the sequence's block table holds the blocks now
