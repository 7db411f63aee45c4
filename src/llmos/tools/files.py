"""File tools: read, write and list files inside the agent's private working directory.

This is the file-system half of an agent's protection domain (chroot-like):
every path an agent names is relative to `ctx.workdir`, and a path that is
absolute, climbs out with `..`, or reaches outside through a symlink is
refused with a `ToolError` before any byte is read or written. The
capability layer narrows this further (path globs); this layer guarantees
that no file tool ever touches anything outside the working directory.

What `read_file` and `list_files` return is outside content (anyone could
have written those files or chosen those names), so both are untrusted
outputs for information-flow control.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from llmos.tools.base import Tool, ToolContext, ToolError

MAX_READ_BYTES = 1 << 20  # a single read returns at most 1 MiB
MAX_WRITE_BYTES = 8 << 20
MAX_LIST_ENTRIES = 1000


def resolve_in_root(root: Path, path: Any, *, field: str = "path") -> Path:
    """The real path `path` names under `root`; ToolError if it would leave `root`.

    Checked twice: lexically (no absolute path, no `..`), then on the resolved
    path (no symlink anywhere along it leads outside).
    """
    if not isinstance(path, str) or not path.strip():
        raise ToolError(f"{field!r} must be a non-empty relative path, got {path!r}")
    if "\x00" in path:
        raise ToolError(f"{field!r} contains a NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise ToolError(f"{field!r} must be relative to the working directory, got absolute path {path!r}")
    if ".." in pure.parts:
        raise ToolError(f"{field!r} may not contain '..' (it would leave the working directory): {path!r}")
    real_root = root.resolve()
    target = (real_root / pure).resolve()
    if target != real_root and real_root not in target.parents:
        raise ToolError(f"{field!r} {path!r} leads outside the working directory (through a symlink)")
    return target


def _root(ctx: ToolContext) -> Path:
    root = Path(ctx.workdir)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _shown(root: Path, target: Path) -> str:
    rel = target.relative_to(root.resolve())
    return str(rel) if str(rel) != "." else "."


def _read_file(args: dict[str, Any], ctx: ToolContext) -> str:
    root = _root(ctx)
    target = resolve_in_root(root, args.get("path"))
    limit = args.get("max_bytes", MAX_READ_BYTES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_READ_BYTES:
        raise ToolError(f"'max_bytes' must be an integer in 1..{MAX_READ_BYTES}, got {limit!r}")
    if not target.exists():
        raise ToolError(f"no such file: {_shown(root, target)}")
    if target.is_dir():
        raise ToolError(f"{_shown(root, target)} is a directory (use list_files)")
    # O_NOFOLLOW: the resolved path holds no symlink; refuse one swapped in since.
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ToolError(f"cannot read {_shown(root, target)}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    if len(data) > limit:
        text += f"\n[truncated at {limit} bytes]"
    return text


def _write_file(args: dict[str, Any], ctx: ToolContext) -> str:
    root = _root(ctx)
    target = resolve_in_root(root, args.get("path"))
    content = args.get("content")
    if not isinstance(content, str):
        raise ToolError(f"'content' must be a string, got {type(content).__name__}")
    append = args.get("append", False)
    if not isinstance(append, bool):
        raise ToolError(f"'append' must be true or false, got {append!r}")
    data = content.encode("utf-8")
    if len(data) > MAX_WRITE_BYTES:
        raise ToolError(f"'content' is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
    if target == root.resolve() or target.is_dir():
        raise ToolError(f"{_shown(root, target)} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as e:
        raise ToolError(f"cannot write {_shown(root, target)}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    verb = "appended" if append else "wrote"
    return f"{verb} {len(data)} bytes to {_shown(root, target)}"


def _walk(top: Path) -> list[Path]:
    """Every entry under `top`, never descending through a symlink (it may lead outside)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        out.extend(Path(dirpath) / n for n in dirnames + filenames)
    return out


def _list_files(args: dict[str, Any], ctx: ToolContext) -> str:
    root = _root(ctx)
    target = resolve_in_root(root, args.get("path", ".") or ".")
    recursive = args.get("recursive", False)
    if not isinstance(recursive, bool):
        raise ToolError(f"'recursive' must be true or false, got {recursive!r}")
    if not target.exists():
        raise ToolError(f"no such directory: {_shown(root, target)}")
    if not target.is_dir():
        raise ToolError(f"{_shown(root, target)} is a file (use read_file)")
    entries = sorted(_walk(target) if recursive else target.iterdir())
    lines = []
    real_root = root.resolve()
    for entry in entries[:MAX_LIST_ENTRIES]:
        rel = entry.relative_to(real_root)
        lines.append(f"{rel}/" if entry.is_dir() and not entry.is_symlink() else str(rel))
    if len(entries) > MAX_LIST_ENTRIES:
        lines.append(f"[{len(entries) - MAX_LIST_ENTRIES} more entries not shown]")
    return "\n".join(lines) if lines else "(empty)"


def file_tools() -> list[Tool]:
    """read_file, write_file and list_files, confined to each agent's working directory."""
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
             _write_file, destructive=True),
        Tool("list_files", "List the files in a directory of your working directory.",
             {"type": "object", "properties": {
                 "path": {**path, "default": "."},
                 "recursive": {"type": "boolean", "default": False}},
              "additionalProperties": False},
             _list_files, untrusted_output=True),
    ]
