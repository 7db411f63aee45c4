import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.agents.operator import Actuator, host_kernel, operator_process
from llmos.security.audit import AuditLog


@pytest.fixture
def spawn():
    """Start real child processes (busy loops, sleepers); every one is killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(code: str = "import time; time.sleep(60)") -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code])
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


@pytest.fixture
def host(tmp_path: Path):
    """`host(grants, body)`: run `await body(kernel, actuator)` on a fresh host kernel (the host tools
    behind the reference monitor, auditing to tmp_path/audit.db) in an operator process holding `grants`."""

    def run(grants, body, backend=None):
        async def go():
            kernel = host_kernel(home=tmp_path / "home", backend=backend, audit_path=tmp_path / "audit.db")
            try:
                handle = await operator_process(kernel, grants)
                return await body(kernel, Actuator(handle, grants))
            finally:
                await kernel.shutdown()

        return asyncio.run(go())

    return run


@pytest.fixture
def audited(tmp_path: Path):
    """The (tool, decision, reason) rows the monitor wrote to tmp_path/audit.db, after checking its chain."""

    def rows() -> list[tuple[str, str, str]]:
        log = AuditLog(tmp_path / "audit.db")
        assert log.verify().ok
        return [(r["tool"], r["decision"], r["reason"]) for r in log.tail(1000) if r["agent"] == "operator"]

    return rows


@pytest.fixture(scope="module")
def llm():
    """The embedded engine, one per test module (the operator's changes to it stay in the module)."""
    from llmos.engine import AsyncLLM

    engine = AsyncLLM("smollm2-135m-instruct", kv_budget="128MiB")
    yield engine
    engine.shutdown()
