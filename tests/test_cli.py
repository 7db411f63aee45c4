"""The llmos command, run as a user runs it: a real process, real model, its exit code and output."""

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
