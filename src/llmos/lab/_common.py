"""What every lab shares: the model, an engine of a given KV size, and writing the JSON and PNG."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
SIZES = ("small", "full")


@dataclass
class LabResult:
    name: str
    data: dict[str, Any]  # every number the figure shows
    summary: str  # what the figure shows, in words, for the terminal
    json_path: Path
    png_path: Path


def default_out_dir() -> Path:
    from llmos.home import llmos_home

    return llmos_home() / "lab"


def run_lab(name: str, out_dir: Path | str | None = None, size: str = "full", model: Any = None) -> LabResult:
    """Run lab `name` at `size`, write `name.json` and `name.png` under `out_dir`, return them."""
    from llmos.lab import LABS

    if name not in LABS:
        raise ValueError(f"no lab named {name!r}; the labs are {', '.join(LABS)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    lab = importlib.import_module(f"llmos.lab.{name}")
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    data = lab.run(size, model if model is not None else load())
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    lab.plot(data, png_path)
    return LabResult(name, data, lab.describe(data), json_path, png_path)


def load(model: str = MODEL) -> Any:
    """The model, loaded once and shared by every engine a lab builds."""
    from llmos.models.loader import load_model

    return load_model(model)


def engine(loaded: Any, num_blocks: int, **config: Any) -> Any:
    """An engine whose KV pool is exactly `num_blocks` blocks."""
    from llmos.engine import LLMEngine
    from llmos.engine.config import EngineConfig
    from llmos.engine.kv_cache import KVCache, kv_dtype

    cfg = EngineConfig(**config)
    dtype = kv_dtype(loaded.model, cfg.torch_dtype, cfg.torch_device)
    block_bytes = KVCache.block_bytes(loaded.config, cfg.block_size, dtype)
    e = LLMEngine(loaded, kv_budget=num_blocks * block_bytes, **config)
    assert e.blocks.num_blocks == num_blocks, (e.blocks.num_blocks, num_blocks)
    return e


def block_bytes(e: Any) -> int:
    from llmos.engine.kv_cache import KVCache

    return KVCache.block_bytes(e.model_config, e.config.block_size, e.kv_dtype)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write a lab's figure to `path` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
