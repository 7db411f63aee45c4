"""Per-call control groups (cgroup v2): one sandboxed call's memory and process count, in total.

Resource limits (rlimits) bound each process; a cgroup bounds the call as a
whole: `memory.max` (with swap off) caps the memory of every process the call
starts together, `pids.max` the number of its processes and threads, and
`cgroup.kill` ends them all at once. Each call gets its own cgroup, created
under a parent that has the memory and pids controllers delegated to us:
`$LLMOS_CGROUP` if set, otherwise the cgroup llmos itself runs in (which works
only where that cgroup may enable controllers for its children: a root
cgroup, or a delegated one such as a systemd unit with `Delegate=yes`).
`support()` says whether this machine has it and, if not, why; the sandbox
then falls back to rlimits and its own polling (security/sandbox.py).
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids")
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupSupport:
    available: bool
    parent: Path | None
    reason: str


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def _own_cgroup(mount: Path) -> Path | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    return None


def _probe(path: Path) -> None:
    """Make a child cgroup, move a short-lived process into it, remove it: what each call will do."""
    path.mkdir(exist_ok=True)
    child = subprocess.Popen(["sleep", "5"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
    finally:
        child.kill()
        child.wait()
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.01)


@functools.cache
def support() -> CgroupSupport:
    """Whether per-call cgroups with memory and pids limits work here (probed once)."""
    mount = _cgroup2_mount()
    if mount is None:
        return CgroupSupport(False, None, "no cgroup v2 file system is mounted")
    env = os.environ.get("LLMOS_CGROUP")
    parent = Path(env) if env else _own_cgroup(mount)
    if parent is None or not (parent / "cgroup.controllers").is_file():
        return CgroupSupport(False, None, f"no cgroup v2 directory for llmos under {mount}")
    have = (parent / "cgroup.controllers").read_text().split()
    missing = [c for c in CONTROLLERS if c not in have]
    if missing:
        return CgroupSupport(False, None, f"cgroup v2 at {parent} lacks the {'/'.join(missing)} controller "
                                          f"(has: {' '.join(have) or 'none'})")
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    try:
        if any(c not in enabled for c in CONTROLLERS):
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
        _probe(parent / f"llmos-probe-{os.getpid()}")
    except OSError as e:
        return CgroupSupport(False, None, f"cannot delegate {'/'.join(CONTROLLERS)} under {parent}: "
                                          f"{e.strerror} (set LLMOS_CGROUP to a delegated cgroup)")
    return CgroupSupport(True, parent, "")


@dataclass
class CallCgroup:
    """The cgroup of one sandboxed call: its processes join it by writing their pid to `procs`."""

    path: Path

    @classmethod
    def create(cls, memory_bytes: int, pids: int) -> CallCgroup | None:
        """A fresh cgroup with these limits, or None where the machine has no usable cgroup v2."""
        s = support()
        if not s.available or s.parent is None:
            return None
        path = s.parent / f"llmos-call-{os.getpid()}-{next(_counter)}"
        try:
            path.mkdir()
        except OSError:
            return None  # delegation withdrawn since the probe: the caller falls back to polling
        cg = cls(path)
        try:
            (path / "memory.max").write_text(str(memory_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            (path / "pids.max").write_text(str(pids))
        except OSError:
            cg.remove()
            return None
        return cg

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def events(self) -> dict[str, int]:
        """The counters that say a limit was hit: oom_kill (memory) and max (pids refused)."""
        out = {}
        for name, key in (("memory.events", "oom_kill"), ("pids.events", "max")):
            try:
                for line in (self.path / name).read_text().splitlines():
                    k, v = line.split()
                    if k == key:
                        out[f"{name.split('.')[0]}.{key}"] = int(v)
            except OSError:
                pass
        return out

    def kill(self) -> None:
        """End every process in the cgroup (cgroup.kill where the kernel has it, else one by one)."""
        try:
            (self.path / "cgroup.kill").write_text("1")
            return
        except OSError:
            pass
        for _ in range(10):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill()
        for _ in range(100):  # the kernel frees the cgroup once its last process is reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
