"""Host actions as tools: signal or renice a host process, remove files; syscalls like any other.

The operator (a sysadmin agent) acts on the machine only through these tools,
so each action passes the one reference monitor and lands in the one audit
log. What may be touched is the caller's capabilities (argument constraints
on these tools: which pids, or descendants of which process; which paths;
the blast radius a call may accept), e.g.

    {"tool": "host.kill_process", "allow": {"within": ["1234"]}, "bounds": {"max_tree": {"max": 8}}}
    {"tool": "host.remove_files", "root": "/srv/scratch", "paths": {"path": ["**"]},
     "bounds": {"max_files": {"max": 10000}, "max_bytes": {"max": 2147483648}}}

Each tool then makes its arguments true of the object it acts on, whatever
the grant said. Guarantees:

- never pid 0 or 1, the kernel's own process or any of its ancestors;
- `within` (a process the grant names) must be a strict ancestor of `pid`;
- a process tree larger than `max_tree`, a removal of more than `max_files`
  files or `max_bytes` bytes is refused before anything is touched;
- renice only lowers a priority;
- a removal reaches its target from `/` one directory at a time without
  following a symlink at any component (so the object removed is the one the
  path grant matched, not where a link points), and removes a symlink itself,
  never its target;
- `dry_run` checks everything above and says what it would do, doing nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import PurePosixPath
from typing import Any

import psutil

from llmos.tools.base import Tool, ToolContext, ToolError

_REASON = {"type": "string", "maxLength": 200, "description": "why, for the audit log"}
_DRY = {"type": "boolean", "description": "check everything, do nothing"}
_PID = {"type": "integer", "minimum": 2}
_WITHIN = {"type": "integer", "minimum": 2, "description": "a granted ancestor of pid"}


def _int(args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToolError(f"{name} must be an integer, got {value!r}")
    return value


def _only(args: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(args) - allowed
    if unknown:
        raise ToolError(f"unknown argument(s) {sorted(unknown)} (expected {sorted(allowed)})")


def _process(args: dict[str, Any]) -> psutil.Process:
    """The target process, after the invariants no grant can lift."""
    pid = _int(args, "pid")
    if pid <= 1:
        raise ToolError(f"pid {pid} is never a target (init and the kernel's idle task)")
    me = os.getpid()
    if pid == me:
        raise ToolError(f"pid {pid} is the kernel itself")
    try:
        if pid in {p.pid for p in psutil.Process(me).parents()}:
            raise ToolError(f"pid {pid} is an ancestor of the kernel")
        proc = psutil.Process(pid)
        if "within" in args:
            within = _int(args, "within")
            if within not in {p.pid for p in proc.parents()}:
                raise ToolError(f"pid {pid} is not a descendant of pid {within}")
    except psutil.NoSuchProcess:
        raise ToolError(f"pid {pid} has exited") from None
    return proc


def _tree(proc: psutil.Process, max_tree: int) -> list[psutil.Process]:
    try:
        tree = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        raise ToolError(f"pid {proc.pid} has exited") from None
    if len(tree) > max_tree:
        raise ToolError(f"blast radius: pid {proc.pid} heads {len(tree)} processes (at most {max_tree})")
    return tree


def kill_process(args: dict[str, Any], ctx: ToolContext) -> str:
    _only(args, {"pid", "within", "max_tree", "dry_run", "reason"})
    proc = _process(args)
    tree = _tree(proc, _int(args, "max_tree", 1))
    if args.get("dry_run"):
        return f"would kill pid {proc.pid} and {len(tree) - 1} descendant(s)"
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=3)
    if alive:
        raise ToolError(f"killed {len(gone)} process(es), {len(alive)} survived")
    return f"killed {len(gone)} process(es)"


def renice_process(args: dict[str, Any], ctx: ToolContext) -> str:
    _only(args, {"pid", "within", "nice", "dry_run", "reason"})
    proc = _process(args)
    nice = _int(args, "nice")
    try:
        before = proc.nice()
    except psutil.NoSuchProcess:
        raise ToolError(f"pid {proc.pid} has exited") from None
    if not before <= nice <= 19:
        raise ToolError(f"renice may only lower a priority: pid {proc.pid} is at nice {before}, asked {nice}")
    if args.get("dry_run"):
        return f"would renice pid {proc.pid}: nice {before} -> {nice}"
    try:
        proc.nice(nice)
    except psutil.NoSuchProcess:
        raise ToolError(f"pid {proc.pid} has exited") from None
    return f"nice {before} -> {nice}"


def _parent_fd(path: str) -> tuple[int, str]:
    """A descriptor of `path`'s directory, reached from / without following any symlink, and the name."""
    parts = PurePosixPath(path).parts
    if not path.startswith("/") or len(parts) < 2 or ".." in parts or os.path.normpath(path) != path:
        raise ToolError(f"path must be absolute and normalized, got {path!r}")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[1:-1]:
            try:
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise ToolError(f"path {path} does not exist") from None
            except OSError:  # ELOOP (a symlink) or ENOTDIR
                raise ToolError(f"path {path}: {name!r} is a symlink or not a directory") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def _usage(dir_fd: int, name: str, max_files: int) -> tuple[int, int]:
    """Files and bytes under directory `name`, by descriptors, never through a link; stops past the bound."""
    files = size = 0
    for _, _, names, fd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
        for n in names:
            files += 1
            try:
                size += os.lstat(n, dir_fd=fd).st_size
            except OSError:
                pass
            if files > max_files:
                return files, size
    return files, size


def remove_files(args: dict[str, Any], ctx: ToolContext) -> str:
    _only(args, {"path", "max_files", "max_bytes", "dry_run", "reason"})
    path = args.get("path")
    if not isinstance(path, str):
        raise ToolError(f"path must be a string, got {path!r}")
    max_files, max_bytes = _int(args, "max_files", 1), _int(args, "max_bytes", 0)
    dir_fd, name = _parent_fd(path)
    try:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            raise ToolError(f"path {path} does not exist") from None
        is_dir = stat.S_ISDIR(st.st_mode)
        files, size = _usage(dir_fd, name, max_files) if is_dir else (1, st.st_size)
        if files > max_files or size > max_bytes:
            raise ToolError(f"blast radius: {path} holds {files}{'+' if files > max_files else ''} files, "
                            f"{size} bytes (at most {max_files} files, {max_bytes} bytes)")
        if args.get("dry_run"):
            return f"would remove {path} ({files} files, {size} bytes)"
        if is_dir:
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)  # a symlink goes, its target stays
    finally:
        os.close(dir_fd)
    return f"removed {path} ({files} files, {size} bytes)"


def host_tools() -> list[Tool]:
    """The host-action tools; register them in the kernel's ToolRegistry, grant them with constraints."""
    return [
        Tool("host.kill_process", "Kill a host process and its descendants (SIGKILL).",
             {"type": "object", "properties": {"pid": _PID, "within": _WITHIN,
                                               "max_tree": {"type": "integer", "minimum": 1},
                                               "dry_run": _DRY, "reason": _REASON},
              "required": ["pid", "max_tree"], "additionalProperties": False},
             kill_process, destructive=True),
        Tool("host.renice_process", "Lower a host process' CPU priority (raise its nice value).",
             {"type": "object", "properties": {"pid": _PID, "within": _WITHIN,
                                               "nice": {"type": "integer", "minimum": 0, "maximum": 19},
                                               "dry_run": _DRY, "reason": _REASON},
              "required": ["pid", "nice"], "additionalProperties": False},
             renice_process),
        Tool("host.remove_files", "Remove a file or a directory tree on the host.",
             {"type": "object", "properties": {"path": {"type": "string", "description": "absolute path"},
                                               "max_files": {"type": "integer", "minimum": 1},
                                               "max_bytes": {"type": "integer", "minimum": 0},
                                               "dry_run": _DRY, "reason": _REASON},
              "required": ["path", "max_files", "max_bytes"], "additionalProperties": False},
             remove_files, destructive=True),
    ]
