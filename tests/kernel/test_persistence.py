"""The process table outlives the kernel: a crashed kernel's agents are ended on the next boot."""

import asyncio
import os
import signal
import subprocess
import sys
import time

from llmos.kernel import Kernel, OpenAIBackend, ProcessTable

# A kernel in its own process: one agent exits, one sleeps until the kernel is killed.
_CRASHING_KERNEL = """
import asyncio, sys
from llmos.kernel import Kernel, OpenAIBackend

async def done(sys_):
    return "ok"

async def forever(sys_):
    await sys_.sleep(3600)

async def main():
    kernel = Kernel(OpenAIBackend("http://127.0.0.1:9/v1"), home=sys.argv[1])
    await kernel.wait(await kernel.spawn(done, "done"))
    await kernel.spawn(forever, "forever")
    await asyncio.sleep(0.1)  # it starts and goes to sleep
    await kernel.sync()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_restarted_kernel_knows_which_agents_existed_and_how_they_ended(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_KERNEL, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        table = ProcessTable(tmp_path / "kernel.db")
        live = table.processes(only_live=True)
        assert [(p["name"], p["state"]) for p in live] == [("forever", "blocked")]
        assert [b["os_pid"] for b in table.live_boots()] == [child.pid]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

    async def reboot() -> Kernel:
        kernel = Kernel(OpenAIBackend("http://127.0.0.1:9/v1"), home=tmp_path)
        await kernel.shutdown()
        return kernel

    kernel = asyncio.run(reboot())
    rows = {p["name"]: p for p in ProcessTable(tmp_path / "kernel.db").processes()}
    assert rows["done"]["state"] == "terminated" and rows["done"]["exit_reason"] == "exited"
    assert rows["done"]["result"] == "ok"
    assert rows["forever"]["state"] == "terminated"
    assert rows["forever"]["exit_reason"] == "kernel exited (boot 1)"
    assert kernel.boot == 2 and rows["forever"]["ended"] <= time.time()


def test_pids_are_never_reused_across_boots(tmp_path):
    async def noop(sys_):
        return None

    async def boot() -> int:
        kernel = Kernel(OpenAIBackend("http://127.0.0.1:9/v1"), home=tmp_path)
        pid = await kernel.spawn(noop)
        await kernel.wait(pid)
        await kernel.shutdown()
        return pid

    assert [asyncio.run(boot()) for _ in range(3)] == [1, 2, 3]
