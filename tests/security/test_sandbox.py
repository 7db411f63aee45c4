"""The sandbox contains every escape of the suite; the limits and the timeout hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.security.escapes import ESCAPES, run_escape
from llmos.security.sandbox import SandboxLimits, isolation, run_sandboxed

needs_namespaces = pytest.mark.skipif(not isolation()["namespaces"],
                                      reason=f"no namespaces here: {isolation()['reason']}")


@needs_namespaces
@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_contained(name):
    outcome = run_escape(name)
    assert outcome.mode == "namespaces"
    assert outcome.contained, outcome.detail
    assert outcome.held == outcome.tried >= 1, outcome.detail


@needs_namespaces
def test_inside_view(tmp_path: Path):
    (tmp_path / "in.txt").write_text("data\n")
    r = run_sandboxed(["/bin/sh", "-c", "id -u; pwd; cat in.txt; echo out > out.txt; env | sort; ls /"],
                      tmp_path)
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[:3] == ["65534", "/work", "data"]
    assert (tmp_path / "out.txt").read_text() == "out\n"
    env = {line.split("=", 1)[0] for line in lines if "=" in line}
    assert env == {"HOME", "LANG", "LC_ALL", "PATH", "PWD", "PYTHONDONTWRITEBYTECODE", "TMPDIR"}
    assert "work" in lines and "home" not in lines


def test_exit_code_output_and_truncation(tmp_path: Path):
    r = run_sandboxed(["/bin/sh", "-c", "echo hi; echo err >&2; exit 3"], tmp_path)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (3, "hi\n", "err\n", False)
    r = run_sandboxed(["/bin/sh", "-c", "yes | head -c 100000"], tmp_path, SandboxLimits(output_bytes=1000))
    assert len(r.stdout) == 1000 and r.truncated and "output truncated to 1000 bytes" in r.notes


def test_wall_clock_timeout(tmp_path: Path):
    r = run_sandboxed(["/bin/sh", "-c", "sleep 20"], tmp_path, SandboxLimits(wall_s=0.5))
    assert r.timed_out and r.wall_s < 5 and r.exit_code == 137
    assert r.notes == ["killed after the wall-clock limit of 0.5 s"]


def test_file_size_limit(tmp_path: Path):
    cmd = ["/bin/sh", "-c", "head -c 3000000 /dev/zero > big"]
    r = run_sandboxed(cmd, tmp_path, SandboxLimits(fsize_mb=1))
    assert r.exit_code != 0 and (tmp_path / "big").stat().st_size == 1 << 20


def test_bad_input(tmp_path: Path):
    with pytest.raises(ValueError, match="must be an absolute path"):
        run_sandboxed(["sh", "-c", "true"], tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        run_sandboxed(["/bin/true"], tmp_path / "nope")
    r = run_sandboxed(["/nonexistent/prog"], tmp_path)
    assert r.exit_code == 127 and "cannot start /nonexistent/prog" in r.stderr
