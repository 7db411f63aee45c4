"""A remote agent program's LLM calls are the kernel's: scheduled by its policy beside in-process agents,
and killing the remote process aborts its generation and frees its KV blocks (the embedded model)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmos.server.system import boot
from tests.kernel.test_kernel import LONG, generate
from tests.server.test_service import Served

LLMOS = str(Path(sys.executable).with_name("llmos"))

REMOTE = '''
import asyncio
from pathlib import Path

async def main(sys, go, max_tokens="24"):
    while not Path(go).exists():  # wait here, outside the kernel, until the test says go
        await asyncio.sleep(0.02)
    r = await sys.llm_generate("Write a long story about a robot who learns to paint. Once upon a time",
                               max_tokens=int(max_tokens))
    return r.completion_tokens
'''


def _until(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _remote(served: Served, tmp_path: Path, max_tokens: int) -> tuple[subprocess.Popen, Any, Path]:
    """`llmos run --url` of the REMOTE program, spawned and waiting for its go file."""
    (tmp_path / "remote.py").write_text(REMOTE)
    go = tmp_path / f"go-{max_tokens}"
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOS_API_KEY", "LLMOS_URL")}
    argv = [LLMOS, "run", "--url", served.url, str(tmp_path / "remote.py"), "--arg", f"go={go}",
            "--arg", f"max_tokens={max_tokens}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env | {"LLMOS_HOME": str(served.system.home)})
    kernel = served.system.kernel
    _until(lambda: p.poll() is None and any(q.name == "remote" and q.alive for q in kernel.procs.values()))
    [proc] = [q for q in kernel.procs.values() if q.name == "remote" and q.alive]
    return p, proc, go


def test_remote_llm_calls_are_scheduled_by_priority_beside_local_agents(llm, tmp_path: Path):
    served = Served(boot(tmp_path / "home", llm=llm, policy="priority", max_running=1, quantum=4))
    try:
        kernel = served.system.kernel
        p, remote, go = _remote(served, tmp_path, 24)

        async def locals_() -> list[int]:
            low = await kernel.spawn(generate, "low", args={"prompt": LONG, "max_tokens": 64}, priority=5)
            while kernel.process(low).tokens_used < 3:
                await asyncio.sleep(0.01)
            mid = await kernel.spawn(generate, "mid", args={"prompt": LONG, "max_tokens": 64}, priority=3)
            while kernel.process(mid).tokens_used < 3:
                await asyncio.sleep(0.01)
            return [low, mid]

        low, mid = served.run(locals_(), timeout=120)
        go.touch()  # the remote program's call arrives while the local ones generate: it is the most urgent
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert f"pid {remote.pid} (remote): exited: 24" in out
        served.run(kernel.wait(low), timeout=120)
        ended = {name: kernel.process(pid).ended for name, pid in (("low", low), ("mid", mid),
                                                                    ("remote", remote.pid))}
        assert sorted(ended, key=ended.get) == ["remote", "mid", "low"]
        assert kernel.sched.preemptions >= 2
    finally:
        served.close()


def test_killing_a_remote_program_aborts_its_generation_and_frees_its_blocks(llm, tmp_path: Path):
    served = Served(boot(tmp_path / "home", llm=llm))
    try:
        p, remote, go = _remote(served, tmp_path, 400)
        go.touch()
        _until(lambda: remote.tokens_used > 5)
        admin = served.client(served.system.local_key)
        r = admin.post(f"/v1/kernel/processes/{remote.pid}/signal", json={"signal": "kill"})
        assert r.status_code == 200 and r.json()["state"] == "terminated"
        stats = served.run(llm.stats())
        assert stats["kv_blocks_used"] == 0 and not llm.engine.requests
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2 and "ProcessEnded" in err
        assert served.system.kernel.table.syscall_log(remote.pid)[-1]["status"] == "killed"
    finally:
        served.close()
