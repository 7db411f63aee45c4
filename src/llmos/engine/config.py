"""Engine configuration, validated once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch


class ConfigError(ValueError):
    """An engine setting that cannot work; the message names the setting, the value given and
    what would do (a request the engine refuses is an InvalidRequestError instead)."""


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
          "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(value: str | int | float) -> int | float:
    """'512MiB' -> bytes; a float in (0, 1] stays a fraction of free device memory."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a size (try 512MiB, 2GiB or 0.5)")
    number = float(m.group(1))
    if not m.group(2) and number <= 1:
        return number
    return int(number * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_budget: int | float | str = 0.9  # bytes, or a fraction of free memory (after weights)
    swap_space: int | str = "1GiB"  # host memory for swapped-out KV blocks
    max_num_seqs: int | None = None  # running sequences at most (64 on CPU, 256 on CUDA)
    max_num_batched_tokens: int | None = None  # tokens per step (512 on CPU, 8192 on CUDA)
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    preemption_mode: str = "auto"  # "recompute", "swap", or "auto" (swap while it fits)
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    # Weights: "auto" keeps a GGUF's own quantization on the CPU unless a dtype is given;
    # "gguf", "int8" (per output channel) or "none" (dequantized to dtype).
    quantization: str = "auto"
    device: str = "auto"
    kv_cpu_cap: str = "2GiB"  # upper bound of the KV pool on CPU when given as a fraction

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ConfigError(
                f"preemption_mode must be recompute, swap or auto, got {self.preemption_mode!r}")
        cuda = self.torch_device.type == "cuda"
        if self.max_num_seqs is None:
            self.max_num_seqs = 256 if cuda else 64
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if cuda else 512
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv_budget = parse_bytes(self.kv_budget)
        self.swap_space = int(parse_bytes(self.swap_space))
        if isinstance(self.kv_budget, float) and not 0 < self.kv_budget <= 1:
            raise ConfigError(f"kv_budget fraction must be in (0, 1], got {self.kv_budget}")
        from llmos.models.loader import QUANTIZATIONS

        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")

    @property
    def weight_quantization(self) -> str:
        """What load_model gets: an explicit dtype means dequantized weights of that dtype."""
        if self.quantization == "auto" and self.dtype != "auto":
            return "none"
        return self.quantization

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[self.dtype]
        except KeyError:
            raise ConfigError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}") from None

    def kv_budget_bytes(self) -> int:
        """The KV pool's size in bytes, resolving a fraction against free memory now."""
        if isinstance(self.kv_budget, int):
            return self.kv_budget
        device = self.torch_device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * self.kv_budget)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(free * self.kv_budget, parse_bytes(self.kv_cpu_cap)))
