"""The sandbox escape suite: seven classic ways out, each tried for real and judged from the host.

Used by the tests and by `llmos bench security`. Every attempt runs in a fresh
working directory under a scratch directory; the verdict comes from what the
host sees afterwards (files that appeared, a secret that leaked into the
output, processes still alive), not from what the sandboxed code reports.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


ESCAPES: dict[str, Callable[[Path, Path, str], tuple[SandboxResult, bool, str]]] = {
    "fork_bomb": _fork_bomb,
    "memory_bomb": _memory_bomb,
    "infinite_loop": _infinite_loop,
    "write_outside_workdir": _write_outside,
    "read_host_files": _read_host_files,
    "network_connection": _network,
    "background_process": _background,
}


def run_escape(name: str) -> EscapeOutcome:
    """Try one escape in a fresh scratch directory and judge it from the host."""
    attempt = ESCAPES[name]
    with tempfile.TemporaryDirectory(prefix="llmos-escape-") as d:
        scratch = Path(d)
        work = scratch / "work"
        work.mkdir()
        token = uuid.uuid4().hex[:12]
        r, contained, detail = attempt(scratch, work, token)
    if r.exit_code == SETUP_FAILED and r.stderr.startswith("sandbox:"):
        contained, detail = False, f"the sandbox did not start: {r.stderr.strip()}"
    return EscapeOutcome(name, contained, detail, r.wall_s, r.mode, r.exit_code, r.notes)


def run_escape_suite() -> list[EscapeOutcome]:
    return [run_escape(name) for name in ESCAPES]
