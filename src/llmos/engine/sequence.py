"""A sequence: the engine's process control block for one stream of tokens.

It owns its token ids, how many of them have KV in the cache
(`num_computed_tokens`) and its block table; the scheduler moves it between
waiting, running and swapped, the way an OS moves a process between queues.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    priority: int = 0  # lower runs first, as in vLLM
    arrival: float = 0.0
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # written by block_manager.py only
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash per full block
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # tokens the prefix cache served at the latest admission
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # Incremental detokenization and stop-string state (see output_processor.py).
    output_text: str = ""
    read_offset: int = 0
    prefix_offset: int = 0
    stop_checked: int = 0  # chars of output_text already scanned for stop strings
    matcher: Any = None  # grammar state when the request is constrained (guided.py)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority, then arrival (FCFS), then creation."""
        return (self.priority, self.arrival, self.seq_id)
