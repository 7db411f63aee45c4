"""The llmos command, run as a user runs it: a real process, real model, its exit code and output."""

import os
import signal
import subprocess
import sys
from pathlib import Path

LLMOS = str(Path(sys.executable).with_name("llmos"))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LLMOS, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_version_and_models():
    assert run("--version").stdout.strip() == "llmos 0.1.0"
    assert "smollm2-135m-instruct" in run("models").stdout


def test_generate_streams_the_answer():
    r = run("generate", "--chat", "What is the capital of France?", "--max-tokens", "20")
    assert r.returncode == 0
    assert r.stdout.strip() == "The capital of France is Paris."


def test_chat_keeps_history_until_exit():
    r = run("chat", "--temperature", "0", "--max-tokens", "30",
            stdin="What is the capital of France?\nAnd of Italy?\n/exit\n")
    assert r.returncode == 0
    assert "The capital of France is Paris." in r.stdout
    assert "The capital of Italy is Rome." in r.stdout  # "And of Italy?" needs the first turn


def test_bad_input_is_one_clear_line():
    r = run("generate", "--model", "/no/such/model.gguf", "hello")
    assert r.returncode == 2
    assert "model '/no/such/model.gguf' not found" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "hello", "--top-p", "0")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr


def test_serve_drains_an_in_flight_request_on_sigterm_and_sigint():
    import json
    import signal
    import socket
    import time

    import httpx

    for sig in (signal.SIGTERM, signal.SIGINT):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([LLMOS, "serve", "--port", str(port), "--kv-budget", "64MiB"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            body = {"prompt": "Write a long story about a robot.", "max_tokens": 64, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            events, signalled = [], False
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: "):])
                    if not signalled:  # the first token is out, 63 are still to come: signal now
                        proc.send_signal(sig)
                        signalled = True
            assert proc.wait(timeout=60) == 0
            assert "Traceback" not in proc.stderr.read()
            assert events[-1] == "[DONE]"  # the stream the signal interrupted ran to its end
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[-1]["usage"]["completion_tokens"] == 64
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        finally:
            proc.kill()


# --- llmos run: exit status, tracebacks, arguments --------------------------------------------------

CRASH = '''async def helper(x):
    return 1 / x


async def main(sys, x: int = 0):
    await sys.tool_call("calculator", {"expression": "1 + 1"})
    return await helper(x)
'''


def test_run_rejects_a_misspelled_arg_and_a_sync_main_before_booting(tmp_path):
    (tmp_path / "crash.py").write_text(CRASH)
    (tmp_path / "sync.py").write_text("def main(sys):\n    return 1\n")
    r = subprocess.run([LLMOS, "run", "react", "--arg", "max_step=3"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert " ".join(r.stderr.split()) == ("error: unknown --arg 'max_step'; did you mean 'max_steps'? "
                                          "(react takes: task, tools, max_steps, max_tokens, constrained)")
    r = subprocess.run([LLMOS, "run", str(tmp_path / "crash.py"), "--arg", "y=1"], capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stderr.strip()) == (2, "error: unknown --arg 'y' (crash takes: x)")
    r = subprocess.run([LLMOS, "run", str(tmp_path / "sync.py")], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr.strip()) == (2, "error: sync: `main` must be an async function: "
                                                   "`async def main(sys, ...)`")


def test_run_exits_1_after_a_crash_with_the_agents_traceback(tmp_path):
    (tmp_path / "crash.py").write_text(CRASH)
    r = subprocess.run([LLMOS, "run", "crash.py", "--no-live"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "LLMOS_HOME": str(tmp_path / "home")})
    assert r.returncode == 1
    path = str(tmp_path / "crash.py")
    assert r.stderr.splitlines() == [
        "agent 1 (crash) crashed:", "Traceback (most recent call last):",
        f'  File "{path}", line 7, in main', "    return await helper(x)", "           ^^^^^^^^^^^^^^^",
        f'  File "{path}", line 2, in helper', "    return 1 / x", "           ~~^~~",
        "ZeroDivisionError: division by zero"]


def test_run_exits_130_on_ctrl_c_and_1_when_a_task_fails(tmp_path):
    (tmp_path / "sleepy.py").write_text("async def main(sys):\n    sys.print('sleeping')\n"
                                        "    await sys.sleep(60)\n")
    env = {**os.environ, "LLMOS_HOME": str(tmp_path / "home")}
    p = subprocess.Popen([LLMOS, "run", "sleepy.py", "--no-live"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    for line in p.stdout:
        if "sleeping" in line:
            p.send_signal(signal.SIGINT)
            break
    rest = p.stdout.read()
    assert p.wait(timeout=60) == 130
    assert "interrupted: ending the agents" in rest
    # react with one step cannot both compute and answer: the task fails, in one line (pid 2 in this home)
    r = subprocess.run([LLMOS, "run", "react", "--arg", "max_steps=1", "--no-live"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert (r.returncode, r.stderr.strip()) == (1, "agent 2 (react) failed its task: no answer after 1 steps")
