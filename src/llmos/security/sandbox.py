"""The sandbox: run untrusted code and shell commands in a confined, bounded subprocess.

This is llmos' process isolation (cf. containers, seccomp sandboxes). A
sandboxed command runs with resource limits (CPU seconds, address space,
processes, open files, file size), a wall-clock timeout that kills it and
every process it started, a scrubbed environment, and, where the machine
allows namespaces (root, or unprivileged user namespaces):

- no network: a new, empty network namespace;
- a fresh root file system: the system's programs and libraries read-only, the
  agent's working directory read-write at /work (the only writable place on
  the host's disks), a private tmpfs /tmp, a /proc that shows only the
  sandbox's processes; the host's other files do not exist inside;
- an unprivileged uid (nobody) with no_new_privs;
- a pid namespace, so no process outlives the command.

Totals per call, beyond the per-process rlimits:

- disk: the working directory's quota (`disk_mb`, all files together). A file
  may grow only to what is left of it (RLIMIT_FSIZE), the kernel polls the
  directory's usage while the call runs and kills the call when it passes the
  quota (files it removed but keeps open count too), and afterwards removes the
  files the call changed (by ctime, which no process can set back) while the
  directory is still over it; a tree past 20000 entries or 64 levels counts as
  over (it could not be measured);
- memory and processes: where the machine delegates cgroup v2 memory and pids
  controllers (security/cgroups.py), each call runs in its own cgroup with
  `memory.max` = `total_memory_mb` (no swap) and `pids.max` = `nproc`;
  elsewhere the kernel polls the resident memory of the call's process tree
  (plus the memory files, memfds, it holds open) every 50 ms and kills it above
  `total_memory_mb`, and RLIMIT_NPROC bounds the processes of the sandbox uid
  (shared by all calls running at once). Kernel memory (socket and pipe
  buffers) and what is touched between two polls are bounded only by cgroups.

Without namespaces only the limits, the timeout, the process-group kill and the
environment are enforced; `isolation()` says which mode this machine gets.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmos.security import cgroups, fs

_INIT = str(Path(__file__).with_name("_sandbox_init.py"))
CONFIG_VAR = "LLMOS_SANDBOX_CONFIG"  # the init reads its config here (its environ is root-only inside)
NOBODY = 65534
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# What the sandbox's root holds besides /work, /tmp, /proc and /dev (read-only).
SYSTEM_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime")


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 10
    wall_s: float = 30.0
    memory_mb: int = 1024  # address space per process
    total_memory_mb: int = 1024  # resident memory of all the call's processes together
    nproc: int = 64  # processes of the sandbox's uid (and of the call, with cgroups)
    nofile: int = 256
    fsize_mb: int = 64  # largest file it may write
    disk_mb: int = 256  # the working directory's quota (all files together)
    tmp_mb: int = 64
    output_bytes: int = 1 << 20  # kept of each of stdout and stderr


@dataclass
class SandboxResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    mode: str  # "namespaces" or "rlimits"
    truncated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def sandbox_python() -> str:
    """The interpreter sandboxed Python runs on: the base install (standard library only, no venv)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _config(argv: list[str], workdir: Path, limits: SandboxLimits, env: dict[str, str],
            namespaces: bool, newroot: str | None, fsize_bytes: int, cgroup_procs: str | None) -> dict:
    prefix = os.path.realpath(sys.base_prefix)
    ro = list(SYSTEM_BINDS)
    if not prefix.startswith("/usr"):
        ro.append(prefix)
    drop = os.getuid() == 0 and namespaces  # without a private root, nobody might not even reach workdir
    return {
        "argv": argv, "env": env, "workdir": str(workdir), "namespaces": namespaces, "newroot": newroot,
        "ro_binds": ro, "tmp_mb": limits.tmp_mb, "cgroup_procs": cgroup_procs,
        "uid": NOBODY if drop else None, "gid": NOBODY if drop else None,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20, "nproc": limits.nproc,
                   "nofile": limits.nofile, "fsize_bytes": fsize_bytes},
    }


def _reader(stream, limit: int, out: list[bytes], flags: dict) -> None:
    kept = 0
    while chunk := stream.read(65536):
        if kept < limit:
            out.append(chunk[: limit - kept])
            kept += len(out[-1])
        if kept >= limit and len(chunk):
            flags["truncated"] = True
    stream.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


POLL_S = 0.05  # the watchdog's period (longer while walking a large workdir takes longer)


def _process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (in a pid namespace: all of the sandbox's)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class _Held:
    """What a call's processes hold beyond what a walk of the workdir sees."""

    resident: int = 0  # resident memory of the processes
    memfd: int = 0  # memory files held open (memfd_create): resident only when mapped
    unlinked: int = 0  # files on the workdir's disk removed but still open


def _held_by(pids: list[int], disk_dev: int) -> _Held:
    held, seen = _Held(), set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                held.resident += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fds = os.listdir(f"/proc/{pid}/fd")
        except (OSError, IndexError, ValueError):
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(link)
                if not (target.startswith("/memfd:") or target.endswith(" (deleted)")):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if target.startswith("/memfd:"):
                held.memfd += st.st_blocks * 512
            elif st.st_dev == disk_dev:
                held.unlinked += st.st_blocks * 512
    return held


@dataclass
class _Watch:
    """What the watchdog enforces while a call runs, and what it found."""

    proc: subprocess.Popen
    workdir: Path
    disk_cap: int  # bytes the workdir may hold
    disk_dev: int  # the device the workdir is on
    bound_entries: bool  # the walk's bounds hold too (not when the workdir was past them already)
    memory_cap: int | None  # resident bytes of the tree (None: a cgroup enforces it)
    cgroup: cgroups.CallCgroup | None
    stop: threading.Event = field(default_factory=threading.Event)
    violation: str = ""

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # fail closed: a call the watchdog cannot measure does not go on
            self._kill(f"the watchdog could not measure the call ({type(e).__name__}: {e})")

    def _run(self) -> None:
        period = POLL_S
        while not self.stop.wait(period) and self.proc.poll() is None:
            t = time.monotonic()
            held = _held_by(_process_tree(self.proc.pid), self.disk_dev)
            if self.memory_cap is not None and held.resident + held.memfd > self.memory_cap:
                self._kill(f"its processes held {(held.resident + held.memfd) >> 20} MiB, above the limit of "
                           f"{self.memory_cap >> 20} MiB for all of them together")
                return
            used = fs.usage(self.workdir)
            if used.bytes + held.unlinked > self.disk_cap or (self.bound_entries and not used.complete):
                what = (f"{(used.bytes + held.unlinked) >> 20} MiB" if used.complete
                        else f"{used.entries}+ entries or levels")
                self._kill(f"the working directory reached {what}, past its quota of {self.disk_cap >> 20} "
                           f"MiB, {fs.MAX_WALK_ENTRIES} entries, {fs.MAX_WALK_DEPTH} levels")
                return
            period = max(POLL_S, 2 * (time.monotonic() - t))

    def _kill(self, why: str) -> None:
        self.violation = why
        if self.cgroup:
            self.cgroup.kill()
        _kill_group(self.proc)


def _over_quota(workdir: Path, cap: int, bound_entries: bool, since: float) -> str | None:
    """After a call: if the workdir is over its quota, remove what the call changed; a note, or None."""
    used = fs.usage(workdir)
    if used.bytes <= cap and (used.complete or not bound_entries):
        return None
    removed, freed = fs.remove_changed_since(workdir, since)
    return (f"disk quota of {cap >> 20} MiB exceeded: removed the {removed} files this call wrote "
            f"({freed >> 20} MiB)")


def run_sandboxed(argv: list[str], workdir: str | Path, limits: SandboxLimits | None = None,
                  env: dict[str, str] | None = None, stdin: str | None = None,
                  namespaces: bool | None = None) -> SandboxResult:
    """Run `argv` confined to `workdir`; never raises for what the command does, only for bad input."""
    limits = limits or SandboxLimits()
    workdir = Path(workdir).resolve()
    if not workdir.is_dir():
        raise ValueError(f"sandbox working directory {workdir} does not exist")
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError(f"the sandboxed program must be an absolute path, got {argv[:1]!r}")
    use_ns = isolation()["namespaces"] if namespaces is None else namespaces
    inside = "/work" if use_ns else str(workdir)
    base_env = {"PATH": SAFE_PATH, "HOME": inside, "TMPDIR": "/tmp" if use_ns else inside,
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if use_ns and os.getuid() == 0:
        # Only the directory itself, by fd: what the kernel creates inside is the sandbox uid's from
        # birth (security/fs.py), and a walk over a tree the sandbox controls could be led outside.
        fs.give_root_to(workdir, NOBODY, NOBODY)
    start = fs.usage(workdir)
    disk_cap = max(limits.disk_mb << 20, start.bytes)  # over quota already: it may not grow
    fsize = min(limits.fsize_mb << 20, disk_cap - start.bytes)
    cgroup = cgroups.CallCgroup.create(limits.total_memory_mb << 20, limits.nproc)
    newroot = tempfile.mkdtemp(prefix="llmos-sandbox-") if use_ns else None
    cfg = _config(argv, workdir, limits, {**base_env, **(env or {})}, use_ns, newroot, fsize,
                  cgroup.procs if cgroup else None)
    out: list[bytes] = []
    err: list[bytes] = []
    flags: dict = {}
    since = time.time() - 0.02  # ctime comes from the kernel's coarse clock (a tick behind)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-S", _INIT],
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            cwd=str(workdir), env={"PATH": SAFE_PATH, CONFIG_VAR: json.dumps(cfg)})
    watch = _Watch(proc, workdir, disk_cap, workdir.stat().st_dev, start.complete,
                   None if cgroup else limits.total_memory_mb << 20, cgroup)
    threads = [threading.Thread(target=_reader, args=(s, limits.output_bytes, buf, flags), daemon=True)
               for s, buf in ((proc.stdout, out), (proc.stderr, err))]
    threads.append(threading.Thread(target=watch.run, daemon=True))
    for t in threads:
        t.start()
    if stdin is not None:
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
    timed_out = False
    try:
        proc.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    watch.stop.set()
    _kill_group(proc)  # whatever is left of its process group goes too
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    events = {}
    if cgroup:
        events = cgroup.events()
        cgroup.remove()
    if newroot:
        shutil.rmtree(newroot, ignore_errors=True)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    notes = []
    if timed_out:
        notes.append(f"killed after the wall-clock limit of {limits.wall_s:g} s")
    elif watch.violation:
        notes.append(f"killed: {watch.violation}")
    elif code == 128 + signal.SIGKILL or code == 128 + signal.SIGXCPU:
        notes.append(f"killed by signal {code - 128} (CPU limit {limits.cpu_s} s or memory)")
    if events.get("memory.oom_kill"):
        notes.append(f"the memory limit of {limits.total_memory_mb} MiB for the whole call was hit "
                     f"({events['memory.oom_kill']} processes killed)")
    if events.get("pids.max"):
        notes.append(f"the limit of {limits.nproc} processes for the call refused {events['pids.max']} forks")
    if quota_note := _over_quota(workdir, disk_cap, start.complete, since):
        notes.append(quota_note)
    if flags.get("truncated"):
        notes.append(f"output truncated to {limits.output_bytes} bytes")
    text = [b"".join(buf).decode("utf-8", "replace") for buf in (out, err)]
    return SandboxResult(code, text[0], text[1], timed_out, round(time.monotonic() - t0, 3),
                         "namespaces" if use_ns else "rlimits", bool(flags.get("truncated")), notes)


@functools.cache
def isolation() -> dict:
    """What this machine enforces: probed once by starting a namespaced `true`.

    LLMOS_SANDBOX=rlimits forces the fallback (to see what it does and does not contain).
    """
    cg = cgroups.support()
    info = {"namespaces": False, "network": False, "filesystem": False, "uid_drop": False,
            "pid_namespace": False, "rlimits": True, "timeout_kills_group": True, "reason": "",
            "cgroup": cg.available, "cgroup_reason": cg.reason,
            "totals": ("memory.max and pids.max per call (cgroup v2)" if cg.available else
                       "memory: polled resident size of the call's processes; processes: RLIMIT_NPROC "
                       "of the sandbox uid")
                      + "; disk: polled workdir quota, RLIMIT_FSIZE up to what is left of it"}
    if os.environ.get("LLMOS_SANDBOX") == "rlimits":
        info["reason"] = "LLMOS_SANDBOX=rlimits"
        return info
    with tempfile.TemporaryDirectory(prefix="llmos-probe-") as d:
        try:
            r = run_sandboxed(["/bin/sh", "-c", "exit 0"], d, SandboxLimits(wall_s=10), namespaces=True)
        except OSError as e:
            r = None
            info["reason"] = str(e)
    if r is not None and r.exit_code == 0:
        info.update(namespaces=True, network=True, filesystem=True, pid_namespace=True,
                    uid_drop=os.getuid() == 0)
    elif r is not None:
        info["reason"] = (r.stderr.strip() or f"exit code {r.exit_code}").splitlines()[-1]
    return info


def describe_isolation() -> dict:
    """`isolation()` plus the limits' defaults, for reports."""
    return {**isolation(), "default_limits": asdict(SandboxLimits())}
