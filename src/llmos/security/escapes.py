"""The sandbox escape suite: classic ways out, attacks on the kernel's own file tools, and totals.

Used by the tests and by `llmos bench security`. Every attempt runs in a fresh
working directory under a scratch directory; the verdict comes from what the
host sees afterwards (files that appeared or changed owner, a secret that
leaked into the output, processes still alive, disk used), not from what the
sandboxed code reports. Seven classic escapes, then the attacks of issue 13:
a sandbox swapping a directory for host symlinks while the agent's file tools
run (each tool call one case), links around a path grant, FIFOs and sockets
that would block a tool thread, and the disk and memory totals of one call.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.security import fs
from llmos.security._sandbox_init import SETUP_FAILED
from llmos.security.sandbox import SandboxLimits, SandboxResult, run_sandboxed, sandbox_python


@dataclass
class EscapeOutcome:
    name: str
    contained: bool
    detail: str
    wall_s: float
    mode: str
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)
    tried: int = 1  # cases this escape tried (tool calls raced, links followed, ...)
    held: int = 0  # of which the sandbox or the kernel contained


def _host_processes_with(token: str) -> list[int]:
    """Pids on the host whose command line mentions `token` (survivors of a sandbox)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry))
    return found


def _shell(cmd: str) -> list[str]:
    return ["/bin/sh", "-c", cmd]


def _python(code: str) -> list[str]:
    return [sandbox_python(), "-I", "-c", code]


def _fork_bomb(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    cmd = f"bomb_{token}() {{ bomb_{token} | bomb_{token} & }}; bomb_{token}; sleep 30"
    r = run_sandboxed(_shell(cmd), work, SandboxLimits(wall_s=3, nproc=32))
    time.sleep(0.2)
    left = _host_processes_with(token)
    return r, not left and r.wall_s < 10, f"ended after {r.wall_s:.1f} s, {len(left)} processes left"


def _memory_bomb(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    code = "x = []\nwhile True:\n    x.append(bytearray(32 << 20))"
    r = run_sandboxed(_python(code), work, SandboxLimits(wall_s=20, memory_mb=256))
    stopped = "MemoryError" in r.stderr or r.exit_code in (128 + 9, 128 + 6)
    return r, stopped and not r.timed_out, f"exit {r.exit_code}, MemoryError={'MemoryError' in r.stderr}"


def _infinite_loop(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    r = run_sandboxed(_python("while True:\n    pass"), work, SandboxLimits(cpu_s=1, wall_s=10))
    return r, r.exit_code != 0 and r.wall_s < 10, f"stopped after {r.wall_s:.1f} s with exit {r.exit_code}"


def _write_outside(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    targets = [scratch / f"escape-{token}", Path(tempfile.gettempdir()) / f"escape-{token}",
               Path("/etc") / f"escape-{token}", Path.home() / f"escape-{token}"]
    cmd = "; ".join(f"echo pwned > {t} 2>/dev/null" for t in targets)
    cmd += f"; echo pwned > ../escape-{token}; ln -s {scratch} link; echo pwned > link/escape-{token}; true"
    r = run_sandboxed(_shell(cmd), work, SandboxLimits(wall_s=10))
    written = [str(t) for t in targets if t.exists()]
    for t in targets:  # if it did escape, undo it
        t.unlink(missing_ok=True)
    return r, not written, f"host files written: {written or 'none'}"


def _read_host_files(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    secret = scratch / "secret.txt"
    secret.write_text(f"SECRET-{token}\n")
    secret.chmod(0o644)
    cmd = (f"cat {secret}; cat ../secret.txt; ln -s {secret} s; cat s; "
           f"cat /proc/1/root{secret}; cat /etc/shadow; ls /root /home; true")
    r = run_sandboxed(_shell(cmd), work, SandboxLimits(wall_s=10))
    leaked = f"SECRET-{token}" in r.stdout + r.stderr
    return r, not leaked, "the host secret leaked" if leaked else "no host secret in the output"


def _network(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "ok = []\n"
        f"for host, port in (('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2).close(); ok.append(host)\n"
        "    except OSError as e:\n"
        "        print(host, 'refused:', e)\n"
        "print('CONNECTED', ok)\n"
    )
    try:
        r = run_sandboxed(_python(code), work, SandboxLimits(wall_s=15))
        listener.settimeout(0.1)
        try:
            listener.accept()[0].close()
            reached_host = True
        except OSError:
            reached_host = False
    finally:
        listener.close()
    connected = "CONNECTED []" not in r.stdout
    return r, not connected and not reached_host, r.stdout.strip().splitlines()[-1] if r.stdout else r.stderr


def _background(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    n = int(token[:6], 16) % 1000
    cmd = (f"(sleep 300.{n}1 &); nohup sleep 300.{n}2 >/dev/null 2>&1 & "
           f"setsid sleep 300.{n}3 >/dev/null 2>&1 < /dev/null & echo started")
    r = run_sandboxed(_shell(cmd), work, SandboxLimits(wall_s=10))
    time.sleep(0.3)
    left = [p for k in (1, 2, 3) for p in _host_processes_with(f"300.{n}{k}")]
    for pid in left:  # clean up if it did escape, so the suite never leaves anything behind
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return r, not left, f"{len(left)} background processes survived the command"


# --- attacks on the kernel's file tools and on the totals (issue 13) -----------------------------------

SWAPPER = """  # runs in the sandbox as nobody: swap d for a link to the host and back, n times
import os, time
def restore(i):  # the kernel made a new d in the gap: move it aside, put the real one back
    for _ in range(1000):
        try:
            if os.path.islink('d'):
                os.unlink('d')
            if os.path.isdir('d.real'):
                if os.path.lexists('d'):
                    os.rename('d', 'trash%d' % i)
                os.rename('d.real', 'd')
            return
        except OSError:
            time.sleep(0.001)
for i in range({n}):
    try:
        os.rename('d', 'd.real')
        os.symlink({host!r} if i % 2 else '../host', 'd')
        os.unlink('d')
        os.rename('d.real', 'd')
    except OSError:
        restore(i)
print('swapped', {n})
"""
RACE_SWAPS = 10_000
_Counted = tuple[SandboxResult, bool, str, tuple[int, int]]  # ..., (cases tried, cases held)


def _host_state(host: Path) -> dict[str, tuple[int, int, int, bytes]]:
    out = {}
    for p in [host, *sorted(host.rglob("*"))]:
        st = os.lstat(p)
        out[str(p)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), p.read_bytes() if p.is_file() else b"")
    return out


def _root_only_host_dir(scratch: Path, token: str) -> Path:
    host = scratch / "host"
    host.mkdir(mode=0o700)
    (host / "secret").write_text(f"SECRET-{token}")
    (host / "secret").chmod(0o600)
    return host


def _file_tools_registry() -> Any:
    from llmos.tools import ToolRegistry, file_tools, shell_tool  # the tools under attack

    reg = ToolRegistry()
    reg.register(*file_tools(), shell_tool(SandboxLimits(wall_s=10)))
    return reg


def _tool_call(reg: Any, ctx: Any, name: str, args: dict) -> str:
    from llmos.tools import ToolError

    try:
        return str(reg.get(name).fn(args, ctx))
    except ToolError as e:
        return str(e)


def _symlink_race(scratch: Path, work: Path, token: str) -> _Counted:
    """A sandboxed loop swaps d for links to a root-only host directory while the same agent's
    read_file, write_file, list_files and run_shell (its chown) run; each tool call is a case."""
    from llmos.tools import ToolContext

    host = _root_only_host_dir(scratch, token)
    reg = _file_tools_registry()
    ctx = ToolContext(pid=1, agent="attacker", workdir=work, home=scratch)
    _tool_call(reg, ctx, "write_file", {"path": "d/secret", "content": "decoy"})
    before = _host_state(host)
    swapper: dict[str, SandboxResult] = {}
    code = SWAPPER.format(n=RACE_SWAPS, host=str(host))
    t = threading.Thread(target=lambda: swapper.update(r=run_sandboxed(
        _python(code), work, SandboxLimits(cpu_s=60, wall_s=120))))
    t.start()
    calls = (("read_file", {"path": "d/secret"}), ("write_file", {"path": "d/w", "content": "pwned"}),
             ("write_file", {"path": "d/secret", "content": "pwned"}), ("list_files", {"path": "d"}))
    tried = held = at_link = rounds = 0
    while t.is_alive() or rounds == 0:
        batch = list(calls) + ([("run_shell", {"command": "true"})] if rounds % 10 == 0 else [])
        for name, args in batch:
            out = _tool_call(reg, ctx, name, args)
            tried += 1
            held += f"SECRET-{token}" not in out and _host_state(host) == before
            at_link += "goes through a symlink" in out
        rounds += 1
    t.join()
    detail = (f"{held} of {tried} tool calls during {RACE_SWAPS} swaps held "
              f"({at_link} met a swapped-in link and were refused)")
    return swapper["r"], held == tried, detail, (tried, held)


def _symlinked_grant(scratch: Path, work: Path, token: str) -> _Counted:
    """The agent's shell links names under docs/ to a root-only file (or moves one there): read_file
    follows no link and reads nothing the agent's sandbox could not."""
    from llmos.tools import ToolContext

    (work / "secret.txt").write_text(f"SECRET-{token}")
    (work / "secret.txt").chmod(0o600)
    (work / "secret2.txt").write_text(f"SECRET-{token}")
    (work / "secret2.txt").chmod(0o600)
    r = run_sandboxed(_shell("mkdir -p docs && ln -s ../secret.txt docs/innocent.txt && ln -s .. docs/up "
                             "&& ln -s /proc/self/root/../secret.txt docs/proc; "
                             "ln secret.txt docs/hard 2>/dev/null; mv secret2.txt docs/moved; true"),
                      work, SandboxLimits(wall_s=10))
    reg = _file_tools_registry()
    ctx = ToolContext(pid=1, agent="a", workdir=work, home=scratch)
    paths = ["docs/innocent.txt", "docs/up/secret.txt", "docs/proc", "docs/hard", "docs/moved"]
    held = sum(f"SECRET-{token}" not in _tool_call(reg, ctx, "read_file", {"path": p}) for p in paths)
    return r, held == len(paths), f"{held} of {len(paths)} linked or moved names refused", (len(paths), held)


def _blocking_files(scratch: Path, work: Path, token: str) -> _Counted:
    """The sandbox makes a FIFO and a listening socket; read_file and write_file on them return at once."""
    from llmos.tools import ToolContext

    code = ("import os, socket, time\nos.mkfifo('fifo')\ns = socket.socket(socket.AF_UNIX)\n"
            "s.bind('sock')\ns.listen(1)\nprint('made', flush=True)\ntime.sleep(1)\n")
    r = run_sandboxed(_python(code), work, SandboxLimits(wall_s=10))
    reg = _file_tools_registry()
    ctx = ToolContext(pid=1, agent="a", workdir=work, home=scratch)
    held = tried = 0
    for path in ("fifo", "sock"):
        for name in ("read_file", "write_file"):
            call = threading.Thread(target=_tool_call, args=(reg, ctx, name, {"path": path, "content": "x"}),
                                    daemon=True)
            call.start()
            call.join(2)
            tried += 1
            held += not call.is_alive()
    return r, held == tried, f"{held} of {tried} calls on a FIFO or socket returned at once", (tried, held)


def _disk_total(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    cmd = "for i in 1 2 3 4 5 6; do head -c 64000000 /dev/zero > f$i & done; wait; sleep 5"
    r = run_sandboxed(_shell(cmd), work, SandboxLimits(disk_mb=8, wall_s=20))
    used = fs.usage(work).bytes
    detail = f"{used >> 20} MiB left of the 6 x 64 MB written (quota 8 MiB)"
    return r, used <= 8 << 20 and not r.timed_out, detail


def _memory_total(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    code = ("import os, time\nfor _ in range(2):\n    if os.fork() == 0:\n        break\n"
            "x = b'm' * (300 << 20)\ntime.sleep(20)\n")
    r = run_sandboxed(_python(code), work, SandboxLimits(memory_mb=1024, total_memory_mb=512, wall_s=20))
    stopped = any("512 MiB" in n for n in r.notes)
    return r, stopped and not r.timed_out, "; ".join(r.notes) or f"exit {r.exit_code}, no limit hit"


def _memfd_memory(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    code = ("import os, time\nfds = []\nfor i in range(20):\n    fd = os.memfd_create('m')\n"
            "    for _ in range(40):\n        os.write(fd, b'm' * (1 << 20))\n    fds.append(fd)\n"
            "print('held', len(fds), flush=True)\ntime.sleep(20)\n")
    r = run_sandboxed(_python(code), work, SandboxLimits(total_memory_mb=512, wall_s=20))
    stopped = any("512 MiB" in n for n in r.notes) and "held" not in r.stdout
    return r, stopped and not r.timed_out, "; ".join(r.notes) or f"exit {r.exit_code}, 800 MB held in memfds"


def _unlinked_open_files(scratch: Path, work: Path, token: str) -> tuple[SandboxResult, bool, str]:
    code = ("import os, time\nfiles = []\nfor i in range(40):\n    f = open(f'f{i}', 'wb')\n"
            "    f.write(b'x' * (8 << 20))\n    f.flush()\n    os.unlink(f'f{i}')\n    files.append(f)\n"
            "print('held', len(files), flush=True)\ntime.sleep(20)\n")
    r = run_sandboxed(_python(code), work, SandboxLimits(disk_mb=64, wall_s=20))
    stopped = any(n.startswith("killed: the working directory") for n in r.notes) and "held" not in r.stdout
    return r, stopped and not r.timed_out, "; ".join(r.notes) or f"exit {r.exit_code}, 320 MB held unlinked"


ESCAPES: dict[str, Callable[[Path, Path, str], tuple[Any, ...]]] = {
    "fork_bomb": _fork_bomb,
    "memory_bomb": _memory_bomb,
    "infinite_loop": _infinite_loop,
    "write_outside_workdir": _write_outside,
    "read_host_files": _read_host_files,
    "network_connection": _network,
    "background_process": _background,
    "symlink_race_with_file_tools": _symlink_race,
    "symlinks_around_a_path_grant": _symlinked_grant,
    "fifo_and_socket_in_workdir": _blocking_files,
    "disk_total_of_one_call": _disk_total,
    "memory_total_of_one_call": _memory_total,
    "memory_in_memfds": _memfd_memory,
    "disk_in_unlinked_open_files": _unlinked_open_files,
}


def run_escape(name: str) -> EscapeOutcome:
    """Try one escape in a fresh scratch directory and judge it from the host."""
    attempt = ESCAPES[name]
    with tempfile.TemporaryDirectory(prefix="llmos-escape-") as d:
        scratch = Path(d)
        work = scratch / "work"
        work.mkdir()
        token = uuid.uuid4().hex[:12]
        r, contained, detail, *counts = attempt(scratch, work, token)
    tried, held = counts[0] if counts else (1, int(contained))
    if r.exit_code == SETUP_FAILED and r.stderr.startswith("sandbox:"):
        contained, held, detail = False, 0, f"the sandbox did not start: {r.stderr.strip()}"
    return EscapeOutcome(name, contained, detail, r.wall_s, r.mode, r.exit_code, r.notes, tried, held)


def run_escape_suite() -> list[EscapeOutcome]:
    return [run_escape(name) for name in ESCAPES]
