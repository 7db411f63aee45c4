"""`llmos serve` as vLLM users run it: positional MODEL, options from a config file, a banner, a log
line per request, and a taken port refused before the model loads."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmos.agents.operator.tune import write_config
from llmos.server import serve_config

LLMOS = str(Path(sys.executable).with_name("llmos"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_reads_options_from_a_config_file_and_logs_each_request(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("served-model-name: smol\nmax_model_len: 512\nkv-budget: 64MiB\nlog-level: info\n"
                      "engine:\n  max_num_seqs: 3\n")
    port = free_port()
    env = {**os.environ, "LLMOS_HOME": str(tmp_path / "home")}
    env.pop("LLMOS_API_KEY", None)
    proc = subprocess.Popen([LLMOS, "serve", "smollm2-135m-instruct", "--config", str(config),
                             "--port", str(port), "--max-model-len", "768"],  # the command line wins
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["id"] == "smol" and card["max_model_len"] == 768
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "smol", "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"}]}, timeout=120)
        assert r.status_code == 200
        usage = r.json()["usage"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert "llmos serving smol on" in out and "context 768 tokens" in out and "up to 3 sequences" in out
    assert "KV cache" in out
    assert (f"POST /v1/chat/completions 200 tokens_in={usage['prompt_tokens']} "
            f"tokens_out={usage['completion_tokens']}") in err


def test_a_taken_port_is_refused_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        r = subprocess.run([LLMOS, "serve", "no-such-model", "--port", str(port)], capture_output=True,
                           text=True, env={**os.environ, "LLMOS_HOME": str(tmp_path)}, timeout=120)
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "not found" not in r.stderr  # it never got as far as looking for the model
    assert time.monotonic() - start < 60


def test_tuned_settings_and_config_errors(tmp_path):
    best = {"max_num_seqs": 32, "max_num_batched_tokens": 1024}
    tuned = write_config(tmp_path / "tuned.toml", {"best": best, "best_tok_per_s": 120.0,
                                                   "default_tok_per_s": 100.0, "gain": 0.2})
    assert serve_config.read(tuned) == ({}, best)
    (tmp_path / "bad.toml").write_text("max_model_len = 100\nturbo = true\n")
    options, _ = serve_config.read(tmp_path / "bad.toml")
    with pytest.raises(serve_config.ServeConfigError, match="unknown options turbo"):
        serve_config.merge({"max_model_len": None, "port": 8000}, set(), options, "bad.toml")
    (tmp_path / "engine.yaml").write_text("engine:\n  warp_speed: 9\n")
    with pytest.raises(serve_config.ServeConfigError, match="unknown engine settings warp_speed"):
        serve_config.read(tmp_path / "engine.yaml")
    (tmp_path / "serve.ini").write_text("[serve]\n")
    with pytest.raises(serve_config.ServeConfigError, match="must end in"):
        serve_config.read(tmp_path / "serve.ini")
    with pytest.raises(serve_config.ServeConfigError, match="No such file"):
        serve_config.read(tmp_path / "missing.toml")
    (tmp_path / "broken.yaml").write_text("port: [1, 2\n")  # malformed YAML is an error, not a traceback
    with pytest.raises(serve_config.ServeConfigError, match="broken.yaml does not parse"):
        serve_config.read(tmp_path / "broken.yaml")
    assert serve_config.merge({"port": 1, "host": "a"}, {"port"}, {"port": 2, "host": "b"}, "f") == \
        {"port": 1, "host": "b"}
