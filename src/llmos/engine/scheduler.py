"""Continuous batching at iteration level, with preemption (vLLM's scheduler).

Each step gets a token budget. Running sequences come first, in priority
order, each taking the tokens it still has to compute (one for a decode, a
chunk for a prefill); so prefill chunks and decodes share a step, and a prefix
hit is just fewer tokens to compute. When blocks run out, the lowest-priority,
newest running sequence is preempted: swapped to host memory or dropped for
recompute. New and swapped sequences are admitted only in a step that
preempted nobody, and new ones only once every swapped sequence is back, so
memory pressure never makes things worse.

A paused sequence (the agent scheduler above took its turn away) is in none
of those queues: it keeps its blocks until someone needs them, then gives
them up first, before any running sequence is preempted. So do the contexts
retained across agents' tool calls (retained.py), before paused sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.engine.block_manager import BlockManager, SwapSpace
from llmos.engine.config import EngineConfig
from llmos.engine.retained import RetainedContexts
from llmos.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: dict[Sequence, int] = field(default_factory=dict)  # sequence -> tokens this step
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host) blocks
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device) blocks
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    preemptions: int = 0
    swap_outs: int = 0
    recomputes: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, swap: SwapSpace) -> None:
        self.config = config
        self.blocks = blocks
        self.swap = swap
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.paused: list[Sequence] = []
        self.stats = SchedulerStats()
        self.retained = RetainedContexts(blocks, swap)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def pause(self, seq: Sequence) -> None:
        """Take a sequence out of scheduling; its blocks stay where they are for now."""
        if seq in self.paused or seq.is_finished:
            return
        self._queue(seq).remove(seq)
        self.paused.append(seq)

    def resume(self, seq: Sequence) -> None:
        """Put a paused sequence back in the queue its memory state belongs to."""
        if seq in self.paused:
            self.paused.remove(seq)
            self._queue(seq).append(seq)

    def _queue(self, seq: Sequence) -> list[Sequence]:
        return {SequenceStatus.RUNNING: self.running, SequenceStatus.WAITING: self.waiting,
                SequenceStatus.SWAPPED: self.swapped}[seq.status]

    def _reclaim_paused(self, out: SchedulerOutput) -> bool:
        """Give device blocks back: a retained context's first (to the host when it has room), else
        one paused sequence's; False when none holds any."""
        if self.retained.reclaim(out.swap_out):
            return True
        holder = next((q for q in reversed(self.paused) if q.status is SequenceStatus.RUNNING), None)
        if holder is None:
            return False
        self._evict(holder, out)
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(swap_out=self.retained.begin_step())
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=Sequence.sort_key)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq, n):
                if self._reclaim_paused(out):
                    continue
                victim = max(self.running, key=Sequence.sort_key)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.copies += self.blocks.allocate(seq, n)
                out.scheduled[seq] = n
                budget -= n
        if out.preempted:
            return out
        budget = self._admit_swapped(out, budget)
        if not self.swapped:  # swapped sequences come back before anything new starts
            self._admit_waiting(out, budget)
        return out

    def _admit_swapped(self, out: SchedulerOutput, budget: int) -> int:
        self.swapped.sort(key=Sequence.sort_key)
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed, budget)
            # The blocks swapped back in plus those this step's n tokens fill.
            if self.blocks.num_free_blocks < -(-(seq.num_computed_tokens + n) // self.blocks.block_size):
                if self._reclaim_paused(out):
                    continue
                break
            out.swap_in += self.blocks.swap_in(seq, self.swap)
            self.swapped.pop(0)
            self._run(seq)
            out.copies += self.blocks.allocate(seq, n)
            out.scheduled[seq] = n
            budget -= n
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=Sequence.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            pairs = self.retained.prepare(seq, can_wait=bool(self.running))
            if pairs is None:  # its retained context cannot come back yet: memory first
                if self._reclaim_paused(out):
                    continue
                break
            out.swap_in += pairs
            hits = self.blocks.match_prefix(seq)
            n = min(len(seq) - len(hits) * self.blocks.block_size, budget)
            if not self.blocks.can_allocate(seq, n, hits):
                if self._reclaim_paused(out):
                    continue
                break
            self.waiting.pop(0)
            out.copies += self.blocks.allocate(seq, n, hits)
            self.retained.admitted(seq)
            self._run(seq)
            out.scheduled[seq] = n
            budget -= n

    def _run(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Take a running sequence's memory and queue it again."""
        self.running.remove(seq)
        out.preempted.append(seq)
        self.stats.preemptions += 1
        self._evict(seq, out)
        self._queue(seq).append(seq)

    def _evict(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Swap a sequence's blocks out to host memory, or drop them for recompute."""
        mode = self.config.preemption_mode
        can_swap = self.swap.num_free_blocks >= len(seq.block_table)
        if mode == "swap" and not can_swap:
            raise MemoryError("swap space is full; raise swap_space or use preemption_mode=auto")
        if mode != "recompute" and can_swap:
            out.swap_out += self.blocks.swap_out(seq, self.swap)
            seq.status = SequenceStatus.SWAPPED
            self.stats.swap_outs += 1
        else:
            self.blocks.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.stats.recomputes += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's memory, wherever it is queued."""
        for queue in (self.paused, self._queue(seq)):
            if seq in queue:
                queue.remove(seq)
        self.retained.capture(seq)  # pins its context when it was registered for retention
        if seq.status is SequenceStatus.SWAPPED:
            self.blocks.free_swapped(seq, self.swap)
        else:
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
