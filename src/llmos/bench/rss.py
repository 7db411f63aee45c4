"""Peak resident memory of a process, as the kernel counts it (/proc/PID/status VmHWM).

The memory figure every bench reports for a serving process: the high-water
mark of its resident set over its life so far, read while it still runs.
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """A live process's peak resident set in bytes; None when it is gone or /proc is absent."""
    try:
        return parse_vmhwm(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None


def parse_vmhwm(status: str) -> int | None:
    """VmHWM of a /proc/PID/status text, in bytes (the kernel writes it in kB); None if absent."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    return None
