"""The CPU decode-attention kernel (paged_attention.c), built once with the system compiler.

Pure PyTorch must gather every sequence's blocks into a padded copy each
layer of each step; on a CPU that copy costs more than the whole model's
matmuls. The kernel reads blocks in place. Built on first use into the llmos
cache directory; where no compiler works, the engine keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from llmos.models.cbuild import build_library


@cache
def _library() -> ctypes.CDLL | None:
    lib = build_library(Path(__file__).with_name("paged_attention.c"), what="CPU attention kernel")
    if lib is None:
        return None
    fn = lib.paged_decode_f32
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i, ctypes.c_float, p]
    fn.restype = None
    return lib


def available() -> bool:
    return _library() is not None


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmos-attn")


@dataclass
class DecodePlan:
    """What a step's decode attention needs in every layer, computed once per step."""

    tables: torch.Tensor
    lens: torch.Tensor
    bounds: list[int]  # worker i runs rows bounds[i]..bounds[i + 1]
    scratch: torch.Tensor  # [workers, Hq * max_len]


def plan_decode(block_tables: torch.Tensor, context_lens: torch.Tensor, num_heads: int) -> DecodePlan:
    """Split the rows so each worker reads about the same number of cached tokens."""
    b = block_tables.shape[0]
    lens = context_lens.contiguous()
    workers = max(1, min(torch.get_num_threads(), b))
    if workers == 1:
        bounds, max_len = [0, b], int(lens.max())
    else:
        cum = lens.cumsum(0)
        targets = torch.arange(1, workers, dtype=cum.dtype) * int(cum[-1]) // workers
        bounds = [0, *torch.searchsorted(cum, targets, right=True).tolist(), b]
        max_len = int(lens.max())
    scratch = torch.empty(workers, num_heads * max_len, dtype=torch.float32)
    return DecodePlan(block_tables.contiguous(), lens, bounds, scratch)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 plan: DecodePlan | None = None) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] against each row's cached keys, read through its table.

    A step passes the plan it made once (plan_decode) to every layer's call.
    """
    lib = _library()
    b, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    plan = plan or plan_decode(block_tables, context_lens, hq)
    q = q.contiguous()
    out = torch.empty_like(q)
    scale = 1.0 / d**0.5
    tables, bounds = plan.tables, plan.bounds

    def run(i: int) -> None:  # ctypes drops the GIL for the call: workers run in parallel
        lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                             plan.lens.data_ptr(), out.data_ptr(), bounds[i], bounds[i + 1], hq, hkv, d, bs,
                             tables.shape[1], scale, plan.scratch[i].data_ptr())

    if len(bounds) == 2:
        run(0)
    else:
        list(_pool(len(bounds) - 1).map(run, range(len(bounds) - 1)))
    return out
