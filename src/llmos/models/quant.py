"""Quantized weights: GGML block formats kept packed in memory and multiplied in place.

A GGUF file's Q4_0, Q4_1 and Q8_0 tensors are loaded as their bytes (4.5 to
8.5 bits a weight instead of 32), rearranged once into the kernel's layout
(GGMLWeight.pack: rows in groups of 16, so that one 64-byte load feeds a VNNI
dot product for 16 output rows; the same bits per weight, and exactly undone
by QuantWeight.to_ggml). A QuantizedLinear multiplies with them directly
through quant_matmul.c: the activations are quantized to 15 bits per block of
32 (llama.cpp's 8 bits move this model's logits by ~5%; 15 bits keep them near
fp32) and each block product is exact in integers. Hugging Face weights can be
quantized at load to int8 per output channel, stored as Q8_0 blocks whose
scales repeat the channel's (exact, so one kernel serves both).

Each product's output rows are shared between the calling thread and a
persistent pool of workers in the C library (pool.h; LLMOS_NUM_THREADS threads,
else the CPUs the process may run on), and a decoder layer's work around
attention runs in two calls (fused_norm_qkv, fused_out_mlp).

Guarantees: a QuantizedLinear's output equals
dequantize(weight) @ dequantize(quantize_activations(x)) up to float rounding,
and a row's result does not depend on the rows beside it nor on the thread count
(nor on whether the AVX-512 or the portable path computed it); the fused calls
compute the layer's operations the same way, row by row; from there it equals
dequantize(weight) @ x (tests/models/test_quant.py). No fp32 copy of a whole
weight is kept. Where the C kernel cannot be built, `available()` is False and
the loader dequantizes instead.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmos.models.cbuild import build_library
from llmos.models.config import ModelError

BLOCK = 32  # weights per block, in every supported format
GROUP = 16  # weight rows interleaved in the kernel layout


class QuantFormat(IntEnum):
    """The supported formats, valued as GGML's type ids."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of 32 weights of one row, as GGUF stores it."""
        return {QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20, QuantFormat.Q8_0: 34}[self]

    @property
    def group_block_bytes(self) -> int:
        """Bytes of one block of 32 columns of 16 rows in the kernel layout."""
        return {QuantFormat.Q4_0: 288, QuantFormat.Q4_1: 320, QuantFormat.Q8_0: 544}[self]


@dataclass
class GGMLWeight:
    """A [rows, cols] weight as a GGUF file stores it: uint8 [rows, cols / 32 * block_bytes]."""

    blocks: np.ndarray
    fmt: QuantFormat
    cols: int

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (for references and the fallback), via gguf.quants."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        arr = dequantize(np.asarray(self.blocks), GGMLQuantizationType(int(self.fmt)))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, self.cols))

    def pack(self) -> QuantWeight:
        """The same weights in the kernel layout (quant_matmul.c's header): rows in groups of 16,
        per group and block the 16 rows' scales (and Q4_1 minimums), then their values four
        columns to a 32-bit lane. Exactly undone by QuantWeight.to_ggml."""
        blocks = np.ascontiguousarray(self.blocks, dtype=np.uint8)
        rows, nb = blocks.shape[0], self.cols // BLOCK
        if self.cols % BLOCK or self.cols <= 0:
            raise ModelError(f"{self.fmt.name} weight: columns must be a positive multiple of {BLOCK}, "
                             f"got {self.cols}")
        if blocks.size != rows * nb * self.fmt.block_bytes:
            raise ModelError(f"{self.fmt.name} weight of {self.cols} columns: expected "
                             f"{nb * self.fmt.block_bytes} bytes a row, got {blocks.size // max(rows, 1)}")
        data = torch.empty(-(-rows // GROUP), nb * self.fmt.group_block_bytes, dtype=torch.uint8)
        _require_library().quant_pack(int(self.fmt), blocks.ctypes.data, rows, nb, data.data_ptr())
        return QuantWeight(data, self.fmt, rows, self.cols)


@dataclass
class QuantWeight:
    """A [rows, cols] weight in the kernel layout: uint8 [ceil(rows / 16), cols / 32 * group bytes]."""

    data: torch.Tensor
    fmt: QuantFormat
    rows: int
    cols: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    def to_ggml(self) -> GGMLWeight:
        """The GGUF file's blocks for these weights (GGMLWeight.pack's inverse)."""
        fmt, nb = self.fmt, self.cols // BLOCK
        g = self.data.numpy().reshape(-1, nb, fmt.group_block_bytes)
        groups = g.shape[0]
        parts = [g[..., 0:2 * GROUP], g[..., 2 * GROUP:4 * GROUP]] if fmt is QuantFormat.Q4_1 \
            else [g[..., 0:2 * GROUP]]
        values = g[..., 2 * GROUP * len(parts):]
        scales = [p.reshape(groups, nb, GROUP, 2) for p in parts]
        if fmt is QuantFormat.Q8_0:
            q = values.reshape(groups, nb, 8, GROUP, 4).transpose(0, 1, 3, 2, 4)
            qs = q.reshape(groups, nb, GROUP, 32) ^ 0x80
        else:
            b = values.reshape(groups, nb, 4, GROUP, 4).transpose(0, 1, 3, 2, 4)
            q = np.stack([b & 0x0F, b >> 4], axis=-2).reshape(groups, nb, GROUP, 32)
            qs = q[..., :16] | (q[..., 16:] << 4)
        blocks = np.concatenate([*scales, qs], axis=-1).transpose(0, 2, 1, 3)
        return GGMLWeight(np.ascontiguousarray(blocks.reshape(groups * GROUP, -1)[: self.rows]), fmt,
                          self.cols)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (for references), via gguf.quants on the file's blocks."""
        return self.to_ggml().dequantize()


def cat_weights(parts: list[torch.Tensor | GGMLWeight]) -> torch.Tensor | GGMLWeight:
    """Concatenate rows; weights of one format stay packed, a mix is dequantized first."""
    packed = [p for p in parts if isinstance(p, GGMLWeight)]
    if len(packed) == len(parts) and len({p.fmt for p in packed}) == 1:
        return GGMLWeight(np.concatenate([p.blocks for p in packed]), packed[0].fmt, packed[0].cols)
    dense = [p.dequantize() if isinstance(p, GGMLWeight) else p for p in parts]
    return torch.from_numpy(np.concatenate([p.numpy() for p in dense]))


def quantize(w: torch.Tensor, fmt: QuantFormat) -> QuantWeight:
    """Quantize an fp32 weight [rows, cols] to a GGML format (gguf.quants' rounding)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    blocks = gguf_quantize(w.float().numpy(), GGMLQuantizationType(int(fmt)))
    return GGMLWeight(blocks, fmt, w.shape[1]).pack()


def quantize_int8_per_channel(w: torch.Tensor) -> QuantWeight:
    """int8 per output channel (scale = max|row| / 127, in fp16), as Q8_0 blocks.

    Every block of a row carries the row's scale, so the Q8_0 kernel computes the
    per-channel product exactly.
    """
    w = w.float()
    rows, cols = w.shape
    if cols % BLOCK:
        raise ModelError(f"int8 quantization needs a multiple of {BLOCK} columns, got {cols}")
    scale = (w.abs().amax(dim=1) / 127).half()
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros(()))
    q = (w * inv[:, None]).round().clamp(-127, 127).to(torch.int8)
    nb = cols // BLOCK
    blocks = torch.empty(rows, nb, 34, dtype=torch.uint8)
    blocks[:, :, :2] = scale.view(torch.uint8).view(rows, 1, 2)
    blocks[:, :, 2:] = q.view(torch.uint8).view(rows, nb, BLOCK)
    return GGMLWeight(blocks.view(rows, nb * 34).numpy(), QuantFormat.Q8_0, cols).pack()


@cache
def _library() -> ctypes.CDLL | None:
    source = Path(__file__).with_name("quant_matmul.c")
    lib = build_library(source, what="quantized matmul kernel")
    if lib is None:
        return None
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.quant_set_threads.argtypes = [i]
    lib.quant_set_threads.restype = None
    lib.quant_set_threads(num_threads())
    lib.quant_linear.argtypes = [i, p, i64, i64, p, i64, p, p]
    lib.quant_pack.argtypes = [i, p, i64, i64, p]
    lib.quantize_act_rows.argtypes = [p, i64, i64, p, p, p, p]
    lib.quant_act_bytes.argtypes = [i64, i64]
    lib.quant_act_bytes.restype = i64
    lib.dequant_rows.argtypes = [i, p, i64, p, i64, p]
    f = ctypes.c_float
    lib.fused_norm_qkv.argtypes = [p, i64, i64, p, f, i, p, i64, p, p, p, i64, i64, p, p, i64]
    lib.fused_out_mlp.argtypes = [p, p, i64, i64, i64, i, p, p, f, i, p, i64, i, p, p, p, i64]
    lib.quant_parallel_for.argtypes = [i64, i64, p, p]
    lib.quant_parallel_for.restype = None
    lib.fused_scratch_bytes.argtypes = [i64, i64]
    lib.fused_scratch_bytes.restype = i64
    lib.quant_vectorized.restype = i
    for fn in (lib.quant_linear, lib.quant_pack, lib.quantize_act_rows, lib.dequant_rows,
               lib.fused_norm_qkv, lib.fused_out_mlp):
        fn.restype = None
    return lib


def num_threads() -> int:
    """Threads that share each product: LLMOS_NUM_THREADS, else the CPUs this process may run on."""
    wanted = os.environ.get("LLMOS_NUM_THREADS", "")
    if wanted.strip():
        try:
            return max(1, int(wanted))
        except ValueError:
            raise ModelError(f"LLMOS_NUM_THREADS must be a whole number, got {wanted!r}") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_num_threads(threads: int) -> None:
    """Share each product among this many threads from now on (the caller included)."""
    _require_library().quant_set_threads(max(1, threads))


@cache
def parallel_for_address() -> int:
    """The C address of the pool's parallel-for, `void (int64 n, int64 cost, task, arg)`, for other
    kernels to share the same threads (engine/native.py)."""
    address = ctypes.cast(_require_library().quant_parallel_for, ctypes.c_void_p).value
    assert address is not None
    return address


def available() -> bool:
    """Whether the quantized kernels run here (a C compiler built them)."""
    return _library() is not None


def _require_library() -> ctypes.CDLL:
    """The quantized kernels; an error when they could not be built (check `available()` first)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the quantized matmul kernel is not available here (no C compiler, or "
                           "LLMOS_NATIVE=0): packed GGML weights cannot be used; dequantize them instead")
    return lib


class _Scratch(threading.local):
    """One growing buffer per thread, reused by each of its calls (a thread's calls run one at a time)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.buf = torch.empty(0, dtype=dtype)

    def get(self, numel: int) -> torch.Tensor:
        if self.buf.numel() < numel:
            self.buf = torch.empty(numel, dtype=self.buf.dtype)
        return self.buf[:numel]


_scratch = _Scratch(torch.uint8)  # the quantized activations


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (q int16 [M, K] in [-16383, 16383], d [M, K/32], s = d * sum(q) [M, K/32])."""
    lib = _require_library()
    x = x.float().contiguous()
    m, k = x.shape
    nb = k // BLOCK
    q = torch.empty(m, k, dtype=torch.int16)
    d, s = torch.empty(m, nb), torch.empty(m, nb)
    scratch = torch.empty(lib.quant_act_bytes(m, k), dtype=torch.uint8)
    lib.quantize_act_rows(x.data_ptr(), m, k, scratch.data_ptr(), q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q, d, s


def quant_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] fp32 @ w.T -> [M, N] fp32, reading w's blocks in place."""
    lib = _require_library()
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    if k != w.cols:
        raise ValueError(f"input has {k} features, the weight expects {w.cols}")
    out = torch.empty(m, w.rows)
    scratch = _scratch.get(lib.quant_act_bytes(m, k)).data_ptr()
    lib.quant_linear(int(w.fmt), w.data.data_ptr(), w.rows, k, x.data_ptr(), m, out.data_ptr(), scratch)
    return out


def fused_norm_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv: QuantizedLinear,
                   rope_tables: tuple[torch.Tensor, torch.Tensor], rotated_heads: int,
                   head_dim: int) -> torch.Tensor:
    """rope(rmsnorm(x) @ qkv.T + bias) for rows x [M, H], in one call.

    The first `rotated_heads` heads of each output row (queries, keys) are rotated
    by RotaryEmbedding.tables' cos and signed sin; the result is [M, N].
    """
    lib = _require_library()
    m, h = x.shape
    n = qkv.out_features
    out = torch.empty(m, n)
    width = max(h, n)
    cos, sin = (t.contiguous() for t in rope_tables)
    bias = qkv.bias.data_ptr() if qkv.bias is not None else None
    scratch = _scratch.get(lib.fused_scratch_bytes(m, width))
    lib.fused_norm_qkv(x.data_ptr(), m, h, norm_weight.data_ptr(), eps, int(qkv.qweight.fmt),
                       qkv.qweight.data.data_ptr(), n, bias, cos.data_ptr(), sin.data_ptr(),
                       rotated_heads, head_dim, out.data_ptr(), scratch.data_ptr(), width)
    return out


def fused_out_mlp(x: torch.Tensor, attn: torch.Tensor, o_proj: QuantizedLinear, norm_weight: torch.Tensor,
                  eps: float, gate_up: QuantizedLinear, down: QuantizedLinear) -> torch.Tensor:
    """y + down(silu(gate) * up), y = x + o_proj(attn), gate|up = gate_up(rmsnorm(y)), in one call.

    x [M, H], attn [M, A]; no biases.
    """
    lib = _require_library()
    m, h = x.shape
    a, inter = attn.shape[1], down.in_features
    out = torch.empty(m, h)
    width = max(h, a, 2 * inter)
    scratch = _scratch.get(lib.fused_scratch_bytes(m, width))
    lib.fused_out_mlp(x.data_ptr(), attn.data_ptr(), m, h, a, int(o_proj.qweight.fmt),
                      o_proj.qweight.data.data_ptr(), norm_weight.data_ptr(), eps,
                      int(gate_up.qweight.fmt), gate_up.qweight.data.data_ptr(), inter,
                      int(down.qweight.fmt), down.qweight.data.data_ptr(), out.data_ptr(),
                      scratch.data_ptr(), width)
    return out


class QuantizedLinear(nn.Module):
    """nn.Linear's job (y = x W^T + b) with W kept packed."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.in_features, self.out_features = weight.cols, weight.rows
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = quant_linear(x.reshape(-1, self.in_features), self.qweight)
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qweight.fmt.name}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over packed rows (dequantized per token)."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        out = torch.empty(flat.numel(), self.embedding_dim)
        _require_library().dequant_rows(int(self.qweight.fmt), self.qweight.data.data_ptr(),
                                        self.embedding_dim, flat.data_ptr(), flat.numel(), out.data_ptr())
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qweight.fmt.name}"
