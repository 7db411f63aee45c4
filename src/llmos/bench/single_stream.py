"""One user, one stream: llmos' prefill tokens/s, decode ms/token and peak memory, measured alone.

The case most local users are in, and the one llama.cpp is built for. The
measurement runs in a fresh Python process (`python -m llmos.bench.single_stream`)
so its peak resident memory (VmHWM) is the engine's own: no bench tables, no
HF peer, no earlier run in it. The caller gives the KV budget: one request of
the measured length, rounded up to whole blocks, as a one-slot llama-server's
context holds. A second fresh process measures a bare `import torch`, the
floor every PyTorch engine pays before its first weight.

Prefill is the time from the request's arrival to its first token (one
chunk: the prompt fits the step's token budget); decode is the time per token
after it, greedy with end of sequence ignored. threads is how many threads
share each quantized product and each decode attention (LLMOS_NUM_THREADS,
else the CPUs the process may run on).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from typing import Any

import numpy as np

from llmos.bench.rss import parse_vmhwm, peak_rss_bytes
from llmos.models.config import ModelConfig


def prompt_ids(prompt_len: int, seed: int = 1) -> list[int]:
    """A seeded prompt of ordinary vocabulary ids in [100, 10000), the same for every system."""
    return np.random.default_rng(seed).integers(100, 10000, size=prompt_len).tolist()


def one_request_kv_budget(config: ModelConfig, tokens: int, block_size: int, itemsize: int) -> int:
    """Bytes of KV for one request of `tokens` tokens, in whole blocks."""
    return math.ceil(tokens / block_size) * block_size * config.kv_bytes_per_token * itemsize


def measure(model: str, prompt_len: int, gen_len: int, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """In this process: one request of prompt_len tokens generating gen_len, after a short warm-up."""
    from llmos.engine import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    llm.generate([prompt_ids(16, seed=2)], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
    stamps: list[float] = []
    params = SamplingParams(temperature=0, max_tokens=gen_len + 1, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    llm.generate([prompt_ids(prompt_len)], params, on_step=lambda _: stamps.append(time.perf_counter()))
    from llmos.models import quant

    return {"prefill_tok_s": prompt_len / (stamps[0] - t0),
            "decode_ms_per_token": 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
            "kv_budget_bytes": llm.engine.config.kv_budget_bytes(),
            "peak_rss_bytes": peak_rss_bytes(), "threads": quant.num_threads()}


def run_llmos(model: str, prompt_len: int, gen_len: int, **engine_kwargs: Any) -> dict[str, Any]:
    """`measure` in a fresh Python process; its result as a dict."""
    argv = [sys.executable, "-m", "llmos.bench.single_stream", json.dumps(
        {"model": str(model), "prompt_len": prompt_len, "gen_len": gen_len, "engine_kwargs": engine_kwargs})]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the single-stream run failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bare_torch_rss_bytes() -> int:
    """Peak resident memory of a fresh Python process that only imports torch."""
    code = "import torch; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            timeout=300).stdout
    return parse_vmhwm(status) or 0


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(measure(args["model"], args["prompt_len"], args["gen_len"], args["engine_kwargs"])))
