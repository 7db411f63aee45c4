"""File tools stay inside the agent's working directory, whatever path they are given.

Each test runs twice: resolution with openat2 (where the kernel has it) and with
the per-component O_NOFOLLOW walk that replaces it elsewhere.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from llmos.security import fs
from llmos.security.sandbox import NOBODY
from llmos.tools.base import ToolContext, ToolError, ToolRegistry
from llmos.tools.files import file_tools


@pytest.fixture(autouse=True, params=["openat2", "walk"])
def resolution(request, monkeypatch):
    if request.param == "openat2" and not fs.USE_OPENAT2:
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(fs, "USE_OPENAT2", request.param == "openat2")
    return request.param


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    work = tmp_path / "work"
    work.mkdir()
    return ToolContext(pid=1, agent="a", workdir=work, home=tmp_path / "home")


@pytest.fixture
def tools() -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(*file_tools())
    return reg


def call(tools: ToolRegistry, name: str, ctx: ToolContext, **args):
    return tools.get(name).fn(args, ctx)


def test_flags():
    by_name = {t.name: t for t in file_tools()}
    assert sorted(by_name) == ["list_files", "read_file", "write_file"]
    assert by_name["read_file"].untrusted_output and by_name["list_files"].untrusted_output
    assert not by_name["write_file"].untrusted_output and by_name["write_file"].destructive
    assert by_name["read_file"].spec()["function"]["parameters"]["required"] == ["path"]


def test_write_read_list_roundtrip(tools, ctx):
    assert call(tools, "write_file", ctx, path="notes/a.txt", content="héllo\n") == \
        "wrote 7 bytes to notes/a.txt"
    assert call(tools, "write_file", ctx, path="notes/a.txt", content="more", append=True) == \
        "appended 4 bytes to notes/a.txt"
    assert call(tools, "read_file", ctx, path="notes/a.txt") == "héllo\nmore"
    assert (ctx.workdir / "notes" / "a.txt").read_text() == "héllo\nmore"
    call(tools, "write_file", ctx, path="b.txt", content="x")
    assert call(tools, "list_files", ctx) == "b.txt\nnotes/"
    assert call(tools, "list_files", ctx, path="notes") == "notes/a.txt"
    assert call(tools, "list_files", ctx, recursive=True) == "b.txt\nnotes/\nnotes/a.txt"
    assert call(tools, "read_file", ctx, path="./notes//a.txt") == "héllo\nmore"


def test_read_truncates(tools, ctx):
    (ctx.workdir / "big").write_text("abcdef")
    assert call(tools, "read_file", ctx, path="big", max_bytes=3) == "abc\n[truncated at 3 bytes]"


@pytest.mark.parametrize("path, message", [
    ("/etc/passwd", "absolute path"),
    ("~/x", "absolute path"),
    ("../outside.txt", "may not contain '..'"),
    ("a/../../outside.txt", "may not contain '..'"),
    ("", "non-empty relative path"),
    (7, "non-empty relative path"),
])
@pytest.mark.parametrize("tool", ["read_file", "write_file", "list_files"])
def test_refuses_paths_outside(tools, ctx, tool, path, message):
    if tool == "list_files" and path == "":
        path = 7  # an empty path lists the working directory itself
    with pytest.raises(ToolError, match=message):
        call(tools, tool, ctx, path=path, content="x")
    assert not (ctx.workdir.parent / "outside.txt").exists()


SYMLINK = "goes through a symlink"


def test_refuses_symlinks_leading_outside(tools, ctx, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    os.symlink(secret, ctx.workdir / "link.txt")
    os.symlink(outdir, ctx.workdir / "linkdir")
    os.symlink("../outdir", ctx.workdir / "rel")
    for tool, path in [("read_file", "link.txt"), ("write_file", "link.txt"),
                       ("write_file", "linkdir/new.txt"), ("list_files", "linkdir"), ("read_file", "rel/x"),
                       ("write_file", "rel/x/y"), ("list_files", "rel")]:
        link = path.split("/")[0]  # the message names the path up to the link
        with pytest.raises(ToolError, match=f"'{link}[^']*' {SYMLINK}: .*outside the working directory"):
            call(tools, tool, ctx, path=path, content="pwned")
    assert secret.read_text() == "top secret"
    assert list(outdir.iterdir()) == []
    # a recursive listing shows the links but never walks through them
    (outdir / "hidden").write_text("h")
    assert call(tools, "list_files", ctx, recursive=True) == "link.txt\nlinkdir\nrel"


def test_symlinks_inside_are_refused_too(tools, ctx):
    """A link inside the workdir could still lead around a path grant (docs/x -> ../secret.txt)."""
    (ctx.workdir / "real.txt").write_text("ok")
    (ctx.workdir / "docs").mkdir()
    os.symlink("../real.txt", ctx.workdir / "docs" / "innocent.txt")
    os.symlink("docs", ctx.workdir / "alias")
    with pytest.raises(ToolError, match=f"'docs/innocent.txt' {SYMLINK}"):
        call(tools, "read_file", ctx, path="docs/innocent.txt")
    with pytest.raises(ToolError, match=f"'docs/innocent.txt' {SYMLINK}"):
        call(tools, "write_file", ctx, path="docs/innocent.txt", content="x")
    with pytest.raises(ToolError, match=f"'alias/innocent.txt' {SYMLINK}"):
        call(tools, "read_file", ctx, path="alias/innocent.txt")
    assert (ctx.workdir / "real.txt").read_text() == "ok"
    assert call(tools, "read_file", ctx, path="real.txt") == "ok"


def test_hard_links_are_refused(tools, ctx):
    (ctx.workdir / "secret.txt").write_text("s")
    (ctx.workdir / "docs").mkdir()
    os.link(ctx.workdir / "secret.txt", ctx.workdir / "docs" / "innocent.txt")
    for tool in ("read_file", "write_file"):
        with pytest.raises(ToolError, match="docs/innocent.txt has 2 hard links: file tools refuse"):
            call(tools, tool, ctx, path="docs/innocent.txt", content="overwritten")
    assert (ctx.workdir / "secret.txt").read_text() == "s"


def _special_files(workdir: Path) -> dict[str, Path]:
    """A FIFO, a listening unix socket and a character device (a copy of /dev/zero) in the workdir."""
    os.mkfifo(workdir / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(workdir / "sock"))
    sock.listen(1)
    out = {"fifo": workdir / "fifo", "sock": workdir / "sock"}
    if os.getuid() == 0:
        os.mknod(workdir / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        out["zero"] = workdir / "zero"
    return out


def test_fifos_sockets_and_devices_are_refused_at_once(tools, ctx):
    specials = _special_files(ctx.workdir)
    reader = os.open(specials["fifo"], os.O_RDONLY | os.O_NONBLOCK)  # a reader present: write could open
    try:
        for name in specials:
            for tool in ("read_file", "write_file"):
                t0 = time.monotonic()
                with pytest.raises(ToolError, match=f"{name} is not a regular file"):
                    call(tools, tool, ctx, path=name, content="x")
                assert time.monotonic() - t0 < 1
    finally:
        os.close(reader)
    with pytest.raises(ToolError, match="fifo is not a regular file"):  # and with no reader
        call(tools, "write_file", ctx, path="fifo", content="x")
    assert stat.S_ISFIFO(os.lstat(specials["fifo"]).st_mode)


def test_created_files_belong_to_the_sandbox_uid(tools, ctx):
    if os.getuid() != 0:
        pytest.skip("only root hands files to the sandbox's uid")
    call(tools, "write_file", ctx, path="a/b/c.txt", content="x")
    for p in ("a", "a/b", "a/b/c.txt"):
        st = os.lstat(ctx.workdir / p)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), p
    assert os.lstat(ctx.workdir).st_uid == 0  # the tools never chown the directory itself


def test_write_file_keeps_the_disk_quota(ctx):
    reg = ToolRegistry()
    reg.register(*file_tools(disk_mb=1))
    half = "x" * (600 << 10)
    assert call(reg, "write_file", ctx, path="a", content=half) == f"wrote {len(half)} bytes to a"
    with pytest.raises(ToolError, match="disk quota exceeded: .* would pass its quota of 1 MiB"):
        call(reg, "write_file", ctx, path="b", content=half)
    with pytest.raises(ToolError, match="disk quota exceeded"):
        call(reg, "write_file", ctx, path="a", content=half, append=True)
    assert not (ctx.workdir / "b").exists() and (ctx.workdir / "a").stat().st_size == len(half)
    call(reg, "write_file", ctx, path="a", content=half)  # overwriting gives its space back first


def test_clear_errors(tools, ctx):
    with pytest.raises(ToolError, match="no such file: missing.txt"):
        call(tools, "read_file", ctx, path="missing.txt")
    (ctx.workdir / "d").mkdir()
    with pytest.raises(ToolError, match="d is a directory"):
        call(tools, "read_file", ctx, path="d")
    with pytest.raises(ToolError, match="is a directory"):
        call(tools, "write_file", ctx, path="d", content="x")
    with pytest.raises(ToolError, match="'content' must be a string"):
        call(tools, "write_file", ctx, path="f", content=3)
    with pytest.raises(ToolError, match="no such directory: nope"):
        call(tools, "list_files", ctx, path="nope")
    with pytest.raises(ToolError, match="'max_bytes' must be an integer"):
        call(tools, "read_file", ctx, path="f", max_bytes=0)
    assert call(tools, "list_files", ctx) == "d/"


def test_overwrite_replaces_the_whole_file(tools, ctx):
    call(tools, "write_file", ctx, path="f", content="a long first version")
    assert call(tools, "write_file", ctx, path="f", content="short") == "wrote 5 bytes to f"
    assert call(tools, "read_file", ctx, path="f") == "short"
    call(tools, "write_file", ctx, path="f", content="")
    assert (ctx.workdir / "f").read_bytes() == b""
