"""`llmos run | ps | top | kill` as real processes sharing one llmos home."""

import os
import subprocess
import sys
import time
from pathlib import Path

LLMOS = str(Path(sys.executable).with_name("llmos"))
NO_SERVER = "http://127.0.0.1:9/v1"  # the agents below make no LLM call

AGENT = '''
async def main(sys, rounds: int = 1000):
    sys.print("started")
    for _ in range(rounds):
        await sys.sleep(0.1)
    return "done"
'''


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLMOS, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"LLMOS_HOME": str(home), "COLUMNS": "200"})


def test_ps_top_and_kill_reach_a_kernel_in_another_process(tmp_path):
    agent = tmp_path / "sleeper.py"
    agent.write_text(AGENT)
    runner = subprocess.Popen([LLMOS, "run", str(agent), str(agent), "--backend-url", NO_SERVER, "--no-live"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"LLMOS_HOME": str(tmp_path), "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 60
        while "sleeper" not in (ps := llmos(tmp_path, "ps")).stdout or ps.stdout.count("blocked") < 2:
            assert time.monotonic() < deadline, ps.stdout + ps.stderr
            time.sleep(0.2)
        assert "  1 │ sleeper │ blocked" in ps.stdout and "  2 │ sleeper │ blocked" in ps.stdout
        top = llmos(tmp_path, "top", "--once")
        assert top.returncode == 0 and "policy fifo" in top.stdout and "sleeper" in top.stdout
        r = llmos(tmp_path, "kill", "1", "--signal", "suspend")
        assert r.returncode == 0 and r.stdout.strip() == "1 (sleeper): suspend: done"
        assert "suspended" in llmos(tmp_path, "ps").stdout
        for pid in ("1", "2"):
            r = llmos(tmp_path, "kill", pid)
            assert r.returncode == 0 and r.stdout.strip() == f"{pid} (sleeper): kill: done"
        out, errs = runner.communicate(timeout=60)
    finally:
        runner.kill()
    assert runner.returncode == 0, errs
    assert out.count("started") == 2 and out.count("killed: signal from llmos kill") == 2
    r = llmos(tmp_path, "kill", "1")
    assert r.returncode == 2
    assert "agent 1 (sleeper) has already ended: killed: signal from llmos kill" in r.stderr
    assert "no agents running" in llmos(tmp_path, "ps").stdout
    assert llmos(tmp_path, "ps", "--all").stdout.count("killed: signal from llmos kill") == 2


def test_run_ends_with_a_summary_and_bad_input_is_one_line(tmp_path):
    agent = tmp_path / "quick.py"
    agent.write_text(AGENT)
    r = llmos(tmp_path, "run", str(agent), "--arg", "rounds=2", "--backend-url", NO_SERVER)
    assert r.returncode == 0 and "summary: 1 agents" in r.stdout and "exited" in r.stdout
    for args, message in [
        (("run", "nope"), "no built-in agent 'nope'"),
        (("run", "chat", "--policy", "lottery"), "unknown policy 'lottery'"),
        (("run", str(agent), "--arg", "rounds"), "--arg takes KEY=VALUE, got 'rounds'"),
        (("kill", "999"), "no agent with pid 999"),
    ]:
        r = llmos(tmp_path, *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = llmos(tmp_path / "empty", "ps")
    assert r.returncode == 2 and "no kernel has run yet" in r.stderr
