"""File tools stay inside the agent's working directory, whatever path they are given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmos.tools.base import ToolContext, ToolError, ToolRegistry
from llmos.tools.files import file_tools


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


def test_refuses_symlinks_leading_outside(tools, ctx, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    os.symlink(secret, ctx.workdir / "link.txt")
    os.symlink(outdir, ctx.workdir / "linkdir")
    with pytest.raises(ToolError, match="outside the working directory"):
        call(tools, "read_file", ctx, path="link.txt")
    with pytest.raises(ToolError, match="outside the working directory"):
        call(tools, "write_file", ctx, path="link.txt", content="pwned")
    with pytest.raises(ToolError, match="outside the working directory"):
        call(tools, "write_file", ctx, path="linkdir/new.txt", content="pwned")
    with pytest.raises(ToolError, match="outside the working directory"):
        call(tools, "list_files", ctx, path="linkdir")
    assert secret.read_text() == "top secret"
    assert list(outdir.iterdir()) == []
    # a recursive listing shows the links but never walks through them
    (outdir / "hidden").write_text("h")
    assert call(tools, "list_files", ctx, recursive=True) == "link.txt\nlinkdir"


def test_symlink_inside_is_fine(tools, ctx):
    (ctx.workdir / "real.txt").write_text("ok")
    os.symlink("real.txt", ctx.workdir / "alias.txt")
    assert call(tools, "read_file", ctx, path="alias.txt") == "ok"


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
