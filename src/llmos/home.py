"""The llmos home directory: state that outlives a process (caches now; later agents, audit)."""

from __future__ import annotations

import os
from pathlib import Path


def llmos_home() -> Path:
    """Where llmos keeps its state: $LLMOS_HOME, else ~/.llmos."""
    return Path(os.environ.get("LLMOS_HOME") or "~/.llmos").expanduser()


def cache_dir() -> Path:
    """Disposable files (dequantized weights, built kernels): deleting it loses only time."""
    return llmos_home() / "cache"
