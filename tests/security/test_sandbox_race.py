"""Adversarial: a running sandbox attacks the kernel's own file operations on its workdir.

The sandbox (uid nobody) owns the agent's working directory while the kernel
(root) acts in it for the same agent. These tests run the attacks of issue 13
for real: a sandboxed loop swapping a directory for a symlink to a host
directory while the agent reads, writes, lists and starts more sandboxes;
symlinks around a path grant; FIFOs that would block the tool threads.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from llmos.security.capabilities import Capabilities
from llmos.security.escapes import SWAPPER
from llmos.security.sandbox import SandboxLimits, isolation
from llmos.tools.base import ToolContext, ToolError, ToolRegistry
from llmos.tools.files import file_tools
from llmos.tools.python import python_tool
from llmos.tools.shell import shell_tool

SECRET = "ROOT-ONLY-SECRET-4711"
SWAPS = 4_000  # the swapping loop's fixed number of iterations


root_sandbox = pytest.mark.skipif(os.getuid() != 0 or not isolation()["namespaces"],
                                  reason="the race needs root and a namespaced sandbox that drops to nobody")


@pytest.fixture
def tools() -> ToolRegistry:
    reg = ToolRegistry()
    reg.register(*file_tools(), shell_tool(), python_tool(SandboxLimits(cpu_s=60, wall_s=120)))
    return reg


def _host_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int, int, str]]]:
    """A root-only host directory with root-only files; returns it and its (uid, gid, mode, content)."""
    host = tmp_path / "host"
    host.mkdir(mode=0o700)
    (host / "secret").write_text(SECRET)
    (host / "sub").mkdir(mode=0o700)
    (host / "sub" / "secret2").write_text(SECRET)
    for p in (host / "secret", host / "sub" / "secret2"):
        p.chmod(0o600)
    return host, _snapshot(host)


def _snapshot(host: Path) -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for p in [host, *sorted(host.rglob("*"))]:
        st = os.lstat(p)
        out[str(p.relative_to(host))] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode),
                                         p.read_text() if p.is_file() else "")
    return out


@root_sandbox
def test_symlink_swapping_sandbox_cannot_lead_the_kernel_outside(tools, tmp_path: Path):
    host, before = _host_dir(tmp_path)
    ctx = ToolContext(pid=1, agent="attacker", workdir=tmp_path / "work", home=tmp_path)
    call = lambda name, **args: tools.get(name).fn(args, ctx)  # noqa: E731
    call("write_file", path="d/secret", content="decoy")
    call("write_file", path="d/sub/secret2", content="decoy")
    swap = SWAPPER.format(n=SWAPS, host=str(host))
    attacker: dict[str, str] = {}
    t = threading.Thread(target=lambda: attacker.update(out=call("run_python", code=swap)))
    t.start()
    seen: list[str] = []
    refused = {"symlink": 0, "other": 0}
    calls = 0
    while t.is_alive() or calls == 0:
        for name, args in (("read_file", {"path": "d/secret"}), ("read_file", {"path": "d/sub/secret2"}),
                           ("write_file", {"path": f"d/w{calls % 3}", "content": "pwned"}),
                           ("write_file", {"path": "d/sub/secret2", "content": "pwned"}),
                           ("list_files", {"path": "d", "recursive": True})):
            try:
                seen.append(str(call(name, **args)))
            except ToolError as e:
                refused["symlink" if "symlink" in str(e) else "other"] += 1
                seen.append(str(e))
        if calls % 10 == 0:  # a second sandbox starting (the chown before it) while the first swaps
            seen.append(call("run_shell", command="ls -R d > /dev/null; true"))
        calls += 1
    t.join()
    assert _snapshot(host) == before  # nothing read-modified, written, created or chowned on the host
    assert not any(SECRET in s for s in seen)  # and nothing read from it
    assert attacker["out"].startswith("exit code 0") and f"swapped {SWAPS}" in attacker["out"]
    assert refused["symlink"] > 0, f"the race was never hit in {calls} rounds: {refused}"


@root_sandbox
def test_chown_before_a_sandbox_never_follows_links(tools, tmp_path: Path):
    host, before = _host_dir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(host, work / "abs")
    os.symlink("../host", work / "rel")
    os.symlink(host / "secret", work / "file")
    ctx = ToolContext(pid=1, agent="a", workdir=work, home=tmp_path)
    out = tools.get("run_shell").fn({"command": "cat abs/secret rel/secret file; echo done"}, ctx)
    assert SECRET not in out and "done" in out
    assert _snapshot(host) == before
    assert os.lstat(work).st_uid == 65534  # the directory itself is the sandbox's


def test_symlink_made_by_the_agents_shell_does_not_widen_a_path_grant(tools, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_text(SECRET)
    (work / "secret.txt").chmod(0o600)  # root's: the sandbox itself cannot read it
    ctx = ToolContext(pid=1, agent="a", workdir=work, home=tmp_path)
    out = tools.get("run_shell").fn({"command": "mkdir -p docs && ln -s ../secret.txt docs/innocent.txt "
                                                "&& ln -s .. docs/up && echo made"}, ctx)
    assert "made" in out
    caps = Capabilities.of([{"tool": "read_file", "root": str(work), "paths": {"path": ["docs/**"]}}])
    for path in ("docs/innocent.txt", "docs/up/secret.txt"):
        assert caps.check("read_file", {"path": path}, work).allowed  # the grant matches the name...
        with pytest.raises(ToolError, match="goes through a symlink"):  # ...and the tool opens no link
            tools.get("read_file").fn({"path": path}, ctx)
    assert not caps.check("read_file", {"path": "secret.txt"}, work).allowed


def test_fifos_do_not_exhaust_the_tool_threads(tools, tmp_path: Path):
    """Many agents point read_file/write_file at FIFOs no one opens; every call errors at once and
    another agent's tool still runs on the same default thread pool the kernel uses."""
    pool = min(32, (os.cpu_count() or 1) + 4)
    agents = []
    for i in range(3 * pool):
        work = tmp_path / f"w{i}"
        work.mkdir()
        os.mkfifo(work / "pipe")
        agents.append(ToolContext(pid=i, agent=f"a{i}", workdir=work, home=tmp_path))
    other = ToolContext(pid=999, agent="other", workdir=tmp_path / "other", home=tmp_path)
    tools.get("write_file").fn({"path": "ok.txt", "content": "fine"}, other)

    async def attack() -> tuple[list, str, float]:
        t0 = time.monotonic()
        calls = [asyncio.to_thread(tools.get("read_file" if i % 2 else "write_file").fn,
                                   {"path": "pipe", "content": "x"}, ctx) for i, ctx in enumerate(agents)]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        read = tools.get("read_file").fn
        ok = await asyncio.wait_for(asyncio.to_thread(read, {"path": "ok.txt"}, other), 5)
        return results, ok, time.monotonic() - t0

    results, ok, took = asyncio.run(attack())
    assert ok == "fine" and took < 5
    assert all(isinstance(r, ToolError) and "pipe is not a regular file" in str(r) for r in results), results


@root_sandbox
def test_moving_a_root_only_file_under_a_granted_name_gains_nothing(tools, tmp_path: Path):
    """No link at all: the agent's shell renames a root-only file (it may: it owns the directory)
    into docs/. The kernel reads and writes for the agent only what its sandbox uid could itself."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_text(SECRET)
    (work / "secret.txt").chmod(0o600)
    (work / "config").write_text("root's, world-readable")
    (work / "config").chmod(0o644)
    ctx = ToolContext(pid=1, agent="a", workdir=work, home=tmp_path)
    out = tools.get("run_shell").fn({"command": "mkdir docs && mv secret.txt docs/innocent.txt && "
                                                "mv config docs/config && echo moved"}, ctx)
    assert "moved" in out
    with pytest.raises(ToolError, match="docs/innocent.txt: permission denied .*could not read it"):
        tools.get("read_file").fn({"path": "docs/innocent.txt"}, ctx)
    with pytest.raises(ToolError, match="docs/config: permission denied .*could not write it"):
        tools.get("write_file").fn({"path": "docs/config", "content": "overwritten"}, ctx)
    assert tools.get("read_file").fn({"path": "docs/config"}, ctx) == "root's, world-readable"
    assert (work / "docs" / "innocent.txt").read_text() == SECRET
    assert (work / "docs" / "config").read_text() == "root's, world-readable"
