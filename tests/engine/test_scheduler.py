"""Scheduler: continuous batching, chunked prefill, priorities and preemption, without a model.

`Sim` drives real Scheduler / BlockManager / SwapSpace objects the way LLMEngine.step does: it
runs the step's swap-outs, swap-ins and copy-on-write copies, "computes" the scheduled tokens by
writing them into a model of the KV blocks (each slot holds the token prefix whose KV it stores),
advances `num_computed_tokens`, appends one token to every sequence whose tokens are all computed,
and finishes sequences that reach their max_tokens. After every step it checks the allocator's
invariants and that every live sequence's computed positions read its own KV.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmos.engine.block_manager import BlockManager, SwapSpace
from llmos.engine.config import EngineConfig
from llmos.engine.sampling_params import SamplingParams
from llmos.engine.scheduler import Scheduler, SchedulerOutput
from llmos.engine.sequence import Sequence, SequenceStatus

_request_ids = itertools.count()


def make_scheduler(num_blocks: int, block_size: int = 4, swap_blocks: int = 0, **config) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, **config)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), SwapSpace(swap_blocks))


def make_seq(prompt: int | list[int], max_tokens: int = 4, priority: int = 0, arrival: float = 0.0,
             n: int = 1) -> Sequence:
    """A sequence with a prompt of distinct tokens (no accidental prefix sharing) unless given."""
    rid = next(_request_ids)
    tokens = list(prompt) if isinstance(prompt, list) else [1000 * (rid + 1) + i for i in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, n=n)
    return Sequence(str(rid), 0, tokens, len(tokens), params, priority=priority, arrival=arrival)


class Sim:
    """The engine's step loop, with a model of KV content instead of a model."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.bm = sched.blocks
        self.device: list[list] = [[None] * self.bm.block_size for _ in range(self.bm.num_blocks)]
        self.host: list[list] = [[None] * self.bm.block_size for _ in range(sched.swap.num_blocks)]
        self.finished: list[Sequence] = []
        self.forked: set[str] = set()
        self.steps = 0
        self.seen: Counter[str] = Counter()  # what happened, for the workload test's statistics

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.sched.add(seq)

    def next_token(self, seq: Sequence) -> int:
        return (seq.index * 7 + len(seq)) % 5  # deterministic, so a test can predict outputs

    def step(self) -> SchedulerOutput:
        sched, bm = self.sched, self.bm
        before = {s: s.status for s in [*sched.running, *sched.waiting, *sched.swapped]}
        out = sched.schedule()
        self.steps += 1
        cfg = sched.config
        assert sum(out.scheduled.values()) <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs + sum(s.index > 0 for s in sched.running)
        for seq, n in out.scheduled.items():
            assert n >= 1 and n <= seq.num_uncomputed
            assert seq.status is SequenceStatus.RUNNING and seq in sched.running
        for seq in out.preempted:
            assert seq not in out.scheduled and seq not in sched.running
            assert before[seq] is SequenceStatus.RUNNING
            if seq.status is SequenceStatus.WAITING:
                assert seq.num_computed_tokens == 0 and seq.block_table == [] and seq in sched.waiting
            else:
                assert seq.status is SequenceStatus.SWAPPED and seq in sched.swapped
        for seq in out.preempted:
            self.seen["swap out" if seq.status is SequenceStatus.SWAPPED else "recompute"] += 1
            if seq.num_computed_tokens < seq.num_prompt_tokens and seq.status is SequenceStatus.SWAPPED:
                self.seen["swap out mid-prefill"] += 1
        self.seen["swap in"] += bool(out.swap_in)
        self.seen["copy-on-write"] += bool(out.copies)
        self.seen["prefix hit"] += sum(before.get(s) is SequenceStatus.WAITING and s.num_computed_tokens > 0
                                       for s in out.scheduled)
        if out.preempted:
            # Nothing is admitted in a step that preempted.
            assert not out.swap_in
            assert all(before[s] is SequenceStatus.RUNNING for s in out.scheduled)
        # The engine's order: swap out, swap in, copy-on-write copies, then the step's writes.
        for d, h in out.swap_out:
            self.host[h] = list(self.device[d])
        for h, d in out.swap_in:
            self.device[d] = list(self.host[h])
        for src, dst in out.copies:
            assert bm.ref_counts[dst] == 1, "copy-on-write destination is shared"
            self.device[dst] = list(self.device[src])
        bs = bm.block_size
        tables = {s: s.block_table for s in sched.running}
        for seq, n in out.scheduled.items():
            start = seq.num_computed_tokens
            assert len(seq.block_table) * bs >= start + n
            for pos in range(start, start + n):
                block = seq.block_table[pos // bs]
                kv = tuple(seq.token_ids[: pos + 1])
                for other, table in tables.items():
                    if other is seq or block not in table:
                        continue
                    # The one write into a shared block the design allows: a block this step fills
                    # was entered in the prefix cache at allocation, and a request admitted later
                    # in the same step took it as a hit. The writer writes exactly the KV the hit
                    # expects, before any attention read of the layer.
                    assert before.get(other) is SequenceStatus.WAITING, "a step writes a shared block"
                    assert other.num_cached_tokens > pos and table.index(block) == pos // bs
                    assert tuple(other.token_ids[: pos + 1]) == kv
                    self.seen["same-step hit on a block being written"] += 1
                self.device[block][pos % bs] = kv
            seq.num_computed_tokens += n
        for seq in list(out.scheduled):
            if seq.num_uncomputed == 0:
                self._fork(seq)
        for seq in [s for s in sched.running if s.num_uncomputed == 0]:
            seq.token_ids.append(self.next_token(seq))
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
                assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
                self.finished.append(seq)
        self.check()
        return out

    def _fork(self, seq: Sequence) -> None:
        """n > 1: after the prompt's last token is computed, children share its blocks (as LLMEngine)."""
        if seq.params.n == 1 or seq.request_id in self.forked:
            return
        self.forked.add(seq.request_id)
        for index in range(1, seq.params.n):
            child = Sequence(seq.request_id, index, list(seq.token_ids), seq.num_prompt_tokens, seq.params,
                             priority=seq.priority, arrival=seq.arrival)
            self.bm.fork(seq, child)
            child.status = SequenceStatus.RUNNING
            self.sched.running.append(child)

    def check(self) -> None:
        sched, bm, retained = self.sched, self.bm, self.sched.retained
        paused = [s for s in sched.paused if s.status is SequenceStatus.RUNNING]
        pinned = [c for c in retained.contexts.values() if not c.on_host]
        bm.check_invariants([s.block_table for s in sched.running + paused] + [c.blocks for c in pinned])
        held = [b for s in sched.swapped for b in s.block_table]
        held += [b for c in retained.contexts.values() if c.on_host for b in c.blocks]
        held += retained._host_to_free
        assert len(set(held)) == len(held)
        assert sched.swap.num_free_blocks + len(held) == sched.swap.num_blocks
        for ctx in retained.contexts.values():  # a retained context's blocks hold its tokens' KV
            store = self.host if ctx.on_host else self.device
            tokens = [t for _, block_tokens in ctx.block_keys for t in block_tokens]
            for pos in range(len(tokens)):
                block = ctx.blocks[pos // bm.block_size]
                assert store[block][pos % bm.block_size] == tuple(tokens[: pos + 1])
        assert all(not s.block_table and not s.num_computed_tokens for s in sched.waiting)
        bs = bm.block_size
        for seqs, store in ((sched.running, self.device), (sched.swapped, self.host)):
            for seq in seqs:
                for pos in range(seq.num_computed_tokens):
                    assert store[seq.block_table[pos // bs]][pos % bs] == tuple(seq.token_ids[: pos + 1])

    def run(self, max_steps: int = 10_000) -> None:
        while self.sched.has_unfinished():
            assert self.steps < max_steps, "the scheduler made no progress"
            self.step()


def admitted_order(sim: Sim) -> list[Sequence]:
    order: list[Sequence] = []
    while sim.sched.has_unfinished():
        out = sim.step()
        order += [s for s in out.scheduled if s not in order]
    return order


# -- chunked prefill and the token budget ------------------------------------------


def test_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    sim = Sim(make_scheduler(128, block_size=16, max_num_batched_tokens=256))
    long = make_seq(1000, max_tokens=3)
    sim.add(long)
    chunks = [sim.step().scheduled[long] for _ in range(4)]
    assert chunks == [256, 256, 256, 232]
    assert long.num_computed_tokens == 1000 and long.num_output_tokens == 1
    assert [sim.step().scheduled[long] for _ in range(2)] == [1, 1]
    assert long.is_finished and long.num_output_tokens == 3


def test_decodes_share_steps_with_a_chunked_prefill() -> None:
    sim = Sim(make_scheduler(128, block_size=16, max_num_batched_tokens=256))
    a, b = make_seq(10, max_tokens=20), make_seq(12, max_tokens=20)
    sim.add(a, b)
    assert sim.step().scheduled == {a: 10, b: 12}
    long = make_seq(1000, max_tokens=2)
    sim.add(long)
    chunks = []
    while long.num_computed_tokens < 1000:
        out = sim.step()
        assert out.scheduled[a] == 1 and out.scheduled[b] == 1  # decodes are never starved
        chunks.append(out.scheduled[long])
        if long.num_computed_tokens < 1000:
            assert sum(out.scheduled.values()) == 256  # the budget is used to the last token
    assert chunks == [254, 254, 254, 238]
    assert a.num_output_tokens == 5 and b.num_output_tokens == 5
    assert sim.step().scheduled == {a: 1, b: 1, long: 1}


def test_token_budget_caps_admission() -> None:
    sim = Sim(make_scheduler(64, max_num_batched_tokens=20))
    seqs = [make_seq(8) for _ in range(4)]
    sim.add(*seqs)
    out = sim.step()
    # 8 + 8 fill 16 of 20 tokens; the third prompt gets the last 4 as a chunk.
    assert out.scheduled == {seqs[0]: 8, seqs[1]: 8, seqs[2]: 4}
    assert seqs[3].status is SequenceStatus.WAITING


# -- order ----------------------------------------------------------------------------


def test_fcfs_by_arrival() -> None:
    sim = Sim(make_scheduler(64, max_num_seqs=1))
    seqs = [make_seq(5, max_tokens=2, arrival=t) for t in (3.0, 1.0, 2.0, 0.5)]
    sim.add(*seqs)
    assert admitted_order(sim) == [seqs[3], seqs[1], seqs[2], seqs[0]]


def test_fcfs_ties_broken_by_creation() -> None:
    sim = Sim(make_scheduler(64, max_num_seqs=2))
    seqs = [make_seq(5, max_tokens=2) for _ in range(5)]
    sim.add(*reversed(seqs))
    assert admitted_order(sim) == seqs


def test_priority_lower_value_first() -> None:
    sim = Sim(make_scheduler(64, max_num_seqs=1))
    seqs = [make_seq(5, max_tokens=2, priority=p, arrival=i) for i, p in enumerate([2, 0, 1, -1, 0])]
    sim.add(*seqs)
    assert admitted_order(sim) == [seqs[3], seqs[1], seqs[4], seqs[2], seqs[0]]


def test_max_num_seqs_respected() -> None:
    sim = Sim(make_scheduler(256, max_num_seqs=3))
    seqs = [make_seq(6, max_tokens=5) for _ in range(10)]
    sim.add(*seqs)
    while sim.sched.has_unfinished():
        out = sim.step()
        assert len(out.scheduled) <= 3
        assert len(sim.sched.running) <= 3
    assert all(s.num_output_tokens == 5 for s in seqs)


# -- preemption ---------------------------------------------------------------------


def fill_pool(swap_blocks: int, mode: str = "auto") -> tuple[Sim, Sequence, Sequence, Sequence]:
    """Three 8-token prompts fill a 6-block pool; each one's first decode needs a seventh block.

    A and C have priority 0, B priority 1 (the lowest); C arrived last.
    """
    sim = Sim(make_scheduler(6, swap_blocks=swap_blocks, preemption_mode=mode))
    a = make_seq(8, max_tokens=3, priority=0, arrival=0.0)
    b = make_seq(8, max_tokens=3, priority=1, arrival=1.0)
    c = make_seq(8, max_tokens=3, priority=0, arrival=2.0)
    sim.add(a, b, c)
    out = sim.step()
    assert out.scheduled == {a: 8, c: 8, b: 8}
    assert sim.bm.num_free_blocks == 0
    return sim, a, b, c


def test_preempts_lowest_priority_by_swap_when_swap_space_has_room() -> None:
    sim, a, b, c = fill_pool(swap_blocks=4)
    b_blocks = list(b.block_table)
    out = sim.step()
    assert out.preempted == [b]
    assert b.status is SequenceStatus.SWAPPED and b in sim.sched.swapped
    assert [d for d, _ in out.swap_out] == b_blocks
    assert b.block_table == [h for _, h in out.swap_out]
    assert b.num_computed_tokens == 8  # its KV survives on the host
    assert out.scheduled == {a: 1, c: 1}
    assert sim.sched.stats.swap_outs == 1 and sim.sched.stats.recomputes == 0


def test_preempts_newest_among_equal_priority() -> None:
    sim = Sim(make_scheduler(6, swap_blocks=4))
    seqs = [make_seq(8, max_tokens=3, arrival=t) for t in (0.0, 1.0, 2.0)]
    sim.add(*seqs)
    sim.step()
    out = sim.step()
    assert out.preempted == [seqs[2]]
    assert out.scheduled == {seqs[0]: 1, seqs[1]: 1}


def test_preempts_by_recompute_without_swap_space() -> None:
    sim, a, b, c = fill_pool(swap_blocks=0)
    out = sim.step()
    assert out.preempted == [b] and not out.swap_out
    assert b.status is SequenceStatus.WAITING and b in sim.sched.waiting
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert out.scheduled == {a: 1, c: 1}
    assert sim.sched.stats.recomputes == 1


def test_recompute_mode_never_swaps() -> None:
    sim, a, b, c = fill_pool(swap_blocks=16, mode="recompute")
    out = sim.step()
    assert out.preempted == [b] and not out.swap_out
    assert b.status is SequenceStatus.WAITING
    assert sim.sched.swap.num_free_blocks == 16


def test_swap_mode_without_room_is_an_error() -> None:
    sim, *_ = fill_pool(swap_blocks=1, mode="swap")
    with pytest.raises(MemoryError, match="swap"):
        sim.step()


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    sim = Sim(make_scheduler(7, swap_blocks=4))
    a = make_seq(8, max_tokens=3, priority=0)
    c = make_seq(8, max_tokens=3, priority=0)
    b = make_seq(12, max_tokens=3, priority=1)
    sim.add(a, b, c)
    sim.step()
    assert sim.bm.num_free_blocks == 0
    d = make_seq(2, max_tokens=1, priority=-1)  # top priority, and it would fit after B leaves
    sim.add(d)
    out = sim.step()
    assert out.preempted == [b]
    assert out.scheduled == {a: 1, c: 1}
    assert sim.bm.num_free_blocks == 1  # B freed 3 blocks, A and C took 2
    assert d.status is SequenceStatus.WAITING
    out = sim.step()
    assert out.scheduled == {a: 1, c: 1}  # nor while B is swapped out: it comes back first
    assert d.status is SequenceStatus.WAITING


def test_running_sequences_are_served_in_priority_order() -> None:
    """The budget goes to running sequences by priority, whenever they were admitted."""
    sim = Sim(make_scheduler(64, max_num_batched_tokens=16))
    low = make_seq(16, max_tokens=10, priority=1)
    sim.add(low)
    assert sim.step().scheduled == {low: 16}
    high = make_seq(40, max_tokens=2, priority=0)
    sim.add(high)
    assert sim.step().scheduled == {low: 1, high: 15}
    assert sim.step().scheduled == {high: 16}  # running `high` now comes first and takes it all
    assert sim.step().scheduled == {high: 9, low: 1}


def test_swapped_sequence_comes_back_before_waiting_ones() -> None:
    sim, a, b, c = fill_pool(swap_blocks=4)
    sim.step()  # B swapped out; A and C decode
    host = list(b.block_table)
    # D is ahead of B in priority order and needs 4 blocks: after B's 3 only 3 remain.
    d = make_seq(13, max_tokens=3, priority=0, arrival=0.5)
    sim.add(d)
    out = sim.step()  # no free block: nothing comes in; A and C finish
    assert not out.swap_in and set(out.scheduled) == {a, c}
    assert a.is_finished and c.is_finished
    out = sim.step()
    assert [h for h, _ in out.swap_in] == host
    assert b.block_table[:2] == [dev for _, dev in out.swap_in]
    assert b.status is SequenceStatus.RUNNING and b.num_computed_tokens == 9  # 8 swapped in + 1
    assert out.scheduled == {b: 1}
    assert d.status is SequenceStatus.WAITING
    assert sim.sched.swap.num_free_blocks == 4
    sim.run()
    assert b.num_output_tokens == 3 and d.num_output_tokens == 3


def test_swapped_sequences_come_back_in_priority_order() -> None:
    sim = Sim(make_scheduler(6, swap_blocks=8))
    a = make_seq(8, max_tokens=8, priority=0)
    c = make_seq(8, max_tokens=8, priority=1)
    b = make_seq(8, max_tokens=8, priority=2)
    sim.add(a, b, c)
    preempted = []
    while not (a.is_finished and sim.sched.swapped == []):
        out = sim.step()
        preempted += out.preempted
        if out.swap_in:
            break
    assert preempted == [b, c]  # the lowest priority first
    assert sim.sched.swapped == [b]
    assert list(out.scheduled) == [c]  # then the highest priority comes back first
    sim.run()
    assert all(s.num_output_tokens == 8 for s in (a, b, c))


def test_sequence_swapped_mid_prefill_comes_back_with_room_for_its_next_chunk() -> None:
    """Regression: swap-in reserved one block beyond the swapped ones, but a prefill chunk can
    need more; allocate then ran out of free blocks (KeyError from the evictor)."""
    sim = Sim(make_scheduler(5, swap_blocks=8, max_num_batched_tokens=6))
    a = make_seq(3, max_tokens=13, priority=0)
    long = make_seq(16, max_tokens=1, priority=1)
    sim.add(a, long)
    sim.step()
    sim.step()
    out = sim.step()  # A's decode needs a block: the long prompt is swapped out mid-prefill
    assert out.preempted == [long] and long.status is SequenceStatus.SWAPPED
    assert long.num_computed_tokens == 8 and long.num_uncomputed == 8
    out = sim.step()  # 3 free blocks: 2 to swap in, but the next 5-token chunk needs 2 more
    assert not out.swap_in and long.status is SequenceStatus.SWAPPED
    sim.run()
    assert a.num_output_tokens == 13 and long.num_output_tokens == 1
    assert sim.bm.num_free_blocks == 5


def test_swapped_sequence_holding_the_whole_pool_comes_back() -> None:
    """Regression: swap-in wanted len(blocks) + 1 free blocks, so a sequence swapped out with as
    many blocks as the pool has (possible when part of them were prefix-shared) never returned."""
    sim = Sim(make_scheduler(4, swap_blocks=8))
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    t = make_seq(prefix, max_tokens=4, priority=0)
    s = make_seq(prefix + [9, 9, 9, 9, 9], max_tokens=3, priority=1)
    sim.add(t, s)
    sim.step()  # s shares t's two prefix blocks: the pool is full
    assert len(s.block_table) == 4 and sim.bm.num_free_blocks == 0
    out = sim.step()
    assert out.preempted == [s] and len(s.block_table) == 4
    sim.run(max_steps=50)
    assert t.num_output_tokens == 4 and s.num_output_tokens == 3


def test_recomputed_sequence_finds_its_prefix_head_in_the_cache() -> None:
    """Preemption frees a sequence's tail first, so its first blocks are evicted last."""
    sim = Sim(make_scheduler(7, swap_blocks=0))
    a = make_seq(8, max_tokens=3, priority=0)
    c = make_seq(8, max_tokens=3, priority=0)
    b = make_seq(12, max_tokens=3, priority=1)
    sim.add(a, b, c)
    sim.step()
    assert sim.bm.num_free_blocks == 0
    first_block = b.block_table[0]
    out = sim.step()  # A and C each take one of B's freed blocks: the tail ones
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING
    assert first_block not in a.block_table + c.block_table
    sim.step()  # A and C finish
    out = sim.step()
    assert out.scheduled == {b: 9}  # 13 tokens, the first block is a prefix hit
    assert b.block_table[0] == first_block and b.num_cached_tokens == 4
    sim.run()
    assert b.num_output_tokens == 3
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


# -- whole workloads ----------------------------------------------------------------

PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 9, 9], [5] * 12]


@st.composite
def workloads(draw):
    """(block_size, num_blocks, swap_blocks, config, [(arrival step, prompt, max_tokens, priority, n)])."""
    bs = draw(st.sampled_from([2, 4, 8]))
    num_blocks = draw(st.integers(4, 16))
    config = dict(
        max_num_batched_tokens=draw(st.integers(1, 32)),
        max_num_seqs=draw(st.integers(1, 8)),
        preemption_mode=draw(st.sampled_from(["auto", "recompute"])),
    )
    swap_blocks = draw(st.integers(0, 2 * num_blocks))
    capacity = num_blocks * bs
    requests = []
    for _ in range(draw(st.integers(1, 16))):
        n = draw(st.sampled_from([1, 1, 1, 2, 3]))
        per_seq = capacity // n  # the engine refuses a request whose n sequences cannot all fit
        prefix = draw(st.sampled_from(PREFIXES))[: max(per_seq - 2, 0)]
        longest = max(1, min(20, per_seq - 1 - len(prefix)))
        prompt = prefix + draw(st.lists(st.integers(0, 3), min_size=1, max_size=longest))
        room = (per_seq // bs) * bs - len(prompt)
        if room < 1:
            continue
        max_tokens = draw(st.integers(1, min(room, 16)))
        requests.append((draw(st.integers(0, 4)), prompt, max_tokens, draw(st.integers(0, 2)), n))
    return bs, num_blocks, swap_blocks, config, sorted(requests, key=lambda r: r[0])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(workloads())
def test_random_workloads_finish_and_free_every_block(workload) -> None:
    bs, num_blocks, swap_blocks, config, requests = workload
    sim = Sim(make_scheduler(num_blocks, bs, swap_blocks, **config))
    pending = [(step, make_seq(prompt, max_tokens, priority, float(i), n))
               for i, (step, prompt, max_tokens, priority, n) in enumerate(requests)]
    while pending or sim.sched.has_unfinished():
        while pending and pending[0][0] <= sim.steps:
            sim.add(pending.pop(0)[1])
        assert sim.steps < 5_000, "the scheduler made no progress"
        sim.step()
    for what in sorted(sim.seen):
        if sim.seen[what]:
            event(what)
    assert len(sim.finished) == sum(r[4] for r in requests)
    for seq in sim.finished:
        assert seq.is_finished
        p = seq.num_prompt_tokens
        assert seq.output_token_ids == [(seq.index * 7 + p + i) % 5 for i in range(seq.params.max_tokens)]
    assert sim.bm.num_free_blocks == num_blocks
    assert sim.sched.swap.num_free_blocks == swap_blocks
    sim.bm.check_invariants([])
    assert not sim.sched.running and not sim.sched.waiting and not sim.sched.swapped


# -- KV retained across an agent's tool call (retained.py) --------------------------


def finished_context(sim: Sim, key: str, prompt: int = 8) -> Sequence:
    """A call registered for retention, run to its end: its full blocks stay pinned under `key`."""
    seq = make_seq(prompt, max_tokens=1)
    sim.sched.retained.retain_on_finish[seq.request_id] = key
    sim.add(seq)
    sim.run()
    return seq


def context_on_host(num_blocks: int, lose_device_copy: bool = True) -> tuple[Scheduler, Sim, Sequence]:
    """A finished call's context "a" swapped to 8 host blocks (the copy checked by Sim), its device
    copy dropped from the prefix cache unless `lose_device_copy` is False."""
    sched = make_scheduler(num_blocks=num_blocks, swap_blocks=8)
    sim = Sim(sched)
    a = finished_context(sim, "a")
    assert sched.retained.swap_out("a")
    sim.step()
    if lose_device_copy:
        sched.blocks.reset_prefix_cache()
    return sched, sim, a


def test_a_retained_context_is_reclaimed_before_a_paused_sequence_loses_its_blocks() -> None:
    sched = make_scheduler(num_blocks=8, swap_blocks=8)
    sim = Sim(sched)
    finished_context(sim, "a")
    assert sched.retained.device_blocks() == 2 and sched.retained.keep("a", ttl=3600)
    b = make_seq(12, max_tokens=8)
    sim.add(b)
    sim.step()
    sched.pause(b)  # an agent preempted by the kernel: it keeps its 3 blocks for now
    c = make_seq(16, max_tokens=2)  # needs 4 blocks; 3 are free
    sim.add(c)
    out = sim.step()
    assert out.scheduled == {c: 16} and out.swap_out == [(0, 0), (1, 1)] and not out.preempted
    assert sched.retained.contexts["a"].on_host and sched.retained.stats.reclaimed == 1  # host had room
    assert len(b.block_table) == 3 and b.status is SequenceStatus.RUNNING


def test_a_claimed_context_under_pressure_goes_to_the_host_and_comes_back_without_recompute() -> None:
    sched = make_scheduler(num_blocks=8, swap_blocks=8)
    sim = Sim(sched)
    a = finished_context(sim, "a")
    assert sched.retained.keep("a", ttl=3600)
    d = make_seq(a.token_ids + [7000, 7001, 7002], max_tokens=1)
    sched.retained.claims[d.request_id] = "a"  # its next call waits in the kernel's queue
    c = make_seq(28, max_tokens=2)  # needs 7 blocks; 6 are free
    sim.add(c)
    out = sim.step()
    assert out.scheduled == {c: 28} and out.swap_out == [(0, 0), (1, 1)] and not out.preempted
    assert sched.retained.contexts["a"].on_host and sched.retained.stats.reclaimed == 1
    sim.run()  # c's last token takes the eighth block: the context's device copies are gone
    sim.add(d)
    out = sim.step()
    assert len(out.swap_in) == 2 and out.scheduled == {d: 4} and d.num_cached_tokens == 8
    sim.run()
    assert d.is_finished and sched.retained.contexts == {}


def test_a_context_brought_back_in_this_step_is_never_copied_out_in_the_same_step() -> None:
    sched, sim, a = context_on_host(6)
    z = make_seq(12, max_tokens=2)  # 3 of the 6 blocks, and a fourth for its next token
    sim.add(z)
    sim.step()
    d = make_seq(a.token_ids + [7000, 7001, 7002], max_tokens=1)
    sched.retained.claims[d.request_id] = "a"
    sim.add(d)
    # The context's 2 blocks come back into the last 2 free ones; d's new tokens then need a
    # third, and the only pinned context is the one whose swap-in this step has not run yet.
    out = sim.step()
    assert out.swap_out == [] and d not in out.scheduled and sched.retained.stats.reclaimed == 1
    assert "a" not in sched.retained.contexts
    sim.run()
    assert d.is_finished and z.is_finished and sched.blocks.num_used_blocks == 0


def test_a_swapped_context_comes_back_with_its_kv_and_only_new_tokens_are_computed() -> None:
    sched, sim, a = context_on_host(8)  # the device copy is lost: only the host has it
    d = make_seq(a.token_ids + [7000, 7001, 7002], max_tokens=1)
    sched.retained.claims[d.request_id] = "a"
    sim.add(d)
    out = sim.step()
    assert len(out.swap_in) == 2 and out.scheduled == {d: 4}  # 8 of 12 tokens swapped in
    assert d.num_cached_tokens == 8 and sched.retained.contexts == {}
    sim.run()
    assert sched.swap.num_free_blocks == 6  # the host blocks a swap-in read are freed a step later
    sim.step()
    assert sched.swap.num_free_blocks == 8 and sched.blocks.num_used_blocks == 0


def test_a_context_expires_after_its_ttl_unless_a_queued_request_claims_it() -> None:
    now = [0.0]
    sched = make_scheduler(num_blocks=8, swap_blocks=8)
    sched.retained.clock = lambda: now[0]
    sim = Sim(sched)
    finished_context(sim, "a")
    finished_context(sim, "b")
    sched.retained.keep("a", ttl=1.0)
    sched.retained.keep("b", ttl=1.0)
    sched.retained.claims["queued"] = "b"  # b's next call is in the queue, not yet admitted
    now[0] = 1.0
    sim.step()
    assert sched.retained.contexts["a"].on_host and sched.retained.stats.expired == 1  # off the device
    assert not sched.retained.contexts["b"].on_host
    assert sched.blocks.num_used_blocks == 2  # a's blocks are free (still in the prefix cache)


def test_a_swap_in_counts_the_idle_cached_blocks_it_pins_and_waits_for_memory() -> None:
    sched, sim, a = context_on_host(6, lose_device_copy=False)  # its device copies wait in the prefix cache
    z = make_seq(17, max_tokens=3)  # takes every free block and evicts the context's second one
    sim.add(z)
    sim.step()
    assert list(sched.blocks._evictor) == [0] and not sched.blocks._free  # block 0: a's first, idle
    d = make_seq(a.token_ids + [7000, 7001, 7002], max_tokens=1)
    sched.retained.claims[d.request_id] = "a"
    sim.add(d)
    out = sim.step()  # bringing block 1 back needs one block, and pinning block 0 takes the other
    assert out.swap_in == [] and d not in out.scheduled and sched.retained.contexts["a"].on_host
    while d not in out.scheduled:  # it waits for z to end rather than recompute its context
        out = sim.step()
    assert len(out.swap_in) == 1 and out.scheduled[d] == 4 and d.num_cached_tokens == 8
    sim.run()
    assert d.is_finished and sched.blocks.num_used_blocks == 0 and sched.retained.contexts == {}


def test_a_swap_in_with_no_room_and_nothing_running_recomputes() -> None:
    sched, sim, a = context_on_host(3)
    sched.blocks.capacity = 1  # the operator shrank the KV: the context's 2 blocks cannot come back
    d = make_seq(a.token_ids[:3], max_tokens=1)
    sched.retained.claims[d.request_id] = "a"
    sim.add(d)
    out = sim.step()
    assert out.swap_in == [] and out.scheduled == {d: 3} and sched.retained.contexts == {}
