"""Paged KV memory: the block allocator (PagedAttention's physical memory manager).

The KV cache is cut into fixed-size blocks; each sequence maps its logical
blocks to physical ones through its block table, like a page table. This
module is the one writer of block tables: allocate, append, fork, swap out
and in, free.

Guarantees (checked by the property tests):
- a block is free exactly when its reference count is zero, and its reference
  count equals the number of block tables that hold it;
- a block shared by several tables is never written: the writer gets a copy
  first (copy-on-write);
- a full block whose KV is computed is remembered by the hash of its tokens
  and all tokens before it (automatic prefix caching); when freed it stays
  reusable until the allocator needs the memory, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from llmos.engine.sequence import Sequence

_NO_PARENT = -1


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The prefix cache's key of one full block: its tokens and, through its parent's key, all before it."""
    return hash((parent, tokens))


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The keys of the full blocks of `token_ids`, as the prefix cache will look them up (a router
    placing requests where their prefix is cached computes them without an engine)."""
    hashes: list[int] = []
    for i in range(len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(block_hash(hashes[-1] if hashes else _NO_PARENT, tokens))
    return hashes


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, served from cache


class BlockManager:
    """Device blocks with reference counts, copy-on-write and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.capacity = num_blocks  # blocks it may hand out: a runtime cap at most num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # never-cached free blocks
        self._evictor: OrderedDict[int, None] = OrderedDict()  # free but cached, LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (parent, tokens)
        self._block_hash: dict[int, int] = {}  # block id -> its hash
        self.prefix_stats = PrefixCacheStats()

    # -- accounting ---------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that may still be handed out, under the capacity cap."""
        return max(0, self.capacity - self.num_used_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictor)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        """Fresh blocks that `num_new_tokens` more KV slots take, copy-on-write included.

        `num_hit_blocks` counts prefix-cache hits a new sequence is about to attach.
        """
        bs = self.block_size
        computed = num_hit_blocks * bs if num_hit_blocks else seq.num_computed_tokens
        have = num_hit_blocks or len(seq.block_table)
        needed = -(-(computed + num_new_tokens) // bs) - have
        start = computed // bs
        if not num_hit_blocks and start < have and self.ref_counts[seq.block_table[start]] > 1:
            needed += 1
        return max(needed, 0)

    # -- prefix cache -------------------------------------------------------

    def _key(self, seq: Sequence, i: int) -> tuple[int, tuple[int, ...]]:
        """What block i of a sequence holds: its parent's hash and its own tokens."""
        bs = self.block_size
        return (seq.block_hashes[i - 1] if i else _NO_PARENT, tuple(seq.token_ids[i * bs : (i + 1) * bs]))

    def _hashes(self, seq: Sequence, upto_block: int) -> list[int]:
        """Chained hashes of the first `upto_block` full blocks, extended on the sequence."""
        for i in range(len(seq.block_hashes), upto_block):
            seq.block_hashes.append(block_hash(*self._key(seq, i)))
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest full-block prefix of a new sequence's tokens.

        At least one token is left to compute, since its logits are needed.
        """
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table:
            return []
        max_blocks = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, max_blocks)
        blocks: list[int] = []
        for i in range(max_blocks):
            block = self._cached.get(hashes[i])
            if block is None or self._block_key.get(block) != self._key(seq, i):
                break
            blocks.append(block)
        return blocks

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that the first `num_tokens` tokens fill in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(num_tokens // self.block_size, len(seq.block_table))
        hashes = self._hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            if block in self._block_hash or hashes[i] in self._cached:
                continue  # already cached, or an identical block is
            self._cached[hashes[i]] = block
            self._block_hash[block] = hashes[i]
            self._block_key[block] = self._key(seq, i)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    # -- allocation ---------------------------------------------------------

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictor.popitem(last=False)
            h = self._block_hash.pop(block)
            del self._block_key[block]
            if self._cached.get(h) == block:
                del self._cached[h]
        self.ref_counts[block] = 1
        return block

    def _incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._evictor[block]
        self.ref_counts[block] += 1

    def _decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._block_hash:
                self._evictor[block] = None
            else:
                self._free.append(block)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        # A hit that sits in the evictor leaves the free pool when it is claimed.
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.blocks_needed(seq, num_new_tokens, len(hits)) + reclaimed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> list[tuple[int, int]]:
        """Attach prefix-cache hits, then make room for `num_new_tokens` KV slots.

        Returns the (source, destination) block copies that copy-on-write needs;
        the caller runs them before the step writes any KV. Blocks this step
        fills are entered in the prefix cache at once, so a request admitted
        later in the same step can share them: every KV write of a layer
        happens before any attention read of it.
        """
        if not seq.num_computed_tokens and not seq.block_table:  # an admission: a prefix lookup
            seq.num_cached_tokens = len(hits) * self.block_size
            self.prefix_stats.queries += len(seq)
            self.prefix_stats.hits += seq.num_cached_tokens
        if hits:
            for block in hits:
                self._incref(block)
            seq.block_table.extend(hits)
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.num_cached_blocks = len(hits)
        copies: list[tuple[int, int]] = []
        bs = self.block_size
        start_block = seq.num_computed_tokens // bs
        if start_block < len(seq.block_table):
            old = seq.block_table[start_block]
            if self.ref_counts[old] > 1:
                new = self._take_free_block()
                self._decref(old)
                seq.block_table[start_block] = new
                copies.append((old, new))
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * bs < end:
            seq.block_table.append(self._take_free_block())
        self._cache_full_blocks(seq, end)
        return copies

    def allocate_blocks(self, n: int) -> list[int]:
        """`n` fresh private blocks (swap-in destinations)."""
        return [self._take_free_block() for _ in range(n)]

    def pin(self, blocks: list[int]) -> None:
        """Hold blocks outside any block table (a context retained across a tool call)."""
        for block in blocks:
            self._incref(block)

    def unpin(self, blocks: list[int]) -> None:
        """Drop a pin; the tail goes first, so the prefix stays cached longest."""
        for block in reversed(blocks):
            self._decref(block)

    def adopt(self, block: int, block_hash: int, key: tuple[int, tuple[int, ...]]) -> None:
        """Register a block that the caller fills (a swap-in) in the prefix cache."""
        self._cached[block_hash] = block
        self._block_hash[block] = block_hash
        self._block_key[block] = key

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of the parent's blocks with the child (n > 1 sampling)."""
        for block in parent.block_table:
            self._incref(block)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks

    def swap_out(self, seq: Sequence, swap: SwapSpace) -> list[tuple[int, int]]:
        """Move the sequence's table to host blocks: the (device, host) copies the caller runs
        before the device blocks are reused; the device blocks are dropped as by `free`."""
        host = swap.allocate(len(seq.block_table))
        copies = list(zip(seq.block_table, host, strict=True))
        self.free(seq)
        seq.block_table = host
        return copies

    def swap_in(self, seq: Sequence, swap: SwapSpace) -> list[tuple[int, int]]:
        """Move a swapped-out sequence's table to fresh private device blocks: the (host, device)
        copies the caller runs before the step; the host blocks go back to the swap space."""
        host = seq.block_table
        device = self.allocate_blocks(len(host))
        swap.free(host)
        seq.block_table = device
        seq.num_cached_blocks = 0
        return list(zip(host, device, strict=True))

    def free_swapped(self, seq: Sequence, swap: SwapSpace) -> None:
        """Drop a swapped-out sequence's host blocks."""
        swap.free(seq.block_table)
        seq.block_table = []

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; the tail goes first so prefixes stay cached longest."""
        for block in reversed(seq.block_table):
            self._decref(block)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in list(self._evictor):
            del self._evictor[block]
            self._free.append(block)
        self._cached.clear()
        self._block_hash.clear()
        self._block_key.clear()

    def check_invariants(self, tables: list[list[int]]) -> None:
        """Assert the allocator's guarantees against every live block table (tests)."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from block-table usage"
        free = set(self._free) | set(self._evictor)
        assert len(free) == len(self._free) + len(self._evictor), "a block is free twice"
        for block in range(self.num_blocks):
            assert (block in free) == (counts[block] == 0), f"block {block} free state is wrong"
        for h, block in self._cached.items():
            assert self._block_hash.get(block) == h


class SwapSpace:
    """Host (CPU) blocks that preempted sequences' KV is swapped out to."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
