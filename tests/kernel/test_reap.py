"""A long-running kernel forgets ended processes beyond a bound (their rows stay in the process table),
but never one whose descendants still run."""

import asyncio

from llmos.kernel import Kernel
from llmos.kernel import kernel as kernel_module
from tests.stub_backend import StubBackend


async def _done(sys) -> str:
    return "done"


def test_ended_processes_are_reaped_beyond_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_module, "ZOMBIES", 8)

    async def main():
        async with Kernel(StubBackend(), home=tmp_path, monitor="allow-all") as kernel:
            pids = [await kernel.spawn(_done) for _ in range(30)]
            for pid in pids[-8:]:
                assert await kernel.wait(pid) == "done"
            await asyncio.sleep(0)
            return kernel.ps(), kernel.table.process(pids[0])

    procs, first_row = asyncio.run(main())
    assert [p.pid for p in procs] == list(range(23, 31))  # the newest 8 ended ones
    assert first_row["state"] == "terminated" and first_row["result"] == "done"  # the table keeps it


def test_an_ended_parent_of_a_running_child_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_module, "ZOMBIES", 0)

    async def main():
        release = asyncio.Event()

        async def child(sys) -> None:
            await release.wait()

        async def parent(sys) -> int:
            return await sys.spawn(child)

        async with Kernel(StubBackend(), home=tmp_path, monitor="allow-all") as kernel:
            ppid = await kernel.spawn(parent)
            cpid = await kernel.wait(ppid)
            kept = {p.pid for p in kernel.ps()}
            release.set()
            await kernel.wait(cpid)
            for _ in range(3):
                await kernel.spawn(_done)  # later endings reap what is no longer needed
            await asyncio.sleep(0.05)
            return ppid, cpid, kept, {p.pid for p in kernel.ps()}

    ppid, cpid, kept, after = asyncio.run(main())
    assert {ppid, cpid} <= kept
    assert ppid not in after and cpid not in after
