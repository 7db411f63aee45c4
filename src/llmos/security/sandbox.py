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

Without namespaces only the limits, the timeout, the process-group kill and the
environment are enforced; `isolation()` says which mode this machine gets.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmos.security import fs

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
    nproc: int = 64  # processes of the sandbox's uid
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
            namespaces: bool, newroot: str | None) -> dict:
    prefix = os.path.realpath(sys.base_prefix)
    ro = list(SYSTEM_BINDS)
    if not prefix.startswith("/usr"):
        ro.append(prefix)
    drop = os.getuid() == 0 and namespaces  # without a private root, nobody might not even reach workdir
    return {
        "argv": argv, "env": env, "workdir": str(workdir), "namespaces": namespaces, "newroot": newroot,
        "ro_binds": ro, "tmp_mb": limits.tmp_mb,
        "uid": NOBODY if drop else None, "gid": NOBODY if drop else None,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20, "nproc": limits.nproc,
                   "nofile": limits.nofile, "fsize_bytes": limits.fsize_mb << 20},
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
    newroot = tempfile.mkdtemp(prefix="llmos-sandbox-") if use_ns else None
    if use_ns and os.getuid() == 0:
        # Only the directory itself, by fd: what the kernel creates inside is the sandbox uid's from
        # birth (security/fs.py), and a walk over a tree the sandbox controls could be led outside.
        fs.give_root_to(workdir, NOBODY, NOBODY)
    cfg = _config(argv, workdir, limits, {**base_env, **(env or {})}, use_ns, newroot)
    out: list[bytes] = []
    err: list[bytes] = []
    flags: dict = {}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-S", _INIT],
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            cwd=str(workdir), env={"PATH": SAFE_PATH, CONFIG_VAR: json.dumps(cfg)})
    readers = [threading.Thread(target=_reader, args=(s, limits.output_bytes, buf, flags), daemon=True)
               for s, buf in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
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
    _kill_group(proc)  # whatever is left of its process group goes too
    proc.wait()
    for r in readers:
        r.join(timeout=5)
    if newroot:
        shutil.rmtree(newroot, ignore_errors=True)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    notes = []
    if timed_out:
        notes.append(f"killed after the wall-clock limit of {limits.wall_s:g} s")
    elif code == 128 + signal.SIGKILL or code == 128 + signal.SIGXCPU:
        notes.append(f"killed by signal {code - 128} (CPU limit {limits.cpu_s} s or memory)")
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
    info = {"namespaces": False, "network": False, "filesystem": False, "uid_drop": False,
            "pid_namespace": False, "rlimits": True, "timeout_kills_group": True, "reason": ""}
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
