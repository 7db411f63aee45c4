"""The KV pool: device blocks for all layers in one tensor, plus host blocks for swap."""

from __future__ import annotations

import torch
from torch import nn

from llmos.models.config import ModelConfig


def kv_dtype(model: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What the cache of an engine running `model` holds (kv_dtype_for its weights)."""
    from llmos.models.quant import QuantizedLinear

    return kv_dtype_for(any(isinstance(m, QuantizedLinear) for m in model.modules()), dtype, device)


def kv_dtype_for(quantized: bool, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float16 beside quantized weights on the CPU, else the model's dtype.

    There a decode step reads every cached token once per layer from memory, so half the bytes
    is up to half the attention's time (llama.cpp's default cache is f16 too); fp32 weights
    keep an fp32 cache, which reproduces the dense computation exactly.
    """
    from llmos.engine import native

    if device.type == "cpu" and dtype == torch.float32 and quantized and native.available():
        return torch.float16
    return dtype


class KVCache:
    """Physical memory of the paged KV cache.

    Layout [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]: one block
    index moves a block's K and V of every layer at once (swap, copy-on-write).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        num_swap_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed: masked-out slots are multiplied by zero weights, and garbage could be NaN.
        self.kv = _zeros(shape, dtype, device)
        host_shape = (*shape[:2], num_swap_blocks, *shape[3:])
        pin = device.type == "cuda"
        self.host = torch.zeros(host_shape, dtype=dtype, pin_memory=True) if pin else _zeros(
            host_shape, dtype, torch.device("cpu"))

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.kv_bytes_per_token * block_size * dtype.itemsize

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: (device block, host block) pairs."""
        if pairs:
            src, dst = zip(*pairs, strict=True)
            self.host[:, :, list(dst)] = self.kv[:, :, list(src)].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: (host block, device block) pairs."""
        if pairs:
            src, dst = zip(*pairs, strict=True)
            self.kv[:, :, list(dst)] = self.host[:, :, list(src)].to(self.kv.device, non_blocking=True)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device block to device block, in order."""
        for src, dst in pairs:
            self.kv[:, :, dst] = self.kv[:, :, src]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU from calloc'ed pages, so a large pool costs memory only once used."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16):
        import numpy as np
        from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]

        # numpy asks for transparent huge pages on large arrays: a written slot would then make
        # 2 MiB resident in each layer; with small pages only the slots used cost memory.
        before = _set_madvise_hugepage(False)
        try:
            element = np.float32 if dtype == torch.float32 else np.float16
            return torch.from_numpy(np.zeros(shape, dtype=element))
        finally:
            _set_madvise_hugepage(before)
    return torch.zeros(shape, dtype=dtype, device=device)
