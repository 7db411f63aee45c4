"""Peer systems for `llmos bench engine`: Hugging Face transformers on the same model and work.

A peer runs a workload (a list of `BenchRequest`s) on a transformers model that holds
exactly llmos' weights, and reports a `PeerResult`. Every peer counts the same
numerator: the output tokens the workload *requested* (the sum of max_tokens), never
padding or tokens generated past a request's max_tokens, so ratios against llmos are
fair. End-of-sequence is ignored: every request runs to its max_tokens, greedily.

Peers run one after another in the caller's process, never concurrently. A peer that
cannot run here (an old transformers, an unsupported device) is reported as a
`PeerSkipped` with a reason instead of an exception, so the bench goes on.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.bench.workloads import BenchRequest, requested_output_tokens
from llmos.models.config import ModelConfig

Progress = Callable[[int], None]


@dataclass
class PeerResult:
    """What one system did with one workload; throughput is requested output tokens per second."""

    name: str
    requested_output_tokens: int
    wall_s: float
    throughput: float
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: list[list[int]] | None = None  # each request's first max_tokens tokens, in request order


@dataclass
class PeerSkipped:
    """A peer that could not run here; falsy, so `if not result:` reads like a missing result."""

    name: str
    reason: str

    def __bool__(self) -> bool:
        return False


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (None: leave torch's setting), restoring the old value after."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------- weights


def random_state_dict(
    config: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights of a plausible scale in Hugging Face names (without the "model." prefix).

    Matrices and embeddings are normal with std 0.02, biases zero, norms one, as a freshly
    initialised checkpoint. Both llmos (`LlamaForCausalLM.load_hf_state_dict`) and
    `build_hf_model` take this dict, so the two systems hold identical weights. The numbers
    are drawn on `device` (fast on a GPU), so a seed gives the same weights on the same
    kind of device. lm_head is left out when embeddings are tied.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    h, hd = config.hidden_size, config.head_dim

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
        return t.to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=device)

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": normal(config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for name, rows in (("q", config.num_heads * hd), ("k", config.num_kv_heads * hd),
                           ("v", config.num_kv_heads * hd)):
            sd[f"{p}self_attn.{name}_proj.weight"] = normal(rows, h)
            if config.attention_bias:
                sd[f"{p}self_attn.{name}_proj.bias"] = zeros(rows)
        sd[f"{p}self_attn.o_proj.weight"] = normal(h, config.num_heads * hd)
        if config.qk_norm:
            sd[f"{p}self_attn.q_norm.weight"] = ones(hd)
            sd[f"{p}self_attn.k_norm.weight"] = ones(hd)
        sd[f"{p}mlp.gate_proj.weight"] = normal(config.intermediate_size, h)
        sd[f"{p}mlp.up_proj.weight"] = normal(config.intermediate_size, h)
        sd[f"{p}mlp.down_proj.weight"] = normal(h, config.intermediate_size)
        sd[f"{p}input_layernorm.weight"] = ones(h)
        sd[f"{p}post_attention_layernorm.weight"] = ones(h)
    sd["norm.weight"] = ones(h)
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = normal(config.vocab_size, h)
    return sd


def hf_config(config: ModelConfig):
    """The transformers config object (LlamaConfig, Qwen3Config, ...) of an llmos ModelConfig."""
    from transformers import AutoConfig

    fields = config.to_hf()
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@torch.no_grad()
def build_hf_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A transformers causal LM (LlamaForCausalLM, Qwen3ForCausalLM, ...) holding these weights.

    `state_dict` uses Hugging Face names with or without the "model." prefix (as read_gguf
    and random_state_dict return them). The model is built on the meta device and the
    weights are assigned, not copied into a random init, so this takes about as long as
    a dtype conversion. Attention is "sdpa"; the model is in eval mode without gradients.
    """
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    weights = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("model.")
        key = name if name == "lm_head.weight" else f"model.{name}"
        weights[key] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    result = model.load_state_dict(weights, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (RoPE inverse frequencies) are still on meta: rebuild those modules.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(config=cfg))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{type(model).__name__}: tensors left uninitialised: {leftover[:5]}")
    model.generation_config.eos_token_id = None  # peers run every request to its max_tokens
    return model.eval().requires_grad_(False)


def _pad_token_id(model) -> int:
    eos = model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return 0 if eos is None else int(eos)


# -------------------------------------------------------------------------------- static batching


class _StepClock:
    """A stopping criterion that never stops: it timestamps each generation step and reports progress."""

    def __init__(self, max_tokens: list[int], progress: Progress | None) -> None:
        self.max_tokens, self.progress = max_tokens, progress
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        if self.progress is not None:
            step = len(self.times)
            self.progress(sum(1 for m in self.max_tokens if m >= step))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _left_padded(
    batch: list[BenchRequest], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[row, width - n:] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def _generate(model, batch: list[BenchRequest], new_tokens: int, clock: _StepClock | None) -> torch.Tensor:
    from transformers import GenerationConfig, StoppingCriteriaList

    pad = _pad_token_id(model)
    ids, mask = _left_padded(batch, pad, model.device)
    gen_config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad, use_cache=True
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=gen_config,
        stopping_criteria=StoppingCriteriaList([clock] if clock else []),
    )
    generated = out[:, ids.shape[1]:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate stopped after {generated.shape[1]} of {new_tokens} tokens")
    return generated


BATCH_ORDERS = ("sorted", "arrival")


def plan_batches(requests: list[BenchRequest], batch_size: int, order: str = "sorted") -> list[list[int]]:
    """The static batches of a workload, as request indices, `batch_size` to a batch.

    "arrival": request order, as a loop over the requests would batch them.
    "sorted": requests ordered by max_tokens, then prompt length, then index (all
    ascending) and cut into batches, so a batch's requests ask for about as many tokens as
    its longest (a batch decodes until its largest max_tokens; on workload C a decode
    token costs several times a prompt token) and, among those, prompts of close
    length share a batch (less left padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if order not in BATCH_ORDERS:
        raise ValueError(f"unknown batch order {order!r}; choose from {', '.join(BATCH_ORDERS)}")
    indices = list(range(len(requests)))
    if order == "sorted":
        indices.sort(key=lambda i: (requests[i].max_tokens, len(requests[i].prompt_token_ids), i))
    return [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]


def run_hf_generate(
    model,
    requests: list[BenchRequest],
    batch_size: int = 16,
    progress: Progress | None = None,
    warmup: bool = True,
    threads: int | None = None,
    order: str = "sorted",
) -> PeerResult:
    """transformers `generate` on static batches (see `plan_batches` for `order`).

    Each batch is left-padded with an attention mask and generates greedily, ignoring
    EOS, as many tokens as its largest max_tokens, so shorter requests wait for the
    longest; each request's output is cut at its own max_tokens and only those tokens
    count. Outputs come back in request order whatever the batch order. Throughput =
    requested output tokens / wall seconds. `extra` holds the prefill and decode time
    (from per-step timestamps), the mean decode step, and how much of the computed
    tokens were padding or unrequested output.

    `threads` defaults to torch's setting on CPU and to 1 on a GPU, where generate's
    host-side work is launch-bound and more intra-op threads make each step slower
    (85 ms against 38 ms per step for Qwen3-0.6B on an H100 host with 16 cores).
    """
    name = "hf-generate"
    if threads is None and model.device.type != "cpu":
        threads = 1
    batches = plan_batches(requests, batch_size, order)
    with torch_threads(threads), torch.inference_mode():
        if warmup:
            first = requests[0]
            _generate(model, [BenchRequest(first.prompt_token_ids[:8], 2)], 2, None)
        outputs: list[list[int]] = [[] for _ in requests]
        prefill_s = decode_s = 0.0
        decode_steps = 0
        prompt_pad = prompt_total = output_total = 0
        t0 = time.perf_counter()
        for indices in batches:
            batch = [requests[i] for i in indices]
            new_tokens = max(r.max_tokens for r in batch)
            clock = _StepClock([r.max_tokens for r in batch], progress)
            b0 = time.perf_counter()
            generated = _generate(model, batch, new_tokens, clock).tolist()
            for i, row, r in zip(indices, generated, batch, strict=True):
                outputs[i] = row[:r.max_tokens]
            prefill_s += clock.times[0] - b0
            decode_s += clock.times[-1] - clock.times[0]
            decode_steps += len(clock.times) - 1
            width = max(len(r.prompt_token_ids) for r in batch)
            prompt_total += width * len(batch)
            prompt_pad += sum(width - len(r.prompt_token_ids) for r in batch)
            output_total += new_tokens * len(batch)
        wall = time.perf_counter() - t0
    requested = requested_output_tokens(requests)
    extra = {
        "order": order,
        "batch_size": batch_size,
        "batches": len(batches),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": decode_steps,
        "decode_step_ms": 1000 * decode_s / decode_steps if decode_steps else None,
        "generated_tokens": output_total,
        "prompt_pad_ratio": prompt_pad / prompt_total,
        "unrequested_output_ratio": (output_total - requested) / output_total,
        "padded_token_ratio": (prompt_pad + output_total - requested) / (prompt_total + output_total),
        "threads": torch.get_num_threads() if threads is None else threads,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return PeerResult(name, requested, wall, requested / wall, extra, outputs)


def sweep(
    run: Callable[[int], PeerResult | PeerSkipped], settings: list[int]
) -> list[PeerResult | PeerSkipped]:
    """`run(setting)` for each setting in the given order, stopping after the first run slower than
    the best so far (throughput taken as unimodal along the settings, so the settings past a peak
    are not run) or after the first that is skipped. `fastest` picks the best."""
    results: list[PeerResult | PeerSkipped] = []
    for setting in settings:
        result = run(setting)
        best = fastest(results)
        results.append(result)
        if not result or (best is not None and result.throughput < best.throughput):
            break
    return results


def fastest(results: list[PeerResult | PeerSkipped]) -> PeerResult | None:
    """The run with the highest throughput (the first of equals); None when none ran."""
    ran = [r for r in results if r]
    return max(ran, key=lambda r: r.throughput) if ran else None


# ---------------------------------------------------------------------------- continuous batching


def run_hf_continuous_batching(
    model,
    requests: list[BenchRequest],
    progress: Progress | None = None,
    threads: int | None = None,
    page_size: int = 256,
    max_batch_tokens: int | None = None,
    max_requests_per_batch: int | None = None,
    timeout_s: float | None = None,
) -> PeerResult | PeerSkipped:
    """transformers' own continuous batching (paged KV cache, the engine behind `generate_batch`).

    `generate_batch` takes one max_new_tokens for all requests, so this drives the same
    manager directly: each request is added with its own max_new_tokens and EOS disabled
    (-1), and results are collected as they finish (progress advances by a request's
    max_tokens when it finishes). The KV cache is sized to the workload (prompt +
    max_tokens of every request, in pages of `page_size`) instead of 60% of RAM. wall_s
    counts from the first request added to the last finished; the manager's setup
    (cache allocation, warmup) is `extra["setup_s"]`. `max_requests_per_batch` caps the
    requests in one forward (None: transformers' default, every request of the workload);
    on the CPU a forward attends over the batch's whole paged cache under a dense mask, so
    a smaller batch can be faster. Returns PeerSkipped with the reason if this transformers
    has no continuous batching or it fails here.
    """
    name = "hf-continuous-batching"
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig
    except ImportError as e:
        return PeerSkipped(name, f"this transformers has no continuous batching ({e})")
    if not hasattr(model, "continuous_batching_context_manager"):
        return PeerSkipped(name, f"{type(model).__name__} has no continuous batching API")

    ids = [f"req_{i}" for i in range(len(requests))]
    results: dict[str, Any] = {}
    try:
        # The config's names moved between transformers releases (block_size became page_size).
        fields = inspect.signature(ContinuousBatchingConfig).parameters
        pages = sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // page_size) for r in requests)
        cb_config = ContinuousBatchingConfig(
            **{"page_size" if "page_size" in fields else "block_size": page_size},
            num_blocks=pages + 1,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests_per_batch,
        )
        max_new = max(r.max_tokens for r in requests)
        gen_config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=_pad_token_id(model)
        )
        cm_kwargs: dict[str, Any] = {
            "generation_config": gen_config, "continuous_batching_config": cb_config,
            "block": True, "timeout": 5,
        }
        if "workload_hints" in inspect.signature(model.continuous_batching_context_manager).parameters:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            cm_kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                max_generated_length=max_new,
                num_requests=len(requests),
            )
        # No inference_mode here: the manager builds tensors in this thread and updates them
        # in place from its generation thread, which inference tensors forbid.
        with torch_threads(threads), torch.no_grad():
            s0 = time.perf_counter()
            cm = model.continuous_batching_context_manager(**cm_kwargs)
            with cm as manager:
                t0 = time.perf_counter()
                for rid, r in zip(ids, requests, strict=True):
                    manager.add_request(
                        input_ids=r.prompt_token_ids, request_id=rid, max_new_tokens=r.max_tokens,
                        eos_token_id=-1,
                    )
                want = {rid: r.max_tokens for rid, r in zip(ids, requests, strict=True)}
                while len(results) < len(requests):
                    out = manager.get_result(timeout=1)
                    if out is None:
                        if not manager.is_running():
                            raise RuntimeError("the generation thread stopped before all requests finished")
                        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                            raise TimeoutError(f"not done after {timeout_s:.0f} s")
                        continue
                    if not out.is_finished():
                        continue
                    if out.error is not None:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    results[out.request_id] = out
                    if progress is not None:
                        progress(want.get(out.request_id, 0))
                wall = time.perf_counter() - t0
                resolved = getattr(manager, "continuous_batching_config", cb_config)
                attn = getattr(model.config, "_attn_implementation", None)
    except Exception as e:  # a peer failing must not stop the bench
        return PeerSkipped(name, f"{type(e).__name__}: {e}")

    outputs = [
        list(results[rid].generated_tokens)[: r.max_tokens] for rid, r in zip(ids, requests, strict=True)
    ]
    short = sum(1 for o, r in zip(outputs, requests, strict=True) if len(o) < r.max_tokens)
    requested = requested_output_tokens(requests)
    delivered = sum(len(o) for o in outputs)  # equals requested unless a request stopped early
    extra = {
        "setup_s": t0 - s0,
        "page_size": page_size,
        "num_blocks": getattr(resolved, "num_blocks", None),
        "max_batch_tokens": getattr(resolved, "max_batch_tokens", None),
        "max_requests_per_batch": getattr(resolved, "max_requests_per_batch", max_requests_per_batch),
        "attn_implementation": attn,
        "short_outputs": short,  # requests that got fewer than max_tokens (should be 0)
        "delivered_output_tokens": delivered,
        "threads": torch.get_num_threads() if threads is None else threads,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return PeerResult(name, requested, wall, delivered / wall, extra, outputs)
