"""The CPU decode-attention kernel (paged_attention.c), built once with the system compiler.

Pure PyTorch must gather every sequence's blocks into a padded copy each
layer of each step; on a CPU that copy costs more than the whole model's
matmuls. The kernel reads blocks in place (float32 or float16 caches), one
item per (piece of 256 tokens of a sequence's context, KV head: the query
heads of its group read each key and value row once), shared out by the
quantized kernels' thread pool (models/quant.py), so even a single stream's
attention uses every core. Built on first use into the llmos cache directory;
where no compiler works, the engine keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from llmos.models import quant
from llmos.models.cbuild import build_library


@cache
def _library() -> ctypes.CDLL | None:
    if not quant.available():
        return None
    lib = build_library(Path(__file__).with_name("paged_attention.c"), what="CPU attention kernel")
    if lib is None:
        return None
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.paged_decode.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i, ctypes.c_float, i64, p]
    lib.paged_decode.restype = None
    lib.cache_write.argtypes = [p, p, i64, p, i64, i64, p, p, i64, i]
    lib.cache_write.restype = i
    return lib


def available() -> bool:
    return _library() is not None


@dataclass
class DecodePlan:
    """What a step's decode attention needs in every layer, computed once per step."""

    tables: torch.Tensor  # [B, max_blocks], contiguous
    lens: torch.Tensor  # [B], contiguous
    total_tokens: int  # the sum of lens: the step's work


def plan_decode(block_tables: torch.Tensor, context_lens: torch.Tensor) -> DecodePlan:
    lens = context_lens.contiguous()
    return DecodePlan(block_tables.contiguous(), lens, int(lens.sum()))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 plan: DecodePlan | None = None) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] against each row's cached keys, read through its table.

    A step passes the plan it made once (plan_decode) to every layer's call.
    """
    lib = _library()
    assert lib is not None, "check available() first"
    b, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    plan = plan or plan_decode(block_tables, context_lens)
    q = q.contiguous()
    out = torch.empty_like(q)
    lib.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), plan.tables.data_ptr(),
                     plan.lens.data_ptr(), out.data_ptr(), b, hq, hkv, d, bs, plan.tables.shape[1],
                     _half(k_cache), 1.0 / d**0.5, plan.total_tokens, quant.parallel_for_address())
    return out


def _half(cache: torch.Tensor) -> int:
    """1 for a float16 cache, 0 for float32 (the kernels' two element types)."""
    if cache.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"the CPU kernels keep KV in float32 or float16, not {cache.dtype}")
    return int(cache.dtype == torch.float16)


def write_cache(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> bool:
    """k_cache's and v_cache's rows at `slots` = k and v [T, Hkv, D], in one call; False (nothing
    written) where k and v's layout does not allow it (the caller then copies with PyTorch).

    The caches must be contiguous float32 or float16 [blocks, block_size, Hkv, D] (paged_decode's;
    float16 rounds to nearest); k and v float32, each row contiguous, rows equally strided (views into a fused
    q/k/v projection do). A slot outside the cache raises IndexError with nothing written.
    """
    t, hkv, d = k.shape
    stride = k.stride()
    if stride[1:] != (d, 1) or v.stride() != stride or k.dtype != torch.float32:
        return False
    lib = _library()
    assert lib is not None, "check available() first"
    num_slots = k_cache.numel() // (hkv * d)
    if lib.cache_write(k.data_ptr(), v.data_ptr(), stride[0], slots.data_ptr(), t, hkv * d,
                       k_cache.data_ptr(), v_cache.data_ptr(), num_slots, _half(k_cache)):
        raise IndexError(f"a KV slot is outside the cache's {num_slots} slots")
    return True
