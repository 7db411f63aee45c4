"""Adversarial: one sandboxed call tries to take more than its share of disk, memory and processes.

The totals hold per call (memory, processes) and per workdir (disk), not only
per process: many files, many processes, each under its own rlimit, still stop.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmos.security import fs
from llmos.security.cgroups import support
from llmos.security.sandbox import SandboxLimits, isolation, run_sandboxed, sandbox_python

MiB = 1 << 20


def _sh(cmd: str) -> list[str]:
    return ["/bin/sh", "-c", cmd]


def test_parallel_writers_stay_under_the_workdir_quota(tmp_path: Path):
    """The issue's case: hundreds of MB in a fraction of a second, from several processes at once."""
    (tmp_path / "keep.txt").write_bytes(b"k" * 100_000)
    time.sleep(0.1)  # older than the call by more than a clock tick
    cmd = "for i in 1 2 3 4 5 6; do head -c 64000000 /dev/zero > f$i & done; wait; sleep 5"
    r = run_sandboxed(_sh(cmd), tmp_path, SandboxLimits(disk_mb=8, wall_s=20))
    assert not r.timed_out and r.wall_s < 5
    assert any(n.startswith("killed: the working directory reached") and "quota of 8 MiB" in n
               for n in r.notes), r.notes
    assert any(n.startswith("disk quota of 8 MiB exceeded: removed the") for n in r.notes), r.notes
    assert fs.usage(tmp_path).bytes <= 8 * MiB
    assert (tmp_path / "keep.txt").read_bytes() == b"k" * 100_000  # older files are the agent's to keep


def test_a_single_file_grows_only_to_what_is_left(tmp_path: Path):
    (tmp_path / "old").write_bytes(b"o" * (3 * MiB))
    r = run_sandboxed(_sh("head -c 10000000 /dev/zero > big; echo status $?"), tmp_path,
                      SandboxLimits(disk_mb=4, fsize_mb=64))
    assert (tmp_path / "big").stat().st_size <= 1 * MiB + 64 * 1024  # what the quota left, at most
    assert fs.usage(tmp_path).bytes <= 4 * MiB
    assert r.exit_code == 0 and "status 0" not in r.stdout


def test_many_small_files_are_a_total_too(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fs, "MAX_WALK_ENTRIES", 500)
    code = "import os\nfor i in range(100000):\n    open(f'f{i}', 'w').close()\n"
    r = run_sandboxed([sandbox_python(), "-I", "-c", code], tmp_path, SandboxLimits(wall_s=30))
    assert any("past its quota" in n and "500 entries" in n for n in r.notes), r.notes
    assert fs.usage(tmp_path).complete  # the files it made were removed again


def test_over_quota_already_may_not_grow(tmp_path: Path):
    (tmp_path / "old").write_bytes(b"o" * (2 * MiB))
    time.sleep(0.1)
    r = run_sandboxed(_sh("echo more > new; ls"), tmp_path, SandboxLimits(disk_mb=1))
    assert (tmp_path / "new").stat().st_size == 0  # no byte more fits: the write failed
    assert (tmp_path / "old").stat().st_size == 2 * MiB  # an agent that is over can still clean up
    r = run_sandboxed(_sh("rm old && echo removed"), tmp_path, SandboxLimits(disk_mb=1))
    assert r.stdout == "removed\n" and not (tmp_path / "old").exists()


HOG = """
import os, time
for _ in range(2):
    if os.fork() == 0:
        break
x = b"m" * (300 << 20)  # written, so resident
print("holding", flush=True)
time.sleep(20)
"""


def test_memory_of_all_processes_together_is_bounded(tmp_path: Path):
    """Three processes of 300 MB each, every one under its 1 GiB address-space rlimit: 900 MB in total."""
    r = run_sandboxed([sandbox_python(), "-I", "-c", HOG], tmp_path,
                      SandboxLimits(memory_mb=1024, total_memory_mb=512, wall_s=20))
    assert not r.timed_out and r.wall_s < 15
    limit_notes = [n for n in r.notes if "512 MiB" in n]
    assert limit_notes, r.notes
    if not isolation()["cgroup"]:
        assert limit_notes[0].startswith("killed: its processes held")


def test_small_calls_are_untouched(tmp_path: Path):
    r = run_sandboxed(_sh("head -c 100000 /dev/zero > f; echo ok"), tmp_path, SandboxLimits(disk_mb=1))
    assert (r.exit_code, r.stdout, r.notes) == (0, "ok\n", [])
    assert (tmp_path / "f").stat().st_size == 100_000


@pytest.mark.skipif(not support().available, reason=f"no delegated cgroup v2 here: {support().reason}")
def test_cgroup_pids_limit_counts_the_call(tmp_path: Path):
    r = run_sandboxed(_sh("for i in $(seq 40); do sleep 3 & done; wait"), tmp_path,
                      SandboxLimits(nproc=8, wall_s=10))
    assert any("the limit of 8 processes for the call refused" in n for n in r.notes), r.notes


DEEP = """
import os, time
for i in range(300):
    os.mkdir('d')
    os.chdir('d')
print('deep', flush=True)
time.sleep(10)
"""


def test_a_tree_too_deep_to_measure_stops_the_call_and_can_be_removed(tmp_path: Path):
    """Deep nesting would exhaust the walker's recursion or fds and blind the quota: it is a bound too."""
    from llmos.tools.base import ToolContext, ToolError
    from llmos.tools.files import file_tools

    r = run_sandboxed([sandbox_python(), "-I", "-c", DEEP], tmp_path, SandboxLimits(wall_s=20))
    assert not r.timed_out and r.wall_s < 10
    assert any(n.startswith("killed: the working directory reached") and "64 levels" in n for n in r.notes)
    assert not fs.usage(tmp_path).complete
    tools = {t.name: t for t in file_tools()}
    ctx = ToolContext(pid=1, agent="a", workdir=tmp_path, home=tmp_path)
    listing = tools["list_files"].fn({"recursive": True}, ctx)
    assert listing.splitlines()[-1] == "[listing cut at 1000 entries or 64 levels]"
    with pytest.raises(ToolError, match="remove some first"):
        tools["write_file"].fn({"path": "x", "content": "y"}, ctx)
    r = run_sandboxed(_sh("rm -rf d && echo clean"), tmp_path)  # the agent can still clean up
    assert r.stdout == "clean\n" and r.notes == [] and fs.usage(tmp_path).complete


MEMFD = """
import os, time
fds = []
for i in range(20):
    fd = os.memfd_create(f"m{i}")
    for _ in range(40):
        os.write(fd, b"m" * (1 << 20))
    fds.append(fd)
print("held", len(fds), flush=True)
time.sleep(10)
"""

UNLINKED = """
import os, time
files = []
for i in range(40):
    f = open(f"f{i}", "wb")
    f.write(b"x" * (8 << 20))
    f.flush()
    os.unlink(f"f{i}")
    files.append(f)
print("held", len(files), flush=True)
time.sleep(10)
"""


def test_memory_held_in_memfds_counts(tmp_path: Path):
    """800 MB in memory files that are never mapped: no RSS, no address space, still memory."""
    r = run_sandboxed([sandbox_python(), "-I", "-c", MEMFD], tmp_path,
                      SandboxLimits(total_memory_mb=512, wall_s=20))
    assert not r.timed_out and r.wall_s < 10 and "held 20" not in r.stdout
    assert any("512 MiB" in n for n in r.notes), r.notes


def test_unlinked_open_files_count_against_the_quota(tmp_path: Path):
    """320 MB written to files removed at once but kept open: invisible to a walk, still disk."""
    r = run_sandboxed([sandbox_python(), "-I", "-c", UNLINKED], tmp_path,
                      SandboxLimits(disk_mb=64, wall_s=20))
    assert not r.timed_out and r.wall_s < 10 and "held 40" not in r.stdout
    assert any(n.startswith("killed: the working directory reached") for n in r.notes), r.notes
