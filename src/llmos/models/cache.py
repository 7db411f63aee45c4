"""Dequantized-weight cache: a GGUF file is dequantized once, later loads map the result.

Dequantizing a GGUF costs seconds of numpy work on every start; mapping a safetensors
file costs milliseconds and shares pages with the OS page cache. An entry is keyed by
the GGUF file's path, size and mtime (and the cache format), so a changed file misses.
Entries are written to a temporary file and renamed into place, so a reader never sees
a partial one; an entry that cannot be read is deleted and counts as a miss. The cache
is disposable: deleting $LLMOS_HOME/cache loses nothing but time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from llmos.home import cache_dir

CACHE_FORMAT = 1  # bump when the cached tensors' names or layout change
log = logging.getLogger(__name__)


def weight_cache_path(source: Path) -> Path:
    """The cache entry for a GGUF file as it is now."""
    st = source.stat()
    key = f"{CACHE_FORMAT}:{source.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{digest}.safetensors"


def load_cached_weights(entry: Path) -> dict[str, torch.Tensor] | None:
    """The cached tensors (memory-mapped, copy-on-write), or None on a miss."""
    from safetensors.torch import load_file

    if not entry.is_file():
        return None
    try:
        return load_file(str(entry))
    except Exception as e:  # any damage to a disposable entry means: rebuild it
        log.warning("discarding unreadable weight cache %s: %s", entry, e)
        entry.unlink(missing_ok=True)
        return None


def save_cached_weights(entry: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write an entry atomically; failing to cache is logged, never fatal."""
    from safetensors.torch import save_file

    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp)
        os.replace(tmp, entry)
        tmp = None
    except OSError as e:
        log.warning("cannot write weight cache %s: %s", entry, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
