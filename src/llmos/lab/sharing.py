"""Lab `sharing`: KV blocks shared between sequences, by copy-on-write and by the prefix cache.

Two workloads run on the real engine:

- n parallel samples of one prompt (`SamplingParams(n=...)`): the samples
  fork from the prompt's blocks and copy a block only when they write to it
  (copy-on-write). Without sharing each sample would hold its own copy of
  every block in its block table: the figure sets the physical blocks the
  engine used against the sum of the block tables, at the same steps.
- k requests that start with the same system prompt: run once with the
  prefix cache and once without, same greedy requests; the figure sets the
  physical blocks of the two runs side by side, with the prompt tokens each
  had to compute, and checks that both runs produced the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.lab._common import MODEL, engine, pyplot, save

# n samples, their max tokens; k requests, their max tokens; system prompt repeats; pool blocks
SIZE: dict[str, dict[str, Any]] = {
    "small": {"n": 4, "sample_tokens": 24, "k": 4, "answer_tokens": 8, "system_repeats": 3,
              "pool_blocks": 96},
    "full": {"n": 6, "sample_tokens": 48, "k": 8, "answer_tokens": 16, "system_repeats": 5,
             "pool_blocks": 192},
}
_SYSTEM = ("You are the assistant of an operating-systems course. Answer in one short sentence, "
           "precisely, with the term the lecture uses. The lecture covers processes, scheduling, "
           "virtual memory, paging, copy-on-write, file systems and protection. ")
_QUESTIONS = ["What is a page table?", "What does copy-on-write save?", "What is a context switch?",
              "Why do we need virtual memory?", "What is thrashing?", "What does a scheduler decide?",
              "What is a system call?", "What is a capability?", "What is a TLB?", "What is swapping?",
              "What is a race condition?", "What is a file descriptor?"]


def run(size: str, loaded: Any) -> dict[str, Any]:
    p = SIZE[size]
    return {"lab": "sharing", "size": size, "model": MODEL, "block_size": 16,
            "samples": _samples(loaded, p), "system_prompt": _system_prompt(loaded, p)}


def _samples(loaded: Any, p: dict[str, Any]) -> dict[str, Any]:
    from llmos.engine import SamplingParams

    e = engine(loaded, p["pool_blocks"], enable_prefix_caching=False)
    ids = loaded.tokenizer.encode_chat([{"role": "system", "content": _SYSTEM * p["system_repeats"]},
                                        {"role": "user", "content": "Write a short poem about paging."}])
    e.add_request(ids, SamplingParams(n=p["n"], temperature=0.8, seed=18, max_tokens=p["sample_tokens"]),
                  request_id="poem")
    physical, private, shared = [], [], []
    outputs = None
    while e.has_unfinished_requests():
        for out in e.step():
            outputs = out
        seqs = e.scheduler.running
        if seqs:
            physical.append(e.blocks.num_used_blocks)
            private.append(sum(len(s.block_table) for s in seqs))
            shared.append(sum(1 for r in e.blocks.ref_counts if r > 1))
    assert outputs is not None, "the engine gave no output"
    texts = [c.text for c in outputs.outputs]
    return {"n": p["n"], "prompt_tokens": len(ids), "max_tokens": p["sample_tokens"],
            "steps": len(physical), "distinct_samples": len(set(texts)),
            "peak_blocks_without_sharing": max(private), "peak_blocks_copy_on_write": max(physical),
            "mean_blocks_without_sharing": sum(private) / len(private),
            "mean_blocks_copy_on_write": sum(physical) / len(physical), "peak_shared_blocks": max(shared)}


def _system_prompt(loaded: Any, p: dict[str, Any]) -> dict[str, Any]:
    from llmos.engine import SamplingParams

    system = _SYSTEM * p["system_repeats"]
    prompts = [loaded.tokenizer.encode_chat([{"role": "system", "content": system},
                                             {"role": "user", "content": q}])
               for q in _QUESTIONS[:p["k"]]]
    runs = {}
    for cache in (False, True):
        e = engine(loaded, p["pool_blocks"], enable_prefix_caching=cache)
        for i, ids in enumerate(prompts):
            params = SamplingParams(max_tokens=p["answer_tokens"], temperature=0.0)
            e.add_request(ids, params, request_id=str(i))
        tokens: dict[str, list[int]] = {}
        peak = 0
        while e.has_unfinished_requests():
            for out in e.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
            peak = max(peak, e.blocks.num_used_blocks)
        s = e.stats()
        runs[cache] = {"peak_blocks": peak, "prompt_tokens": s["prompt_tokens"],
                       "prompt_tokens_computed": s["prompt_tokens"] - s["prefix_cache_hits"],
                       "hit_rate": s["prefix_cache_hit_rate"], "steps": s["steps"],
                       "tokens": [tokens[str(i)] for i in range(len(prompts))]}
    system_tokens = len(loaded.tokenizer.encode_chat([{"role": "system", "content": system}],
                                                     add_generation_prompt=False))
    return {"k": p["k"], "system_prompt_tokens": system_tokens, "max_tokens": p["answer_tokens"],
            "peak_blocks_no_cache": runs[False]["peak_blocks"],
            "peak_blocks_prefix_cache": runs[True]["peak_blocks"],
            "prompt_tokens": runs[False]["prompt_tokens"],
            "prompt_tokens_computed_no_cache": runs[False]["prompt_tokens_computed"],
            "prompt_tokens_computed_prefix_cache": runs[True]["prompt_tokens_computed"],
            "prefix_cache_hit_rate": runs[True]["hit_rate"],
            "outputs_identical": runs[False]["tokens"] == runs[True]["tokens"]}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    a, b = data["samples"], data["system_prompt"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(12, 4.4))
    _bars(left, ["without sharing", "copy-on-write"],
          [a["peak_blocks_without_sharing"], a["peak_blocks_copy_on_write"]],
          f"{a['n']} parallel samples of one {a['prompt_tokens']}-token prompt\npeak KV blocks")
    _bars(mid, ["no prefix cache", "prefix cache"],
          [b["peak_blocks_no_cache"], b["peak_blocks_prefix_cache"]],
          f"{b['k']} requests, one {b['system_prompt_tokens']}-token system prompt\npeak KV blocks")
    _bars(right, ["no prefix cache", "prefix cache"],
          [b["prompt_tokens_computed_no_cache"], b["prompt_tokens_computed_prefix_cache"]],
          f"prompt tokens computed (of {b['prompt_tokens']})\n"
          f"same output tokens: {'yes' if b['outputs_identical'] else 'NO'}")
    fig.suptitle("llmos lab sharing: KV blocks shared by copy-on-write and the prefix cache", fontsize=11)
    save(fig, path, dpi=110)


def _bars(ax: Any, labels: list[str], values: list[int], title: str) -> None:
    ax.bar(labels, values, color=["#90a4ae", "#1976d2"], width=0.6)
    for i, v in enumerate(values):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=10)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(values) * 1.18)


def describe(data: dict[str, Any]) -> str:
    a, b = data["samples"], data["system_prompt"]
    return "\n".join([
        f"{a['n']} parallel samples of a {a['prompt_tokens']}-token prompt: peak "
        f"{a['peak_blocks_copy_on_write']} KV blocks with copy-on-write, "
        f"{a['peak_blocks_without_sharing']} without sharing "
        f"({a['peak_shared_blocks']} blocks shared at most; {a['distinct_samples']} distinct samples)",
        f"{b['k']} requests sharing a {b['system_prompt_tokens']}-token system prompt: peak "
        f"{b['peak_blocks_prefix_cache']} KV blocks with the prefix cache, {b['peak_blocks_no_cache']} "
        f"without; "
        f"prompt tokens computed {b['prompt_tokens_computed_prefix_cache']} vs "
        f"{b['prompt_tokens_computed_no_cache']} (hit rate {100 * b['prefix_cache_hit_rate']:.0f}%); "
        f"identical output tokens: {b['outputs_identical']}"])
