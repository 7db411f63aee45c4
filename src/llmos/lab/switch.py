"""Lab `switch`: a generation suspended and resumed (a context switch of an LLM call).

One greedy generation runs on the real engine four times: straight through,
and suspended after `k` tokens (`pause_request`) while another request runs,
then resumed (`resume_request`). While it is suspended its KV is

- kept: the other request is small, the blocks stay on the device;
- swapped: the other request needs the memory and the engine swaps the
  suspended KV out to host memory, then back in on resume;
- recomputed: same pressure, and the engine drops the KV and recomputes it
  from the tokens on resume.

Measured: the output tokens (identical to the uninterrupted run in every
case), the device blocks the suspended call holds, the bytes moved, the
tokens recomputed and the time from resume to its next token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmos.lab._common import MODEL, block_bytes, engine, pyplot, save

MODES = ("kept", "swapped", "recomputed")
SIZE: dict[str, dict[str, Any]] = {  # prompt repeats, tokens generated, suspended after, pool blocks
    "small": {"repeats": 4, "max_tokens": 24, "suspend_after": 8, "pool_blocks": 40},
    "full": {"repeats": 8, "max_tokens": 48, "suspend_after": 24, "pool_blocks": 64},
}
_PROMPT = ("Explain, step by step, how an operating system switches from one process to another: "
           "what it saves, where it keeps it, and what it restores. ")


def run(size: str, loaded: Any) -> dict[str, Any]:
    p = SIZE[size]
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": _PROMPT * p["repeats"]}])
    base = _run(loaded, p, ids, None)
    modes = {m: _run(loaded, p, ids, m) for m in MODES}
    for r in modes.values():
        r["tokens_identical"] = r.pop("tokens") == base["tokens"]
    return {"lab": "switch", "size": size, "model": MODEL, "prompt_tokens": len(ids),
            "generated_tokens": len(base["tokens"]), "suspended_after": p["suspend_after"],
            "pool_blocks": p["pool_blocks"], "uninterrupted_s": base["wall_s"], "modes": modes}


def _run(loaded: Any, p: dict[str, Any], ids: list[int], mode: str | None) -> dict[str, Any]:
    from llmos.engine import SamplingParams

    preemption = {"swapped": "swap", "recomputed": "recompute"}.get(mode or "", "auto")
    e = engine(loaded, p["pool_blocks"], enable_prefix_caching=False, preemption_mode=preemption)
    e.add_request(ids, SamplingParams(max_tokens=p["max_tokens"], temperature=0.0), request_id="gen")
    seq = e.requests["gen"].seqs[0]
    started = time.perf_counter()
    tokens: list[int] = []
    state: dict[str, Any] = {}

    def step() -> None:
        nonlocal tokens
        for out in e.step():
            if out.request_id == "gen":
                tokens = list(out.outputs[0].token_ids)

    while e.has_unfinished_requests():
        if mode is not None and not state and len(tokens) >= p["suspend_after"]:
            state = _suspend(e, seq, mode, p["pool_blocks"])
            resumed = time.perf_counter()
            before = len(tokens)
            e.resume_request("gen")
            while len(tokens) == before:
                step()
            state["resume_to_next_token_s"] = time.perf_counter() - resumed
            continue
        step()
    out = {"tokens": tokens, "wall_s": time.perf_counter() - started}
    if mode is not None:
        held_blocks = state["blocks_held"]
        moved = 2 * held_blocks * block_bytes(e) if state["status"] == "swapped" else 0  # out and in
        out |= {"status_while_suspended": state["status"], "device_blocks_held": state["device_blocks"],
                "host_blocks_held": state["host_blocks"], "bytes_moved": moved,
                "tokens_recomputed": state["recompute"], "resume_to_next_token_s":
                state["resume_to_next_token_s"], "preemptions": e.scheduler.stats.preemptions}
    return out


def _suspend(e: Any, seq: Any, mode: str, pool_blocks: int) -> dict[str, Any]:
    """Pause the generation and run another request to its end; say where the generation's KV is."""
    from llmos.engine import SamplingParams

    e.pause_request("gen")
    held = len(seq.block_table)
    # the other request: one block (kept), or all the blocks but one, so the suspended KV must go
    size = 16 if mode == "kept" else (pool_blocks - 1) * 16 - 1
    e.add_request([int(t) for t in (seq.token_ids * (size // len(seq.token_ids) + 1))[:size]],
                  SamplingParams(max_tokens=1, temperature=0.0), request_id="other")
    while "other" in e.requests:
        e.step()
    status = seq.status.value
    return {"status": {"running": "kept", "swapped": "swapped", "waiting": "dropped"}[status],
            "blocks_held": held, "device_blocks": len(seq.block_table) if status == "running" else 0,
            "host_blocks": len(seq.block_table) if status == "swapped" else 0,
            "recompute": seq.num_uncomputed if status == "waiting" else 0}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    m = data["modes"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2))
    colours = ["#2e7d32", "#ef6c00", "#c62828"]
    panels = [("device KV blocks held while suspended", [m[k]["device_blocks_held"] for k in MODES],
               "{:.0f}"),
              ("KV copied to host and back (MiB)", [m[k]["bytes_moved"] / 2**20 for k in MODES], "{:.1f}"),
              ("tokens recomputed on resume", [m[k]["tokens_recomputed"] for k in MODES], "{:.0f}"),
              ("resume to next token (ms)", [1000 * m[k]["resume_to_next_token_s"] for k in MODES], "{:.0f}")]
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        ax.bar(MODES, values, color=colours, width=0.6)
        for i, v in enumerate(values):
            ax.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values + [1]) * 1.2)
    same = all(m[k]["tokens_identical"] for k in MODES)
    fig.suptitle(f"llmos lab switch: a {data['prompt_tokens']}-token prompt's generation suspended after "
                 f"{data['suspended_after']} of {data['generated_tokens']} tokens and resumed; "
                 f"tokens identical to the uninterrupted run: {'yes' if same else 'NO'}", fontsize=10)
    save(fig, path, dpi=110)


def describe(data: dict[str, Any]) -> str:
    lines = [f"a generation of {data['generated_tokens']} tokens ({data['prompt_tokens']}-token prompt) "
             f"suspended after {data['suspended_after']} tokens while another request ran, then resumed:"]
    for k in MODES:
        r = data["modes"][k]
        lines.append(f"  {k:<10} KV {r['status_while_suspended']:<13} device blocks held "
                     f"{r['device_blocks_held']:>3}  bytes moved {r['bytes_moved']:>9}  tokens recomputed "
                     f"{r['tokens_recomputed']:>4}  resume→next token "
                     f"{1000 * r['resume_to_next_token_s']:7.1f} ms  "
                     f"tokens identical: {r['tokens_identical']}")
    return "\n".join(lines)
