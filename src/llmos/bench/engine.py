"""`llmos bench engine`: llmos and HF transformers side by side on the same model and work.

Every system runs alone, one after the other in this process (on 2 cores a
second busy process stalls torch's threads many-fold), on identical weights
and requests; the table gives each one's requested output tokens per second
and llmos' ratio to it. Each HF peer runs at its best setting found by a sweep
(`generate`: length-sorted static batches over batch sizes; continuous batching:
its cap on requests per forward), with the sweep's rows printed and kept in the
JSON; `generate` as a loop would run it (arrival order, batches of 16) stays as
the row labelled untuned. Every row's greedy tokens are compared with llmos'.

On the CPU the quantized weights' greedy tokens are first compared with fp32's,
and `--profile` adds where one stream's decode step spends its time, phase by phase.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmos.bench import peers
from llmos.bench.peers import PeerResult, PeerSkipped
from llmos.bench.workloads import (
    BenchRequest,
    describe,
    max_sequence_len,
    qwen3_0_6b_config,
    workload_c,
    workload_g,
)
from llmos.engine import LLM, SamplingParams
from llmos.models.llama import LlamaForCausalLM
from llmos.models.loader import LoadedModel, load_model, read_gguf, read_hf_dir
from llmos.models.registry import resolve_model


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("tokens"), TimeElapsedColumn(), console=console)


def run_llmos(loaded: LoadedModel, requests: list[BenchRequest], advance=None,
              **engine_kwargs: Any) -> PeerResult:
    """llmos on a workload: greedy, EOS ignored, every request to its max_tokens."""
    llm = LLM(loaded, **engine_kwargs)
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False)
              for r in requests]
    llm.generate([requests[0].prompt_token_ids[:8]], SamplingParams(max_tokens=2))  # warm-up
    llm.engine.reset_metrics()
    peak = 0

    def on_step(outputs) -> None:
        nonlocal peak
        peak = max(peak, len(llm.engine.scheduler.running))
        if advance:
            advance(len(outputs))

    t0 = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests], params, on_step=on_step)
    wall = time.perf_counter() - t0
    requested = sum(r.max_tokens for r in requests)
    stats = llm.engine.stats()
    cfg = llm.engine.config
    extra = {
        "kv_utilization": stats["kv_utilization"],
        "kv_waste": stats["kv_waste"],
        "kv_blocks_total": stats["kv_blocks_total"],
        "block_size": cfg.block_size,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "peak_running": peak,
        "steps": stats["steps"],
        "preemptions": stats["preemptions"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "ttft_p50_s": stats["ttft_p50_s"],
        "itl_p50_s": stats["itl_p50_s"],
        "dtype": str(cfg.torch_dtype).removeprefix("torch."),
        "weights": _weight_formats(llm),
    }
    outputs = [o.outputs[0].token_ids for o in outs]
    return PeerResult("llmos", requested, wall, requested / wall, extra, outputs)


# -- where a decode step's time goes; quantized against fp32 ----------------------------------

@contextmanager
def profile_phases() -> Iterator[dict[str, float]]:
    """Time a step's phases (seconds, summed) by wrapping the model's parts for the duration.

    matmul: every linear layer and the lm_head (a fused quantized layer's two calls
    count here whole, their norms, RoPE and SiLU included); attention: the paged attention
    (KV write and read); norm/rope: RMSNorm and RoPE; embed: the token lookup;
    sampling: the sampler; forward (total) and step (total) frame them, and the
    rest is the scheduler's and Python's (scheduling, inputs, outputs, glue ops).
    """
    from llmos.engine import engine as engine_module
    from llmos.engine.attention import PagedAttention
    from llmos.engine.model_runner import ModelRunner
    from llmos.models import llama, quant

    phases: dict[str, float] = {}
    targets = [(torch.nn.Linear, "forward", "matmul"), (quant.QuantizedLinear, "forward", "matmul"),
               (quant, "fused_norm_qkv", "matmul"), (quant, "fused_out_mlp", "matmul"),
               (PagedAttention, "__call__", "attention"), (llama.RMSNorm, "forward", "norm/rope"),
               (llama.RotaryEmbedding, "forward", "norm/rope"), (torch.nn.Embedding, "forward", "embed"),
               (quant.QuantizedEmbedding, "forward", "embed"), (ModelRunner, "execute", "forward (total)"),
               (engine_module.LLMEngine, "step", "step (total)"), (engine_module, "sample", "sampling")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def timed(fn, phase: str):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0
        return wrapper

    for (owner, attr, phase), (_, _, fn) in zip(targets, saved, strict=True):
        setattr(owner, attr, timed(fn, phase))
    try:
        yield phases
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _phase_rows(phases: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per decode step by phase, the remainders named."""
    ms = {k: v * 1000 / steps for k, v in phases.items()}
    inner = sum(ms.get(k, 0.0) for k in ("matmul", "attention", "norm/rope", "embed"))
    step, forward = ms.get("step (total)", 0.0), ms.get("forward (total)", 0.0)
    return {"matmul": ms.get("matmul", 0.0), "attention": ms.get("attention", 0.0),
            "norm/rope": ms.get("norm/rope", 0.0), "embed": ms.get("embed", 0.0),
            "other model ops (inputs, residuals, activations)": forward - inner,
            "sampling": ms.get("sampling", 0.0),
            "scheduler/Python": step - forward - ms.get("sampling", 0.0), "step (total)": step}


def decode_profile(model: str, quantization: str = "auto", prompt_len: int = 128,
                   steps: int = 128) -> dict[str, Any]:
    """One stream's decode, phase by phase (ms per step), after its prompt is cached."""
    from llmos.bench.single_stream import prompt_ids

    llm = LLM(model, quantization=quantization, kv_budget="64MiB")
    prompt = prompt_ids(prompt_len)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False))  # warm, cached
    with profile_phases() as phases:
        llm.generate([prompt], params)
    return {"weights": _weight_formats(llm), "ms_per_step": _phase_rows(phases, steps)}


_QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about memory.",
              "What is 12 times 12?", "Explain what an operating system does.",
              "Give me a recipe for pancakes.", "Why is the sky blue?", "Tell me a short story about a cat."]


def greedy_agreement(model: str, quantization: str = "auto", prompts: int = 8,
                     tokens: int = 64) -> dict[str, Any]:
    """Greedy tokens of the quantized weights against fp32's on the same chat prompts.

    identical: tokens equal position by position (a sequence that diverges once
    usually differs after); prefix: tokens before each sequence's first divergence.
    """
    runs = {}
    for q in (quantization, "none"):
        llm = LLM(model, quantization=q, kv_budget="64MiB")
        chats = [llm.tokenizer.encode_chat([{"role": "user", "content": c}])
                 for c in (_QUESTIONS * prompts)[:prompts]]
        outs = llm.generate(chats, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                                  detokenize=False))
        runs[q] = ([o.outputs[0].token_ids for o in outs], _weight_formats(llm))
        del llm
    (quant_ids, weights), (fp32_ids, _) = runs[quantization], runs["none"]
    pairs = list(zip(quant_ids, fp32_ids, strict=True))
    same = sum(a == b for qa, fa in pairs for a, b in zip(qa, fa, strict=True))
    prefix = sum(next((i for i, (a, b) in enumerate(zip(qa, fa, strict=True)) if a != b), len(fa))
                 for qa, fa in pairs)
    return {"weights": weights, "prompts": prompts, "tokens": tokens, "identical": same,
            "prefix": prefix, "total": prompts * tokens}


def _weight_formats(llm: LLM) -> str:
    """The engine's weights: their quantized formats, else their dtype."""
    from llmos.models import quant

    kinds = {m.qweight.fmt.name for m in llm.engine.loaded.model.modules()
             if isinstance(m, quant.QuantizedLinear | quant.QuantizedEmbedding)}
    return "+".join(sorted(kinds)) or str(llm.engine.config.torch_dtype).removeprefix("torch.")


def _print_profile(console: Console, prof: dict[str, Any]) -> None:
    table = Table(title=f"one stream's decode step, {prof['weights']} weights (ms per step)")
    table.add_column("phase")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    total = prof["ms_per_step"]["step (total)"]
    for k, v in prof["ms_per_step"].items():
        table.add_row(k, f"{v:.2f}", f"{v / total:.0%}" if total else "-")
    console.print(table)


def kv_comparison(requests: list[BenchRequest], utilization: float, block_size: int,
                  budget_tokens: int) -> dict[str, float]:
    """Paged KV against a static reservation of prompt + max_tokens per request.

    A static reservation holds p + m slots from the start while the request fills
    them, p + i after its i-th token: its time-averaged utilisation is
    sum(p + (m + 1) / 2) / sum(p + m). In a budget of B slots it fits B / mean(p + m)
    requests; paging fits B / (mean(p + (m + 1) / 2) / measured utilisation).
    """
    held = sum(len(r.prompt_token_ids) + (r.max_tokens + 1) / 2 for r in requests)
    reserved = sum(len(r.prompt_token_ids) + r.max_tokens for r in requests)
    n = len(requests)
    paged_footprint = held / n / utilization if utilization else float("inf")
    return {
        "static_utilization": held / reserved,
        "paged_utilization": utilization,
        "budget_tokens": budget_tokens,
        "static_concurrency": int(budget_tokens // (reserved / n)),
        "paged_concurrency": int(budget_tokens // paged_footprint),
    }


def _load_workload(name: str, model: str, quick: bool, device: torch.device, quantization: str):
    """(loaded llmos model, a function giving HF-named weights for the peers, requests, dtype)."""
    if name == "G":
        config, dtype = qwen3_0_6b_config(), torch.bfloat16
        weights = peers.random_state_dict(config, dtype, device)
        requests = workload_g(quick)
        with torch.device("meta"):
            net = LlamaForCausalLM(config, max_positions=max_sequence_len(requests))
        net.load_hf_state_dict(weights)
        loaded = LoadedModel(config, net.eval().requires_grad_(False), None, Path("random"))
        return loaded, lambda: weights, requests, dtype
    path = resolve_model(model)
    loaded = load_model(path, dtype=torch.float32, device=device, quantization=quantization)
    reader = read_hf_dir if path.is_dir() else read_gguf  # the peers read the same file
    return loaded, lambda: reader(path)[1], workload_c(quick), torch.float32


GENERATE_BATCH_SIZES = (4, 8, 16, 32, 64)
CB_MAX_BATCHES = (4, 8, 16, 32, 64)  # 64: every request of workload C, transformers' default there


def _sweep_sizes(sizes: tuple[int, ...], requests: list[BenchRequest]) -> list[int]:
    """The sizes below the workload's request count, then that count if a size reaches it (any
    larger size is the same run), in ascending order."""
    n = len(requests)
    return sorted(s for s in sizes if s < n) + ([n] if max(sizes) >= n else [])


def run_engine_bench(console: Console, quick: bool = False, model: str = "smollm2-135m-instruct",
                     json_path: str | None = None, peers_too: bool = True, workload: str = "auto",
                     profile: bool = False, quantization: str = "auto",
                     generate_batch_sizes: tuple[int, ...] = GENERATE_BATCH_SIZES,
                     cb_max_batches: tuple[int, ...] = CB_MAX_BATCHES,
                     **engine_kwargs: Any) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    name = {"auto": "G" if cuda else "C", "c": "C", "g": "G"}.get(workload.lower(), workload)
    device = torch.device("cuda" if name == "G" else "cpu")
    quality: dict[str, Any] = {}
    if name == "C" and quantization != "none":
        with console.status("greedy tokens: quantized weights against fp32 ..."):
            quality["greedy_vs_fp32"] = agree = greedy_agreement(model, quantization,
                                                                  *((4, 32) if quick else (8, 64)))
        console.print(f"greedy {agree['weights']} vs fp32 weights: {agree['identical']}/{agree['total']} "
                      f"identical tokens ({agree['identical'] / agree['total']:.1%}) on {agree['prompts']} "
                      f"chat prompts x {agree['tokens']} tokens; {agree['prefix']} before the first "
                      "divergence of each")
    if name == "C" and profile:
        with console.status("profiling one stream's decode ..."):
            quality["decode_profile"] = prof = decode_profile(model, quantization)
        _print_profile(console, prof)
    engine_kwargs = {**engine_kwargs, "quantization": quantization}
    with console.status(f"loading workload {name} ..."):
        loaded, peer_weights, requests, dtype = _load_workload(name, model, quick, device, quantization)
    info = describe(requests)
    console.print(f"workload {name}{' (quick)' if quick else ''}: {info['requests']} requests, "
                  f"{info['prompt_tokens']} prompt tokens, {info['requested_output_tokens']} "
                  f"output tokens requested; {dtype}, {device}, {torch.get_num_threads()} threads")
    results: list[PeerResult | PeerSkipped] = []
    sweeps: dict[str, list[PeerResult | PeerSkipped]] = {}
    with _progress(console) as bar:
        def task(label: str):
            t = bar.add_task(label, total=info["requested_output_tokens"])
            return lambda n: bar.advance(t, n)

        results.append(run_llmos(loaded, requests, task("llmos"), device=str(device),
                                 dtype=str(dtype).removeprefix("torch."), **engine_kwargs))
        ours = results[0]
        if peers_too:
            hf = peers.build_hf_model(loaded.config, peer_weights(), dtype, device)
            if name == "C":
                sweeps["hf-generate"] = peers.sweep(
                    lambda b: peers.run_hf_generate(hf, requests, b, task(f"hf generate sorted, {b}")),
                    _sweep_sizes(generate_batch_sizes, requests))
                results.append(_best(sweeps["hf-generate"], "batch_size", "length-sorted batches of {}"))
                untuned = peers.run_hf_generate(hf, requests, 16, task("hf generate untuned"),
                                                order="arrival")
                results.append(_labelled(untuned, "hf-generate untuned (arrival order, batch 16)"))
                sweeps["hf-continuous-batching"] = peers.sweep(
                    lambda b: peers.run_hf_continuous_batching(
                        hf, requests, task(f"hf continuous b., max {b}"), max_requests_per_batch=b,
                        timeout_s=900),
                    _sweep_sizes(cb_max_batches, requests))
                results.append(_best(sweeps["hf-continuous-batching"], "max_requests_per_batch",
                                     "at most {} requests per forward"))
            else:
                results.append(peers.run_hf_continuous_batching(hf, requests, task("hf continuous batching"),
                                                                timeout_s=300))
    _print_results(console, f"llmos bench engine: workload {name}{' (quick)' if quick else ''}",
                   results, ours, len(requests))
    for peer, rows in sweeps.items():
        _print_sweep(console, peer, rows, ours)
    budget_tokens = ours.extra["kv_blocks_total"] * ours.extra["block_size"]
    kv = kv_comparison(requests, ours.extra["kv_utilization"], ours.extra["block_size"], budget_tokens)
    console.print(
        f"KV token-state utilisation: llmos {kv['paged_utilization']:.1%} (waste "
        f"{ours.extra['kv_waste']:.1%}) vs static reservation {kv['static_utilization']:.1%}; "
        f"in this budget of {budget_tokens} tokens: {kv['paged_concurrency']} concurrent requests "
        f"paged vs {kv['static_concurrency']} static. Peak running {ours.extra['peak_running']}, "
        f"{ours.extra['preemptions']} preemptions.")
    side_by_side = _llamacpp_rows(console, model, loaded, requests, quick, **engine_kwargs) \
        if name == "C" and peers_too else {}
    report = {
        "bench": "engine",
        "workload": name,
        "quick": quick,
        "workload_info": info,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": [_row(r, ours) for r in results],
        "best_peer": best_peer.name if (best_peer := peers.fastest(results[1:])) else None,
        "llmos_vs_best_peer": ours.throughput / best_peer.throughput if best_peer else None,
        "sweeps": {peer: [_row(r, ours) for r in rows] for peer, rows in sweeps.items()},
        "kv": kv,
        **side_by_side,
        **quality,
    }
    write_report(report, json_path, f"bench-results/engine-{name}{'-quick' if quick else ''}.json", console)
    return report


def _best(rows: list[PeerResult | PeerSkipped], setting: str, label: str) -> PeerResult | PeerSkipped:
    """A sweep's fastest run, named as the peer with its setting (`label` with {} for the value) and the
    settings tried; the last skip when none ran."""
    best = peers.fastest(rows)
    if best is None:
        return rows[-1]
    tried = ", ".join(str(r.extra[setting]) for r in rows if r)
    return _labelled(best, f"{best.name} ({label.format(best.extra[setting])}; best of {tried})")


def _labelled(result: PeerResult, name: str) -> PeerResult:
    return PeerResult(name, result.requested_output_tokens, result.wall_s, result.throughput,
                      result.extra, result.outputs)


def _same(r: PeerResult, ours: PeerResult) -> int | None:
    """Requests whose greedy tokens equal llmos' (None for llmos itself or a peer without outputs)."""
    if r is ours or r.outputs is None or ours.outputs is None:
        return None
    return sum(a == b for a, b in zip(r.outputs, ours.outputs, strict=True))


def _row(r: PeerResult | PeerSkipped, ours: PeerResult) -> dict[str, Any]:
    if not r:
        return asdict(r)
    return {**{k: v for k, v in asdict(r).items() if k != "outputs"}, "same_tokens_as_llmos": _same(r, ours),
            "llmos_vs_this": ours.throughput / r.throughput}


def _print_results(console: Console, title: str, results: list[PeerResult | PeerSkipped], ours: PeerResult,
                   n: int) -> None:
    table = Table(title=title)
    for col in ("system", "requested tok/s", "wall s", "llmos vs this", "same tokens as llmos"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for r in results:
        if not r:
            table.add_row(r.name, "-", "-", "-", f"skipped: {r.reason}"[:60])
            continue
        same = _same(r, ours)
        table.add_row(r.name, f"{r.throughput:.1f}", f"{r.wall_s:.1f}",
                      f"{ours.throughput / r.throughput:.2f}x", "-" if same is None else f"{same}/{n}")
    console.print(table)
    best = peers.fastest(results[1:])
    if best is not None:
        console.print(f"llmos vs the best peer ({best.name}): {ours.throughput / best.throughput:.2f}x "
                      "requested output tokens per second")


def _print_sweep(console: Console, peer: str, rows: list[PeerResult | PeerSkipped], ours: PeerResult) -> None:
    """One peer's sweep: every setting tried, in order (it stops after the first slower one)."""
    generate = peer == "hf-generate"
    setting = "batch_size" if generate else "max_requests_per_batch"
    what = "length-sorted batches, batch size" if generate else "max requests per forward"
    table = Table(title=f"{peer} sweep ({what})")
    for col in ("setting", "requested tok/s", "wall s", "prompt padding", "unrequested output",
                "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        if not r:
            table.add_row("-", "-", "-", "-", "-", f"skipped: {r.reason}"[:60])
            continue
        same = _same(r, ours)
        table.add_row(str(r.extra[setting]), f"{r.throughput:.1f}", f"{r.wall_s:.1f}",
                      f"{r.extra['prompt_pad_ratio']:.0%}" if generate else "-",
                      f"{r.extra['unrequested_output_ratio']:.0%}" if generate else "-",
                      "-" if same is None else f"{same}/{len(r.outputs or [])}")
    console.print(table)


def _llamacpp_rows(console: Console, model: str, loaded: LoadedModel, requests: list[BenchRequest],
                   quick: bool, **engine_kwargs: Any) -> dict[str, Any]:
    """One stream, then the workload through the HTTP server: llmos and llama.cpp on the same GGUF."""
    from llmos.bench import llamacpp

    return llamacpp.run_side_by_side(console, resolve_model(model), loaded.config, requests, quick,
                                     torch.get_num_threads(), **engine_kwargs)


def write_report(report: dict[str, Any], json_path: str | None, default: str, console: Console) -> None:
    """Write a bench's results as JSON (to `json_path`, else the file named like `default` in the
    llmos home's bench-results/: never the current directory unasked) and say where."""
    from llmos.home import llmos_home

    path = Path(json_path) if json_path else llmos_home() / "bench-results" / Path(default).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"[dim]results written to {path}[/]")
