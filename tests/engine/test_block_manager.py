"""BlockManager + SwapSpace: paged KV memory keeps its guarantees under any sequence of operations.

Besides the allocator's own bookkeeping (`check_invariants`), the state machine keeps a model of
the KV *content* of every device and host block: each slot holds the token prefix whose KV it
stores. Every step the test runs what the engine would run (swap copies, copy-on-write copies, the
step's KV writes) on that model, and then checks that every live sequence's computed positions
read exactly its own prefix. So a prefix-cache hit on a wrong block, a lost copy-on-write, a write
into a shared block or a swap that mixes up blocks all show up as a wrong read.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from llmos.engine.block_manager import BlockManager, SwapSpace
from llmos.engine.sampling_params import SamplingParams
from llmos.engine.sequence import Sequence

BS = 4
PARAMS = SamplingParams()

# A few shared prefixes (some diverging inside a block, some at a block edge) so hits are common.
PREFIXES = [
    [],
    [1, 2, 3, 4, 5, 6, 7, 8],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9],
    [1, 2, 3, 4, 6, 6, 6, 6],
    [1, 2, 3, 5],
    [7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
]
prompts = st.builds(
    lambda p, s: p + s, st.sampled_from(PREFIXES), st.lists(st.integers(0, 3), min_size=1, max_size=10)
)


def new_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, 0, list(tokens), len(tokens), PARAMS)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedMemory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager
        self.swap: SwapSpace
        self.running: list[Sequence] = []  # hold device blocks
        self.swapped: list[Sequence] = []  # hold host blocks
        self.waiting: list[Sequence] = []  # hold nothing (new, or preempted for recompute)
        self.device: list[list] = []  # KV content model: device[block][slot] = token prefix
        self.host: list[list] = []

    @initialize(num_blocks=st.integers(8, 32), swap_blocks=st.integers(0, 16))
    def init(self, num_blocks: int, swap_blocks: int) -> None:
        self.bm = BlockManager(num_blocks, BS)
        self.swap = SwapSpace(swap_blocks)
        self.device = [[None] * BS for _ in range(num_blocks)]
        self.host = [[None] * BS for _ in range(swap_blocks)]

    # -- helpers --------------------------------------------------------------

    def _tables(self) -> list[list[int]]:
        return [s.block_table for s in self.running]

    def _run_step(self, seq: Sequence, n: int, hits: list[int] = ()) -> None:
        """What the scheduler + engine do for one sequence: check, allocate, copy, write, advance."""
        bm = self.bm
        free_before = bm.num_free_blocks
        reclaimed = sum(1 for b in hits if bm.ref_counts[b] == 0)
        predicted = bm.blocks_needed(seq, n, len(hits)) + reclaimed
        assert bm.can_allocate(seq, n, hits) == (predicted <= free_before)
        if not bm.can_allocate(seq, n, hits):
            event("out of blocks")
            return
        others = [s for s in self.running if s is not seq]
        copies = bm.allocate(seq, n, hits)
        # can_allocate / blocks_needed predicted exactly how many free blocks the step takes.
        assert free_before - bm.num_free_blocks == predicted
        if seq not in self.running:
            self.running.append(seq)
        if copies:
            event("copy-on-write")
        for src, dst in copies:
            assert bm.ref_counts[dst] == 1, "copy-on-write destination is shared"
            assert dst in seq.block_table and src not in seq.block_table
            assert bm.ref_counts[src] >= 1, "copy-on-write source was freed before the copy"
            assert all(dst not in s.block_table for s in others)
            self.device[dst] = list(self.device[src])
        start = seq.num_computed_tokens
        assert len(seq.block_table) == ceil_div(start + n, BS)
        for pos in range(start, start + n):
            block = seq.block_table[pos // BS]
            # Writes never hit a block another live table holds.
            assert bm.ref_counts[block] == 1, f"write to shared block {block}"
            assert all(block not in s.block_table for s in others)
            self.device[block][pos % BS] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += n

    def _pick(self, queue: list[Sequence], i: int) -> Sequence | None:
        """The i-th sequence of a queue, round robin; None for an empty queue (the rule is a no-op)."""
        return queue[i % len(queue)] if queue else None

    # -- rules ----------------------------------------------------------------

    @rule(tokens=prompts, chunk=st.integers(1, 24))
    def add_sequence(self, tokens: list[int], chunk: int) -> None:
        """Admit a new sequence as Scheduler._admit_waiting does (prefix hits, then a chunk)."""
        seq = new_seq(tokens)
        self.waiting.append(seq)
        self._admit(seq, chunk)

    @rule(i=st.integers(0, 99), chunk=st.integers(1, 24))
    def admit_waiting(self, i: int, chunk: int) -> None:
        seq = self._pick(self.waiting, i)
        if seq is not None:
            self._admit(seq, chunk)

    def _admit(self, seq: Sequence, chunk: int) -> None:
        bm = self.bm
        assert seq.num_computed_tokens == 0 and not seq.block_table
        hits = bm.match_prefix(seq)
        assert len(hits) * BS < len(seq), "match_prefix must leave a token to compute"
        assert len(set(hits)) == len(hits)
        if hits:
            event("prefix hit")
            if any(bm.ref_counts[b] == 0 for b in hits):
                event("prefix hit on a freed block")
        for i, block in enumerate(hits):
            for slot in range(BS):
                pos = i * BS + slot
                assert self.device[block][slot] == tuple(seq.token_ids[: pos + 1]), "wrong prefix hit"
        n = min(len(seq) - len(hits) * BS, chunk)
        self._run_step(seq, n, hits)
        if seq in self.running:
            self.waiting.remove(seq)
            assert seq.num_cached_tokens == len(hits) * BS

    @rule(i=st.integers(0, 99), new_tokens=st.lists(st.integers(0, 3), max_size=6), chunk=st.integers(1, 24))
    def step(self, i: int, new_tokens: list[int], chunk: int) -> None:
        """A decode or prefill chunk: append sampled tokens if the prompt is done, then compute."""
        seq = self._pick(self.running, i)
        if seq is None:
            return
        if seq.num_uncomputed == 0:
            seq.token_ids += new_tokens or [0]
        self._run_step(seq, min(seq.num_uncomputed, chunk))

    @rule(i=st.integers(0, 99), decode=st.booleans(), token=st.integers(0, 3))
    def fork(self, i: int, decode: bool, token: int) -> None:
        """n > 1 sampling: the child shares every block; optionally the parent decodes at once."""
        parent = self._pick(self.running, i)
        if parent is None:
            return
        child = new_seq(parent.token_ids, parent.request_id)
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        assert child.block_table is not parent.block_table
        self.running.append(child)
        if decode and parent.num_uncomputed == 0:
            parent.token_ids.append(token)
            self._run_step(parent, 1)

    @rule(i=st.integers(0, 99))
    def free(self, i: int) -> None:
        seq = self._pick(self.running, i)
        if seq is None:
            return
        self.running.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == []

    @rule(i=st.integers(0, 99))
    def preempt_recompute(self, i: int) -> None:
        seq = self._pick(self.running, i)
        if seq is None:
            return
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        self.waiting.append(seq)

    @rule(i=st.integers(0, 99))
    def preempt_swap(self, i: int) -> None:
        """Swap a sequence's blocks out to host memory (BlockManager.swap_out, as Scheduler._preempt)."""
        seq = self._pick(self.running, i)
        if seq is None:
            return
        if self.swap.num_free_blocks < len(seq.block_table):
            event("swap space full")
            return
        event("swap out")
        device = list(seq.block_table)
        copies = self.bm.swap_out(seq, self.swap)
        host = seq.block_table
        assert [d for d, _ in copies] == device and [h for _, h in copies] == host
        assert len(set(host)) == len(host)
        for d, h in copies:
            self.host[h] = list(self.device[d])
        self.running.remove(seq)
        self.swapped.append(seq)

    @rule(i=st.integers(0, 99))
    def swap_in(self, i: int) -> None:
        """Bring a swapped sequence back into fresh device blocks, as Scheduler._admit_swapped does."""
        seq = self._pick(self.swapped, i)
        if seq is None:
            return
        host = seq.block_table
        if self.bm.num_free_blocks < len(host):
            return
        event("swap in")
        in_use = [b for table in self._tables() for b in table]
        host = list(host)
        copies = self.bm.swap_in(seq, self.swap)
        device = seq.block_table
        assert [h for h, _ in copies] == host and [d for _, d in copies] == device
        assert len(set(device)) == len(device) and seq.num_cached_blocks == 0
        assert not set(device) & set(in_use), "swap-in destination is in use"
        for h, d in copies:
            self.device[d] = list(self.host[h])
        self.swapped.remove(seq)
        self.running.append(seq)

    @rule(i=st.integers(0, 99))
    def finish_swapped(self, i: int) -> None:
        seq = self._pick(self.swapped, i)
        if seq is None:
            return
        self.bm.free_swapped(seq, self.swap)
        assert seq.block_table == []
        self.swapped.remove(seq)

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()

    # -- invariants -----------------------------------------------------------

    @invariant()
    def allocator_bookkeeping(self) -> None:
        bm = self.bm
        bm.check_invariants(self._tables())
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_free_blocks == sum(1 for c in bm.ref_counts if c == 0)
        assert all(c >= 0 for c in bm.ref_counts)
        for seq in self.running:
            assert len(seq.block_table) == ceil_div(seq.num_computed_tokens, BS)
        for seq in self.waiting:
            assert not seq.block_table and seq.num_computed_tokens == 0

    @invariant()
    def swap_bookkeeping(self) -> None:
        held = [b for s in self.swapped for b in s.block_table]
        assert len(set(held)) == len(held), "a host block is held twice"
        free = list(self.swap._free)
        assert len(set(free)) == len(free), "a host block is free twice"
        assert not set(free) & set(held)
        assert self.swap.num_free_blocks + len(held) == self.swap.num_blocks

    @invariant()
    def kv_content_is_each_sequences_own(self) -> None:
        """Every computed position of every live sequence reads its own prefix's KV."""
        for seqs, store in ((self.running, self.device), (self.swapped, self.host)):
            for seq in seqs:
                for pos in range(seq.num_computed_tokens):
                    block = seq.block_table[pos // BS]
                    assert store[block][pos % BS] == tuple(seq.token_ids[: pos + 1]), (
                        f"seq {seq.seq_id} position {pos} reads the wrong KV")


TestPagedMemory = PagedMemory.TestCase
TestPagedMemory.settings = settings(
    max_examples=400, stateful_step_count=80, deadline=None, suppress_health_check=list(HealthCheck)
)


# -- prefix cache, directly ------------------------------------------------------


def admit(bm: BlockManager, tokens: list[int]) -> tuple[Sequence, list[int]]:
    seq = new_seq(tokens)
    hits = bm.match_prefix(seq)
    n = len(seq) - len(hits) * bm.block_size
    assert bm.can_allocate(seq, n, hits)
    bm.allocate(seq, n, hits)
    seq.num_computed_tokens += n
    return seq, hits


def test_prefix_cache_hits_only_on_matching_tokens() -> None:
    bm = BlockManager(16, BS)
    a, hits = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert hits == []
    # Differs in the first block: no hit at all.
    b, hits = admit(bm, [1, 2, 3, 0, 5, 6, 7, 8, 9])
    assert hits == []
    # Same first block, second block differs: only the first block is shared.
    c, hits = admit(bm, [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert hits == a.block_table[:1]
    # Same second block's tokens but after a different first block: the hash chain says no.
    d, hits = admit(bm, [0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert hits == []
    # Identical prefix: both full blocks are hits.
    e, hits = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 3, 3])
    assert hits == a.block_table[:2]
    assert e.num_cached_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 3  # a, c and e
    bm.check_invariants([s.block_table for s in (a, b, c, d, e)])


def test_prefix_cache_hit_survives_free_until_evicted() -> None:
    bm = BlockManager(4, BS)
    a, _ = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b, hits = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert hits == table[:2]
    bm.free(b)
    # A sequence that needs every block evicts the cached ones; afterwards nothing matches.
    c, hits = admit(bm, [9] * 16)
    assert hits == []
    bm.free(c)
    assert bm.match_prefix(new_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])) == []
    bm.check_invariants([])


def test_freed_cached_blocks_are_reused_lru_first() -> None:
    bm = BlockManager(6, BS)
    a, _ = admit(bm, [1, 1, 1, 1, 2, 2, 2, 2, 0])  # blocks 0, 1 cached, block 2 partial
    b, _ = admit(bm, [3, 3, 3, 3, 4, 4, 4, 4, 0])  # blocks 3, 4 cached, block 5 partial
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    assert sorted(a_blocks + b_blocks) == list(range(6))
    bm.free(a)  # freed first: least recently used
    bm.free(b)
    # The never-cached partial blocks go first, then a's cached blocks (tail first), then b's.
    fresh = bm.allocate_blocks(2)
    assert sorted(fresh) == sorted([a_blocks[2], b_blocks[2]])
    assert bm.allocate_blocks(1) == [a_blocks[1]]
    assert bm.allocate_blocks(1) == [a_blocks[0]]
    # b's prefix is still cached and hits; a's is gone.
    assert bm.match_prefix(new_seq([3, 3, 3, 3, 4, 4, 4, 4, 0])) == b_blocks[:2]
    assert bm.match_prefix(new_seq([1, 1, 1, 1, 2, 2, 2, 2, 0])) == []


def test_hit_refreshes_lru_position() -> None:
    bm = BlockManager(4, BS)
    a, _ = admit(bm, [1, 1, 1, 1, 0])
    b, _ = admit(bm, [2, 2, 2, 2, 0])
    a_first, b_first = a.block_table[0], b.block_table[0]
    bm.free(a)  # a's full block is now the least recently used cached block
    bm.free(b)
    # Using a's block again makes it the most recently used one.
    c, hits = admit(bm, [1, 1, 1, 1, 5])
    assert hits == [a_first]
    bm.free(c)
    fresh = bm.allocate_blocks(3)  # 2 never-cached blocks go first, then the LRU cached block: b's
    assert fresh[2] == b_first
    assert bm.match_prefix(new_seq([1, 1, 1, 1, 5])) == [a_first]
    assert bm.match_prefix(new_seq([2, 2, 2, 2, 5])) == []


def test_match_prefix_leaves_one_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(3 * BS))  # exactly three full blocks
    a, _ = admit(bm, prompt)
    b, hits = admit(bm, prompt)
    assert hits == a.block_table[:2]  # not the third: its last token's logits are needed
    assert b.num_cached_tokens == 2 * BS
    assert b.num_computed_tokens == len(prompt)
    # The third block was computed again, into a block of b's own.
    assert b.block_table[2] != a.block_table[2]
    bm.check_invariants([a.block_table, b.block_table])
    # A one-block prompt never hits.
    assert bm.match_prefix(new_seq(prompt[:BS])) == []


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _, hits = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert hits == []


def test_fork_then_decode_copies_on_write() -> None:
    bm = BlockManager(8, BS)
    parent, _ = admit(bm, [1, 2, 3, 4, 5, 6])  # last block half full
    child = new_seq(parent.token_ids)
    bm.fork(parent, child)
    shared = parent.block_table[1]
    parent.token_ids.append(7)
    copies = bm.allocate(parent, 1)
    assert copies == [(shared, parent.block_table[1])]
    assert parent.block_table[1] != shared and child.block_table[1] == shared
    assert bm.ref_counts[shared] == 1
    child.token_ids.append(8)
    assert bm.allocate(child, 1) == []  # now private: written in place
    bm.check_invariants([parent.block_table, child.block_table])
