"""Safe path resolution beneath an agent's working directory: the kernel side of a chroot.

A sandboxed process (uid nobody) owns the agent's working directory and may
run at the same time as the kernel (root) acts on it for that agent's file
tools. Any check-then-use on a path string is then a race: the sandbox swaps a
directory for a symlink to a host directory between the check and the use.
This module never uses a path string twice. Every operation starts from a file
descriptor of the working directory and resolves beneath it without following
a symlink at any component:

- `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV)` where the kernel has it (Linux >= 5.6), otherwise a walk
  that opens one component at a time from the directory fd before it with
  `O_NOFOLLOW` (and `O_DIRECTORY` for the directories on the way). Both refuse
  `..`, absolute paths and any symlink, so the object opened is exactly the
  one its relative path names, the one a path grant was matched against;
- only regular files and directories are opened for use: a file is opened with
  `O_NONBLOCK` and checked with `fstat` on the descriptor, so a FIFO, socket or
  device node is refused at once and never blocks a tool thread; a file with a
  second hard link is refused too (its other name could lie outside a grant);
- what the kernel creates (directories, files) is handed to the sandbox's uid
  with `fchown` on the descriptor just created, never by path, so nothing
  outside the working directory can be chowned; and it reads or writes for an
  agent only files the agent's sandbox uid could read or write itself (by the
  mode bits of the opened object), so it lends the agent none of root's rights;
- `usage` and `Walk` go through the tree by descriptors, never through a link,
  and stop at bounds on the number of entries and on the depth.

Every refusal is an `UnsafePath` with a message fit for the agent.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic table)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_WALK_ENTRIES = 20_000  # a Walk (usage, listings) stops here
MAX_WALK_DEPTH = 64  # and at this many levels of directories


class UnsafePath(Exception):
    """A path the kernel refuses to act on (it would leave the root, follow a link, or block)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _probe_openat2() -> bool:
    root = os.open("/", _DIR_FLAGS)
    try:
        os.close(_openat2(root, ".", _DIR_FLAGS, 0))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):  # old kernel, or a seccomp filter
            return False
        raise
    finally:
        os.close(root)
    return True


USE_OPENAT2 = _probe_openat2()  # tests switch it off to exercise the walk


def parts_of(path: object, field: str = "path") -> tuple[str, ...]:
    """The components of a relative path; UnsafePath if it is absolute, climbs with `..` or is not text."""
    if not isinstance(path, str) or not path.strip():
        raise UnsafePath(f"{field!r} must be a non-empty relative path, got {path!r}")
    if "\x00" in path:
        raise UnsafePath(f"{field!r} contains a NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise UnsafePath(f"{field!r} must be relative to the working directory, got absolute path {path!r}")
    if ".." in pure.parts:
        raise UnsafePath(f"{field!r} may not contain '..' (it would leave the working directory): {path!r}")
    return tuple(p for p in pure.parts if p != ".")


def shown(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


def _refusal(e: OSError, parts: tuple[str, ...], what: str) -> UnsafePath:
    name = shown(parts)
    if e.errno == errno.ELOOP:
        return UnsafePath(f"{name!r} goes through a symlink: file tools never follow symlinks (one could "
                          f"lead outside the working directory or around a path grant)")
    if e.errno == errno.ENOENT:
        return UnsafePath(f"no such {what}: {name}")
    if e.errno == errno.ENOTDIR:
        return UnsafePath(f"{name}: a component of the path is not a directory")
    if e.errno == errno.EXDEV:
        return UnsafePath(f"{name!r} leads outside the working directory")
    if e.errno == errno.ENXIO:
        return UnsafePath(f"{name} is not a regular file (a FIFO or socket)")
    return UnsafePath(f"cannot open {name}: {e.strerror}")


def open_root(root: str | Path) -> int:
    """A directory fd of the working directory itself (created if missing; never through a symlink)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as e:
        raise UnsafePath(f"the working directory cannot be opened: {e.strerror}") from None


def _open_at(dir_fd: int, name: str, flags: int, mode: int = 0o644) -> int:
    """openat of one component with O_NOFOLLOW; a symlink there always raises ELOOP (not ENOTDIR)."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            try:
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
            except FileNotFoundError:
                pass
        raise


def _open_beneath(root_fd: int, parts: tuple[str, ...], flags: int, mode: int = 0) -> int:
    """Open `parts` under `root_fd`, refusing every symlink; raises OSError as open would."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if not parts:
        return os.open(".", flags & ~os.O_CREAT, dir_fd=root_fd)
    if USE_OPENAT2:
        try:
            return _openat2(root_fd, "/".join(parts), flags, mode)
        except OSError as e:
            if e.errno != errno.ENOTDIR:
                raise
            # A link where a directory is wanted reads ENOTDIR; the walk below tells it apart (ELOOP).
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            nxt = _open_at(fd, name, _DIR_FLAGS)
            os.close(fd)
            fd = nxt
        return _open_at(fd, parts[-1], flags, mode)
    finally:
        os.close(fd)


def open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    """A directory fd for `parts` beneath the root (never through a symlink)."""
    try:
        return _open_beneath(root_fd, parts, _DIR_FLAGS)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise UnsafePath(f"{shown(parts)} is not a directory") from None
        raise _refusal(e, parts, "directory") from None


def make_dirs(root_fd: int, parts: tuple[str, ...], owner: tuple[int, int] | None) -> int:
    """A directory fd for `parts`, creating missing directories (given to `owner` by fchown)."""
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            except OSError as e:
                raise _refusal(e, parts[: i + 1], "directory") from None
            try:
                nxt = _open_at(fd, name, _DIR_FLAGS)
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    raise UnsafePath(f"{shown(parts[: i + 1])} is not a directory") from None
                raise _refusal(e, parts[: i + 1], "directory") from None
            os.close(fd)
            fd = nxt
            if created and owner is not None:
                os.fchown(fd, *owner)
        return os.dup(fd)
    finally:
        os.close(fd)


def _require_regular(fd: int, parts: tuple[str, ...]) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{shown(parts)} is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{shown(parts)} is not a regular file (a FIFO, socket or device): refused")
    if st.st_nlink > 1:
        os.close(fd)
        raise UnsafePath(f"{shown(parts)} has {st.st_nlink} hard links: file tools refuse a file with "
                         f"another name (that name could lie outside a path grant)")
    return st


def _may(st: os.stat_result, user: tuple[int, int], write: bool) -> bool:
    """Whether `user` (uid, gid) may read (or write) the object by its mode bits."""
    r, w = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH), (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
    bits = w if write else r
    i = 0 if st.st_uid == user[0] else 1 if st.st_gid == user[1] else 2
    return bool(st.st_mode & bits[i])


def _require_access(fd: int, st: os.stat_result, parts: tuple[str, ...], user: tuple[int, int] | None,
                    write: bool) -> None:
    if user is not None and not _may(st, user, write):
        os.close(fd)
        raise UnsafePath(f"{shown(parts)}: permission denied (the agent's own sandbox could not "
                         f"{'write' if write else 'read'} it, so the kernel does not for it)")


def open_file(root_fd: int, parts: tuple[str, ...], user: tuple[int, int] | None = None) -> int:
    """A read-only fd of the regular file `parts` names; never blocks, never follows a link.

    `user`: the agent's sandbox uid/gid; a file it could not read itself is refused, so that
    moving a root-only file under a granted name gains the agent nothing.
    """
    if not parts:
        raise UnsafePath(". is a directory")
    try:
        fd = _open_beneath(root_fd, parts, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise _refusal(e, parts, "file") from None
    _require_access(fd, _require_regular(fd, parts), parts, user, write=False)
    return fd


def create_file(root_fd: int, parts: tuple[str, ...], *, append: bool,
                owner: tuple[int, int] | None) -> tuple[int, os.stat_result | None]:
    """A write fd for `parts` (created, missing directories too) and the old file's stat (None if new).

    An existing file is not truncated here: the caller writes from offset 0
    and truncates where its data ends (a truncate to zero first makes ext4
    flush the file; a FIFO or device is refused before any of it). `owner`:
    the agent's sandbox uid/gid; what is created becomes its, and an existing
    file must be one it could write itself.
    """
    if not parts:
        raise UnsafePath(". is a directory")
    dir_fd = make_dirs(root_fd, parts[:-1], owner)
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else 0
    try:
        try:
            fd = _open_at(dir_fd, parts[-1], flags | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            fd = _open_at(dir_fd, parts[-1], flags)
        else:
            if owner is not None:
                os.fchown(fd, *owner)
            return fd, None
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise UnsafePath(f"{shown(parts)} is a directory") from None
        raise _refusal(e, parts, "file") from None
    finally:
        os.close(dir_fd)
    old = _require_regular(fd, parts)
    _require_access(fd, old, parts, owner, write=True)
    return fd, old


@dataclass(frozen=True)
class Entry:
    parts: tuple[str, ...]
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class Walk:
    """The entries under a directory fd (lstat, sorted by name), descending only into real directories.

    Bounded: at most `limit` entries (MAX_WALK_ENTRIES by default) and MAX_WALK_DEPTH levels (so
    at most that many fds open, and no deep recursion); `truncated` says whether a bound cut it
    short. A directory swapped for a link while walking is skipped, never followed.
    """

    def __init__(self, dir_fd: int, base: tuple[str, ...] = (), *, recursive: bool = False,
                 limit: int | None = None) -> None:
        self.dir_fd, self.base, self.recursive = dir_fd, base, recursive
        self.budget = MAX_WALK_ENTRIES if limit is None else limit
        self.truncated = False

    def __iter__(self) -> Iterator[Entry]:
        return self._walk(self.dir_fd, self.base, 0)

    def _walk(self, fd: int, base: tuple[str, ...], depth: int) -> Iterator[Entry]:
        with os.scandir(fd) as it:  # never more names in memory than the budget allows
            names = sorted(e.name for e in itertools.islice(it, self.budget + 1))
        for name in names:
            if self.budget <= 0:
                self.truncated = True
                return
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            self.budget -= 1
            entry = Entry((*base, name), st)
            yield entry
            if not (self.recursive and entry.is_dir):
                continue
            if depth + 1 >= MAX_WALK_DEPTH:
                self.truncated = True
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # swapped for a symlink or removed since the stat
            try:
                yield from self._walk(sub, entry.parts, depth + 1)
            finally:
                os.close(sub)


@dataclass(frozen=True)
class Usage:
    bytes: int  # disk blocks in use (sparse files count what they really hold)
    entries: int
    complete: bool  # False when the walk stopped at a bound (entries or depth)


def usage(root: str | Path, limit: int | None = None) -> Usage:
    """The disk space and entries under the working directory (hard links counted once)."""
    limit = MAX_WALK_ENTRIES if limit is None else limit
    fd = open_root(root)
    try:
        seen: set[tuple[int, int]] = set()
        total = count = 0
        walk = Walk(fd, recursive=True, limit=limit)
        for entry in walk:
            count += 1
            key = (entry.st.st_dev, entry.st.st_ino)
            if key not in seen:
                seen.add(key)
                total += entry.st.st_blocks * 512
        return Usage(total, count, not walk.truncated)
    finally:
        os.close(fd)


def remove_changed_since(root: str | Path, since: float) -> tuple[int, int]:
    """Unlink every regular file under the root whose inode changed at or after `since` (ctime,
    which no process can set back), in passes of the walk's bound. Returns (files removed, bytes freed)."""
    removed = freed = 0
    while True:
        n, b = _remove_pass(root, since)
        removed, freed = removed + n, freed + b
        if n == 0:
            return removed, freed


def _remove_pass(root: str | Path, since: float) -> tuple[int, int]:
    fd = open_root(root)
    removed = freed = 0
    try:
        for entry in list(Walk(fd, recursive=True)):
            if not stat.S_ISREG(entry.st.st_mode) or entry.st.st_ctime < since:
                continue
            try:
                parent = open_dir(fd, entry.parts[:-1])
            except UnsafePath:
                continue
            try:
                os.unlink(entry.parts[-1], dir_fd=parent)  # unlinks a name, never follows one
                removed += 1
                freed += entry.st.st_blocks * 512
            except OSError:
                pass
            finally:
                os.close(parent)
    finally:
        os.close(fd)
    return removed, freed


def give_root_to(root: str | Path, uid: int, gid: int) -> None:
    """Hand the working directory itself (not its contents) to the sandbox's uid, by fd."""
    fd = open_root(root)
    try:
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
