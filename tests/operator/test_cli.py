"""`llmos operator` as a user runs it: a real process acting on a real child, approved from another shell."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from llmos.agents.operator import ApprovalQueue
from llmos.agents.operator.actions import KillProcess
from llmos.security.audit import AuditLog

LLMOS = str(Path(sys.executable).with_name("llmos"))


def run(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_HOME": str(home)}
    return subprocess.run([LLMOS, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_pending_approve_and_reject_from_the_command_line(tmp_path):
    queue = tmp_path / "q.db"
    empty = run("operator", "pending", "--queue", str(queue), home=tmp_path)
    assert "no action waits for approval" in empty.stdout
    a = ApprovalQueue(queue).submit(KillProcess(pid=4242, reason="hot loop"))
    b = ApprovalQueue(queue).submit(KillProcess(pid=4343))
    listing = run("operator", "pending", "--queue", str(queue), home=tmp_path).stdout
    assert '{"kind": "kill_process", "pid": 4242}' in listing and "hot loop" in listing
    r = run("operator", "approve", str(a), "--queue", str(queue), home=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"approved #{a}")
    assert run("operator", "reject", str(b), "--queue", str(queue), home=tmp_path).returncode == 0
    again = run("operator", "approve", str(a), "--queue", str(queue), home=tmp_path)
    assert again.returncode == 2 and f"approval request {a} is already approved" in again.stderr
    missing = run("operator", "approve", "99", "--queue", str(queue), home=tmp_path)
    assert missing.returncode == 2 and "no approval request with id 99" in missing.stderr


def test_operator_needs_a_grant(tmp_path):
    r = run("operator", "--duration", "1", home=tmp_path)
    assert r.returncode == 2 and "grant the operator something to look after" in r.stderr


def test_dry_run_reports_and_leaves_the_process_alone(tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        r = run("operator", "--dry-run", "--pid", str(busy.pid), "--cpu-percent", "20", "--duration", "6",
                "--interval", "0.5", home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "dry_run" in r.stdout and f"pid:{busy.pid}" in r.stdout
        time.sleep(0.2)
        assert busy.poll() is None and psutil.pid_exists(busy.pid)
        log = AuditLog(tmp_path / "audit.db")
        assert log.verify().ok
        rows = [(r["agent"], r["tool"], r["decision"], r["args_preview"]) for r in log.tail(50)]
        # the dry run was checked by the reference monitor (and the tool), nothing was done
        assert ("operator", "host.kill_process", "allow") in [r[:3] for r in rows]
        assert all('"dry_run":true' in r[3] for r in rows if r[1] == "host.kill_process")
    finally:
        busy.kill()
        busy.wait()
