"""Quantized weights: GGML block formats kept packed in memory and multiplied in place.

A GGUF file's Q4_0, Q4_1 and Q8_0 tensors are loaded as their bytes (4.5 to
8.5 bits a weight instead of 32), and a QuantizedLinear multiplies with them
directly through quant_matmul.c: the activations are quantized to 16 bits per
block of 32 (llama.cpp's 8 bits move this model's logits by ~5%; 16 bits keep
them near fp32) and each block product is an integer dot product. Hugging
Face weights can be quantized at load to int8 per output channel, stored as
Q8_0 blocks whose scales repeat the channel's (exact, so one kernel serves both).

Each product's output rows are shared between the calling thread and a
persistent pool of workers in the C library (pool.h; LLMOS_NUM_THREADS threads,
else the CPUs the process may run on), and for fewer than DENSE_MIN_ROWS rows a decoder
layer's work around attention runs in two calls (fused_norm_qkv, fused_out_mlp).

Guarantees: below DENSE_MIN_ROWS input rows a QuantizedLinear's output equals
dequantize(weight) @ dequantize(quantize_activations(x)) up to float rounding,
and a row's result does not depend on the rows beside it nor on the thread count;
the fused calls compute the layer's operations the same way, row by row; from there it equals
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


class QuantFormat(IntEnum):
    """The supported formats, valued as GGML's type ids."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8

    @property
    def block_bytes(self) -> int:
        return {QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20, QuantFormat.Q8_0: 34}[self]


@dataclass
class QuantWeight:
    """A [rows, cols] weight as packed blocks: uint8 [rows, cols / 32 * block_bytes]."""

    blocks: torch.Tensor
    fmt: QuantFormat
    cols: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.shape[0], self.cols))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (for references and the fallback), via gguf.quants."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        arr = dequantize(self.blocks.numpy(), GGMLQuantizationType(int(self.fmt)))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(self.shape))


def cat_weights(parts: list[torch.Tensor | QuantWeight]) -> torch.Tensor | QuantWeight:
    """Concatenate rows; weights of one format stay packed, a mix is dequantized first."""
    packed = [p for p in parts if isinstance(p, QuantWeight)]
    if len(packed) == len(parts) and len({p.fmt for p in packed}) == 1:
        blocks = np.concatenate([p.blocks.numpy() for p in packed])
        return QuantWeight(torch.from_numpy(blocks), packed[0].fmt, packed[0].cols)
    dense = [p.dequantize() if isinstance(p, QuantWeight) else p for p in parts]
    return torch.from_numpy(np.concatenate([p.numpy() for p in dense]))


def quantize(w: torch.Tensor, fmt: QuantFormat) -> QuantWeight:
    """Quantize an fp32 weight [rows, cols] to a GGML format (gguf.quants' rounding)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    blocks = gguf_quantize(w.float().numpy(), GGMLQuantizationType(int(fmt)))
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(blocks)), fmt, w.shape[1])


def quantize_int8_per_channel(w: torch.Tensor) -> QuantWeight:
    """int8 per output channel (scale = max|row| / 127, in fp16), stored as Q8_0 blocks.

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
    return QuantWeight(blocks.view(rows, nb * 34), QuantFormat.Q8_0, cols)


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
    lib.quant_matmul.argtypes = [i, p, i64, i64, p, p, p, i64, p]
    lib.quantize_act_rows.argtypes = [p, i64, i64, p, p, p]
    lib.dequant_rows.argtypes = [i, p, i64, p, i64, p]
    f = ctypes.c_float
    lib.fused_norm_qkv.argtypes = [p, i64, i64, p, f, i, p, i64, p, p, p, i64, i64, p, p, i64]
    lib.fused_out_mlp.argtypes = [p, p, i64, i64, i64, i, p, p, f, i, p, i64, i, p, p, p, i64]
    lib.quant_parallel_for.argtypes = [i64, i64, p, p]
    lib.quant_parallel_for.restype = None
    lib.fused_scratch_bytes.argtypes = [i64, i64]
    lib.fused_scratch_bytes.restype = i64
    for fn in (lib.quant_linear, lib.quant_matmul, lib.quantize_act_rows, lib.dequant_rows,
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


_scratch = _Scratch(torch.uint8)  # the activations' 16-bit blocks
_tiles = _Scratch(torch.float32)  # dequantized weight tiles for many-row inputs
DENSE_MIN_ROWS = 16  # from this many input rows, dequantized tiles and sgemm beat the integer kernel
_TILE_ELEMENTS = 2**19  # 2 MiB of fp32 weight rows at a time: cache-sized, never a whole matrix


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (q int16 [M, K], d [M, K/32], s = d * sum(q) [M, K/32])."""
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int16)
    d = torch.empty(m, k // BLOCK)
    s = torch.empty(m, k // BLOCK)
    _require_library().quantize_act_rows(x.data_ptr(), m, k, q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q, d, s


def quant_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] fp32 @ w.T -> [M, N] fp32, reading w's blocks in place."""
    lib = _require_library()
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    if k != w.cols:
        raise ValueError(f"input has {k} features, the weight expects {w.cols}")
    n = w.blocks.shape[0]
    if m >= DENSE_MIN_ROWS:
        return _dense_tiles_linear(lib, x, w)
    out = torch.empty(m, n)
    scratch = _scratch.get(2 * m * k + 8 * m * (k // BLOCK)).data_ptr()
    lib.quant_linear(int(w.fmt), w.blocks.data_ptr(), n, k, x.data_ptr(), m, out.data_ptr(), scratch)
    return out


def _dense_tiles_linear(lib: ctypes.CDLL, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Many rows: dequantize the weight a cache-sized tile of rows at a time and use sgemm.

    The fp32 activations are used as they are (no 16-bit rounding), so a batch this
    large computes a little more exactly than single rows do.
    """
    m, k = x.shape
    n = w.blocks.shape[0]
    out = torch.empty(m, n)
    rows = max(1, _TILE_ELEMENTS // k)
    buf = _tiles.get(min(rows, n) * k)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = buf[: (r1 - r0) * k].view(r1 - r0, k)
        lib.dequant_rows(int(w.fmt), w.blocks[r0].data_ptr(), k, None, r1 - r0, tile.data_ptr())
        if r0 == 0 and r1 == n:
            torch.mm(x, tile.T, out=out)
        else:
            out[:, r0:r1] = x @ tile.T
    return out


def fused_norm_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv: QuantizedLinear,
                   rope_tables: tuple[torch.Tensor, torch.Tensor], rotated_heads: int,
                   head_dim: int) -> torch.Tensor:
    """rope(rmsnorm(x) @ qkv.T + bias) for fewer than DENSE_MIN_ROWS rows x [M, H], in one call.

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
                       qkv.qweight.blocks.data_ptr(), n, bias, cos.data_ptr(), sin.data_ptr(),
                       rotated_heads, head_dim, out.data_ptr(), scratch.data_ptr(), width)
    return out


def fused_out_mlp(x: torch.Tensor, attn: torch.Tensor, o_proj: QuantizedLinear, norm_weight: torch.Tensor,
                  eps: float, gate_up: QuantizedLinear, down: QuantizedLinear) -> torch.Tensor:
    """y + down(silu(gate) * up), y = x + o_proj(attn), gate|up = gate_up(rmsnorm(y)), in one call.

    For fewer than DENSE_MIN_ROWS rows; x [M, H], attn [M, A]; no biases.
    """
    lib = _require_library()
    m, h = x.shape
    a, inter = attn.shape[1], down.in_features
    out = torch.empty(m, h)
    width = max(h, a, 2 * inter)
    scratch = _scratch.get(lib.fused_scratch_bytes(m, width))
    lib.fused_out_mlp(x.data_ptr(), attn.data_ptr(), m, h, a, int(o_proj.qweight.fmt),
                      o_proj.qweight.blocks.data_ptr(), norm_weight.data_ptr(), eps,
                      int(gate_up.qweight.fmt), gate_up.qweight.blocks.data_ptr(), inter,
                      int(down.qweight.fmt), down.qweight.blocks.data_ptr(), out.data_ptr(),
                      scratch.data_ptr(), width)
    return out


class QuantizedLinear(nn.Module):
    """nn.Linear's job (y = x W^T + b) with W kept packed."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.in_features, self.out_features = weight.cols, weight.blocks.shape[0]
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
        self.num_embeddings, self.embedding_dim = weight.blocks.shape[0], weight.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        out = torch.empty(flat.numel(), self.embedding_dim)
        _require_library().dequant_rows(int(self.qweight.fmt), self.qweight.blocks.data_ptr(),
                                        self.embedding_dim, flat.data_ptr(), flat.numel(), out.data_ptr())
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qweight.fmt.name}"
