"""Native kernels: a C source built once with the system compiler, loaded with ctypes.

The build is keyed by the source (with the headers it includes by a quoted path relative to its own
directory), the flags and the machine, written into the
llmos cache directory under a temporary name and renamed into place, so
concurrent builders agree and a changed source rebuilds. Where no compiler
works (or LLMOS_NATIVE=0), `build_library` returns None and callers keep their
PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from llmos.home import cache_dir

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math"]


def build_library(source: Path, what: str = "kernel", defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The shared library built from `source` (with these preprocessor names defined), or None
    where it cannot be built."""
    if os.environ.get("LLMOS_NATIVE", "1") == "0":
        return None
    flags = FLAGS + [f"-D{d}" for d in defines]
    text = source.read_bytes() + b"".join(h.read_bytes() for h in _local_headers(source))
    key = hashlib.sha256(text + " ".join(flags).encode() + os.uname().machine.encode()).hexdigest()
    target = cache_dir() / "native" / f"{source.stem}-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        compiler = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            try:
                subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm", "-lpthread"],
                               check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"llmos: {what} not built ({e}); using PyTorch", file=sys.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders agree
    return ctypes.CDLL(str(target))


def _local_headers(source: Path) -> list[Path]:
    """The headers `source` includes with quotes, relative to its directory (they change the build too)."""
    names = re.findall(rb'^\s*#\s*include\s+"([^"]+)"', source.read_bytes(), flags=re.MULTILINE)
    return [source.parent / n.decode() for n in names if (source.parent / n.decode()).is_file()]
