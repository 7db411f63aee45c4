"""`llmos serve`'s replica options are checked before anything loads (no model, no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LLMOS = str(Path(sys.executable).with_name("llmos"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--replicas", "2", "--router", "random"], "--router one of prefix, least-loaded, round-robin"),
])
def test_bad_replica_options_fail_with_one_line(flags: list[str], message: str, tmp_path) -> None:
    out = subprocess.run([LLMOS, "serve", "--port", "0", *flags], capture_output=True, text=True, timeout=120,
                         env={"LLMOS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert message in " ".join(out.stderr.split()) and "Traceback" not in out.stderr
