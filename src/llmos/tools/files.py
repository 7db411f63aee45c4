"""File tools: read, write and list files inside the agent's private working directory.

This is the file-system half of an agent's protection domain (chroot-like):
every path an agent names is relative to `ctx.workdir`. A path that is
absolute, climbs with `..`, or passes through a symlink anywhere along it is
refused with a `ToolError` before any byte is read or written, and the check
is the open itself (security/fs.py: resolution beneath a directory fd,
openat2 or a per-component O_NOFOLLOW walk), so a sandbox running at the same
time for the same agent cannot swap a directory for a link between a check and
a use. Because no link is followed, the object opened is the one the path
names lexically: a path grant such as `docs/**` (matched by the monitor on the
path) covers exactly what the tool opens. Only regular files are read or
written (a FIFO, socket or device is refused at once, never waited on), and
`write_file` keeps the working directory under its disk quota.

What `read_file` and `list_files` return is outside content (anyone could
have written those files or chosen those names), so both are untrusted
outputs for information-flow control.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from llmos.security import fs
from llmos.security.sandbox import NOBODY, SandboxLimits, isolation
from llmos.tools.base import Tool, ToolContext, ToolError

MAX_READ_BYTES = 1 << 20  # a single read returns at most 1 MiB
MAX_WRITE_BYTES = 8 << 20
MAX_LIST_ENTRIES = 1000


def _owner() -> tuple[int, int] | None:
    """The agent's own uid/gid in its workdir, where it differs from ours: the sandbox's, when we run
    as root and the sandbox drops to it. What the kernel creates there becomes the agent's, and it
    reads or writes there only what the agent could itself."""
    return (NOBODY, NOBODY) if os.getuid() == 0 and isolation()["uid_drop"] else None


@contextmanager
def _root(ctx: ToolContext) -> Iterator[int]:
    try:
        fd = fs.open_root(ctx.workdir)
    except fs.UnsafePath as e:
        raise ToolError(str(e)) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _parts(path: Any) -> tuple[str, ...]:
    try:
        return fs.parts_of(path)
    except fs.UnsafePath as e:
        raise ToolError(str(e)) from None


def _read_file(args: dict[str, Any], ctx: ToolContext) -> str:
    parts = _parts(args.get("path"))
    limit = args.get("max_bytes", MAX_READ_BYTES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_READ_BYTES:
        raise ToolError(f"'max_bytes' must be an integer in 1..{MAX_READ_BYTES}, got {limit!r}")
    with _root(ctx) as root:
        try:
            fd = fs.open_file(root, parts, _owner())
        except fs.UnsafePath as e:
            hint = " (use list_files)" if str(e).endswith(" is a directory") else ""
            raise ToolError(f"{e}{hint}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    if len(data) > limit:
        text += f"\n[truncated at {limit} bytes]"
    return text


def _blocks_of(root: int, parts: tuple[str, ...]) -> int:
    """The disk space the regular file `parts` holds now (0 if there is none)."""
    try:
        fd = fs.open_file(root, parts)
    except fs.UnsafePath:
        return 0
    try:
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def _write_file(args: dict[str, Any], ctx: ToolContext, disk_bytes: int) -> str:
    parts = _parts(args.get("path"))
    content = args.get("content")
    if not isinstance(content, str):
        raise ToolError(f"'content' must be a string, got {type(content).__name__}")
    append = args.get("append", False)
    if not isinstance(append, bool):
        raise ToolError(f"'append' must be true or false, got {append!r}")
    data = content.encode("utf-8")
    if len(data) > MAX_WRITE_BYTES:
        raise ToolError(f"'content' is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
    used = fs.usage(ctx.workdir)
    if not used.complete:
        raise ToolError(f"the working directory is past what its quota can measure ({fs.MAX_WALK_ENTRIES} "
                        f"entries, {fs.MAX_WALK_DEPTH} levels of directories); remove some first")
    with _root(ctx) as root:
        if used.bytes + len(data) > disk_bytes:
            freed = 0 if append else _blocks_of(root, parts)  # what overwriting it gives back
            if used.bytes - freed + len(data) > disk_bytes:
                raise ToolError(f"disk quota exceeded: the working directory uses {used.bytes >> 20} MiB; "
                                f"writing {len(data)} bytes would pass its quota of {disk_bytes >> 20} MiB")
        try:
            fd, _ = fs.create_file(root, parts, append=append, owner=_owner())
        except fs.UnsafePath as e:
            raise ToolError(str(e)) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if not append:
                f.truncate()  # what was beyond the new content
    verb = "appended" if append else "wrote"
    return f"{verb} {len(data)} bytes to {fs.shown(parts)}"


def _list_files(args: dict[str, Any], ctx: ToolContext) -> str:
    path = args.get("path", ".")
    parts = () if path in (".", "") else _parts(path)
    recursive = args.get("recursive", False)
    if not isinstance(recursive, bool):
        raise ToolError(f"'recursive' must be true or false, got {recursive!r}")
    with _root(ctx) as root:
        try:
            fd = fs.open_dir(root, parts)
        except fs.UnsafePath as e:
            message = str(e).replace("is not a directory", "is a file (use read_file)")
            raise ToolError(message) from None
        try:
            walk = fs.Walk(fd, parts, recursive=recursive, limit=MAX_LIST_ENTRIES)
            found = list(walk)
        finally:
            os.close(fd)
    lines = [fs.shown(e.parts) + ("/" if e.is_dir else "") for e in found]
    if walk.truncated:
        lines.append(f"[listing cut at {MAX_LIST_ENTRIES} entries or {fs.MAX_WALK_DEPTH} levels]")
    return "\n".join(lines) if lines else "(empty)"


def file_tools(disk_mb: int = SandboxLimits.disk_mb) -> list[Tool]:
    """read_file, write_file and list_files, confined to each agent's working directory
    (which `write_file` keeps under `disk_mb`, the quota sandboxed calls keep too)."""
    path = {"type": "string", "description": "Path relative to your working directory."}
    return [
        Tool("read_file", "Read a text file from your working directory.",
             {"type": "object", "properties": {
                 "path": path,
                 "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_READ_BYTES}},
              "required": ["path"], "additionalProperties": False},
             _read_file, untrusted_output=True),
        Tool("write_file", "Write (or append) text to a file in your working directory.",
             {"type": "object", "properties": {
                 "path": path, "content": {"type": "string"},
                 "append": {"type": "boolean", "default": False}},
              "required": ["path", "content"], "additionalProperties": False},
             partial(_write_file, disk_bytes=disk_mb << 20), destructive=True),
        Tool("list_files", "List the files in a directory of your working directory.",
             {"type": "object", "properties": {
                 "path": {**path, "default": "."},
                 "recursive": {"type": "boolean", "default": False}},
              "additionalProperties": False},
             _list_files, untrusted_output=True),
    ]
