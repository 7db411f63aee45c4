"""Benchmark workloads: fixed, seeded request lists that every system under test runs.

A workload is a plain list of `BenchRequest`s (prompt token ids and a number of
output tokens to generate with end-of-sequence ignored), so llmos and its peers
run exactly the same work. Every workload is a pure function of its arguments:
the same call returns the same requests on every machine.

All ranges below are inclusive of both ends unless written as [a, b).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from llmos.models.config import ModelConfig


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: generate exactly `max_tokens` tokens after the prompt."""

    prompt_token_ids: list[int]
    max_tokens: int

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a bench request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def _random_requests(
    n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int,
    token_range: tuple[int, int] = (100, 10000),
) -> list[BenchRequest]:
    """n requests from numpy's default_rng(seed); lengths inclusive, token ids in [lo, hi)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        ids = rng.integers(token_range[0], token_range[1], size=length).tolist()
        reqs.append(BenchRequest(ids, int(rng.integers(max_tokens[0], max_tokens[1] + 1))))
    return reqs


def workload_c(quick: bool = False) -> list[BenchRequest]:
    """The CPU workload: 64 requests, prompt lengths U[32, 512], max_tokens U[16, 256].

    Token ids are uniform in [100, 10000) (ordinary vocabulary of any model llmos runs),
    drawn from numpy's default_rng(0): per request its prompt length, its token ids, then
    its max_tokens. `quick` gives 32 requests with prompts U[32, 256] and max_tokens
    U[16, 128]: two of HF's static batches, for a run of a minute.
    """
    if quick:
        return _random_requests(32, (32, 256), (16, 128), seed=0)
    return _random_requests(64, (32, 512), (16, 256), seed=0)


def workload_g(quick: bool = False) -> list[BenchRequest]:
    """The GPU workload of nano-vllm's bench.py: 256 requests, prompts U[100, 1024], max_tokens U[100, 1024].

    Drawn exactly as nano-vllm draws it (Python's `random` seeded with 0: all prompts
    first, each its length then its token ids in [0, 10000] inclusive; then every
    max_tokens), so the requests are identical to that benchmark's. `quick` gives the
    first 32 of the same requests.
    """
    rnd = random.Random(0)
    prompts = [[rnd.randint(0, 10000) for _ in range(rnd.randint(100, 1024))] for _ in range(256)]
    max_tokens = [rnd.randint(100, 1024) for _ in range(256)]
    reqs = [BenchRequest(p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    return reqs[:32] if quick else reqs


def workload_shared_prefix(
    n: int = 16,
    prefix_len: int = 256,
    suffix_len: tuple[int, int] = (16, 64),
    max_tokens: int = 16,
    seed: int = 0,
) -> list[BenchRequest]:
    """n requests whose prompts all start with the same prefix_len tokens (a system prompt).

    Each prompt is the shared prefix plus its own suffix of U[suffix_len] tokens; token
    ids uniform in [100, 10000) from numpy's default_rng(seed). This is the case a
    prefix cache serves: only the first request should compute the prefix.
    """
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 10000, size=prefix_len).tolist()
    reqs = []
    for _ in range(n):
        length = int(rng.integers(suffix_len[0], suffix_len[1] + 1))
        reqs.append(BenchRequest(prefix + rng.integers(100, 10000, size=length).tolist(), max_tokens))
    return reqs


def qwen3_0_6b_config() -> ModelConfig:
    """The shape of Qwen3-0.6B (its config.json), for runs on random weights."""
    return ModelConfig(
        arch="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        attention_bias=False,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_ids=(151645,),
    )


def prompt_tokens(reqs: list[BenchRequest]) -> int:
    """Prompt tokens of a workload (what prefill computes without a prefix cache)."""
    return sum(len(r.prompt_token_ids) for r in reqs)


def requested_output_tokens(reqs: list[BenchRequest]) -> int:
    """Output tokens the workload asks for: the numerator of every throughput we report."""
    return sum(r.max_tokens for r in reqs)


def static_reservation_tokens(reqs: list[BenchRequest]) -> int:
    """KV slots a system that reserves prompt + max_tokens per request up front would hold."""
    return sum(len(r.prompt_token_ids) + r.max_tokens for r in reqs)


def max_sequence_len(reqs: list[BenchRequest]) -> int:
    """The longest prompt + max_tokens: the positions a model must support for the workload."""
    return max(len(r.prompt_token_ids) + r.max_tokens for r in reqs)


def describe(reqs: list[BenchRequest]) -> dict[str, int]:
    """A one-line summary of a workload for bench reports."""
    return {
        "requests": len(reqs),
        "prompt_tokens": prompt_tokens(reqs),
        "requested_output_tokens": requested_output_tokens(reqs),
        "static_reservation_tokens": static_reservation_tokens(reqs),
        "max_sequence_len": max_sequence_len(reqs),
    }
