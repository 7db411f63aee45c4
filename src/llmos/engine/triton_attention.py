"""Paged decode attention for CUDA in Triton: reads KV blocks in place, like the CPU kernel.

One program per (sequence, query head) walks the sequence's block table in
tiles of tokens with an online softmax (FlashAttention's recurrence), so a
decode step reads each cached key and value once, with no gathered copy and
no padding to the longest sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    stride_qb, stride_qh, stride_kslot, stride_kh, stride_tb, stride_ob, stride_oh,
    scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    hkv = hq // GROUP
    length = tl.load(lens_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + d).to(tl.float32)
    m = tl.max(tl.full([TILE], float("-inf"), tl.float32), axis=0)
    denom = tl.sum(tl.zeros([TILE], tl.float32), axis=0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, length, TILE):
        t = start + tl.arange(0, TILE)
        valid = t < length
        block = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
        offs = slot[:, None] * stride_kslot + hkv * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        denom = denom * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / denom
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; tables [B, max_blocks]."""
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = block_tables.contiguous()
    _paged_decode_kernel[(b, hq)](
        q, k_cache, v_cache, tables, context_lens.contiguous(), out,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), 1.0 / d**0.5,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_SIZE=block_size, TILE=64,
    )
    return out
