"""Lab `paging`: the three kinds of KV waste that paging removes (PagedAttention's motivating figure).

One request stream (prompt lengths drawn from a seed, output lengths from a
real greedy run of the model on the engine) is replayed on a KV pool of a
fixed size under three allocators:

- max-length reservation: each request reserves one contiguous region as
  long as any request may be (`max_len`), as pre-paging servers did;
- exact reservation: one contiguous region exactly as long as the request
  will end up (an oracle no real server has);
- paged: the engine's own `BlockManager`, fixed-size blocks on demand.

Each step every running request adds one token; a waiting request is
admitted first come, first served when its memory can be had (a paged
request that cannot grow preempts the newest one, which recomputes later).
Measured every step, as shares of the pool: used token slots; reservation
waste (slots reserved for tokens not generated yet); internal fragmentation
(slots reserved that no token will ever fill, or a block's unfilled tail);
external fragmentation (free slots in holes too small for the waiting
request). And how many requests run at once.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.lab._common import MODEL, engine, pyplot, save

SCHEMES = ("max-length reservation", "exact reservation", "paged")
PARTS = ("used", "reservation", "internal", "external")
# requests, prompt tokens (min, max), output tokens (min, max), pool blocks, max_len
SIZE: dict[str, dict[str, Any]] = {
    "small": {"requests": 8, "prompt": (192, 320), "output": (8, 32), "pool_blocks": 64, "max_len": 512},
    "full": {"requests": 16, "prompt": (128, 448), "output": (16, 96), "pool_blocks": 128, "max_len": 576},
}
_TEXT = ("An operating system multiplexes scarce hardware among programs that each believe they own it. "
         "Virtual memory gives every process its own address space, mapped page by page onto physical "
         "frames, so that memory is allocated on demand and never reserved in advance. ")


@dataclass
class _Request:
    prompt: int
    output: int  # tokens the model generated (measured)
    length: int = 0  # tokens with KV now
    generated: int = 0

    @property
    def final(self) -> int:
        """KV slots it holds at its last step (the last token needs none)."""
        return self.prompt + self.output - 1


def run(size: str, loaded: Any) -> dict[str, Any]:
    p = SIZE[size]
    rng = random.Random(18)
    block_size = 16
    text_ids = loaded.tokenizer.encode(_TEXT * 40)
    prompts = [text_ids[:rng.randint(*p["prompt"])] for _ in range(p["requests"])]
    budgets = [rng.randint(*p["output"]) for _ in prompts]
    outputs, measured = _generate(loaded, prompts, budgets, p["pool_blocks"])
    reqs = [(len(ids), out) for ids, out in zip(prompts, outputs, strict=True)]
    pool = p["pool_blocks"] * block_size
    schemes = {name: _replay(reqs, name, pool, block_size, p["max_len"]) for name in SCHEMES}
    return {"lab": "paging", "size": size, "model": MODEL,
            "pool_slots": pool, "block_size": block_size, "max_len": p["max_len"],
            "requests": [{"prompt_tokens": a, "output_tokens": b} for a, b in reqs],
            "schemes": schemes, "engine": measured,
            "definitions": {
                "shares": "time-averaged over steps with a request running, as fractions of the KV pool",
                "waste": "(reservation + internal + external) / (used + reservation + internal + external)",
                "external": "free slots in holes smaller than the waiting request's need, while one waits"}}


def _generate(loaded: Any, prompts: list[list[int]], budgets: list[int], pool_blocks: int):
    """Greedy generations on the real engine: their lengths, and the engine's own KV measurements."""
    from llmos.engine import SamplingParams

    e = engine(loaded, pool_blocks, enable_prefix_caching=False)
    for i, (ids, n) in enumerate(zip(prompts, budgets, strict=True)):
        e.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0), request_id=str(i))
    lengths: dict[str, int] = {}
    peak = 0
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                lengths[out.request_id] = len(out.outputs[0].token_ids)
        peak = max(peak, len(e.scheduler.running))
    s = e.stats()
    return ([lengths[str(i)] for i in range(len(prompts))],
            {"kv_waste": s["kv_waste"], "max_running": peak, "preemptions": s["preemptions"],
             "steps": s["steps"], "generation_tokens": s["generation_tokens"]})


class _Contiguous:
    """First-fit contiguous allocation over `size` slots; freed regions merge with their neighbours."""

    def __init__(self, size: int) -> None:
        self.holes: list[tuple[int, int]] = [(0, size)]  # (start, length), by start

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.holes):
            if length >= n:
                self.holes[i:i + 1] = [(start + n, length - n)] if length > n else []
                return start
        return None

    def free(self, start: int, n: int) -> None:
        self.holes.append((start, n))
        self.holes.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self.holes:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.holes = merged


def _replay(reqs: list[tuple[int, int]], scheme: str, pool: int, block_size: int,
            max_len: int) -> dict[str, Any]:
    from llmos.engine import SamplingParams
    from llmos.engine.block_manager import BlockManager
    from llmos.engine.sequence import Sequence

    waiting = deque(_Request(a, b) for a, b in reqs)
    running: list[_Request] = []
    region: dict[int, tuple[int, int]] = {}  # id(request) -> (start, reserved) for the contiguous schemes
    seqs: dict[int, Sequence] = {}
    bm = BlockManager(pool // block_size, block_size, enable_prefix_caching=False)
    space = _Contiguous(pool)
    sums = dict.fromkeys(PARTS, 0.0)
    fits: list[int] = []
    preemptions = 0

    def reserve(r: _Request) -> int:
        return max_len if scheme == "max-length reservation" else r.final

    def admit(r: _Request) -> bool:
        if scheme == "paged":
            seq = Sequence(str(id(r)), 0, [0] * r.prompt, r.prompt, SamplingParams())
            if not bm.can_allocate(seq, r.prompt):
                return False
            bm.allocate(seq, r.prompt)
            seq.num_computed_tokens = r.prompt
            seqs[id(r)] = seq
        else:
            start = space.alloc(reserve(r))
            if start is None:
                return False
            region[id(r)] = (start, reserve(r))
        r.length, r.generated = r.prompt, 1
        return True

    def release(r: _Request) -> None:
        if scheme == "paged":
            bm.free(seqs.pop(id(r)))
        else:
            space.free(*region.pop(id(r)))

    for r in waiting:
        if max(r.final, reserve(r)) > pool or r.final > max_len:
            raise ValueError(f"a request of {r.final} tokens cannot run under {scheme} on {pool} slots")
    while waiting or running:
        for r in list(running):  # every running request grows by the token it generated last step
            if r not in running:
                continue  # preempted in this loop
            if scheme == "paged":
                seq = seqs[id(r)]
                seq.token_ids.append(0)
                while not bm.can_allocate(seq, 1):
                    victim = running[-1]
                    running.remove(victim)
                    release(victim)
                    waiting.appendleft(victim)
                    preemptions += 1
                    if victim is r:
                        break
                else:
                    bm.allocate(seq, 1)
                    seq.num_computed_tokens += 1
                    r.length += 1
                    r.generated += 1
                continue
            r.length += 1
            r.generated += 1
        while waiting and admit(waiting[0]):
            running.append(waiting.popleft())
        if running:
            used = sum(r.length for r in running)
            if scheme == "paged":
                part = {"used": used, "reservation": 0, "internal": bm.num_used_blocks * block_size - used,
                        "external": 0}
            else:
                reserved = sum(region[id(r)][1] for r in running)
                future = sum(r.final - r.length for r in running)
                need = reserve(waiting[0]) if waiting else None
                part = {"used": used, "reservation": future, "internal": reserved - used - future,
                        "external": sum(n for _, n in space.holes if need is not None and n < need)}
            for k in PARTS:
                sums[k] += part[k] / pool
            fits.append(len(running))
        for r in [r for r in running if r.generated >= r.output]:
            running.remove(r)
            release(r)
    steps = len(fits)
    shares = {k: sums[k] / steps for k in PARTS}
    held = sum(shares.values())
    return {"shares": shares, "waste": (held - shares["used"]) / held if held else 0.0,
            "max_running": max(fits), "mean_running": sum(fits) / steps, "steps": steps,
            "preemptions": preemptions}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax, fit) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    colours = {"used": "#2e7d32", "reservation": "#f9a825", "internal": "#ef6c00", "external": "#c62828"}
    names = {"used": "token states (used)", "reservation": "reservation",
             "internal": "internal fragmentation", "external": "external fragmentation"}
    x = range(len(SCHEMES))
    bottom = [0.0] * len(SCHEMES)
    for part in PARTS:
        values = [100 * data["schemes"][s]["shares"][part] for s in SCHEMES]
        ax.bar(x, values, bottom=bottom, color=colours[part], label=names[part], width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, s in enumerate(SCHEMES):
        waste = 100 * data["schemes"][s]["waste"]
        ax.text(i, bottom[i] + 1.5, f"waste {waste:.1f}%", ha="center", fontsize=9)
    ax.set_xticks(list(x), [s.replace(" reservation", "\nreservation") for s in SCHEMES])
    ax.set_ylabel("share of the KV pool (time average, %)")
    ax.set_ylim(0, 130)
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    ax.set_title(f"{len(data['requests'])} requests on a {data['pool_slots']}-token KV pool "
                 f"(block {data['block_size']}, max length {data['max_len']})", fontsize=10)
    mean = [data["schemes"][s]["mean_running"] for s in SCHEMES]
    peak = [data["schemes"][s]["max_running"] for s in SCHEMES]
    fit.bar([i - 0.2 for i in x], mean, width=0.4, color="#90a4ae", label="mean")
    fit.bar([i + 0.2 for i in x], peak, width=0.4, color="#37474f", label="max")
    fit.set_xticks(list(x), ["max-length", "exact", "paged"])
    fit.set_title("requests running at once", fontsize=10)
    fit.legend(fontsize=8)
    fig.suptitle("llmos lab paging: the three kinds of KV waste that paging removes", fontsize=11)
    save(fig, path, dpi=110)


def describe(data: dict[str, Any]) -> str:
    lines = [f"{len(data['requests'])} requests replayed on a {data['pool_slots']}-token KV pool "
             f"(output lengths from a greedy run of the model):"]
    for s in SCHEMES:
        r = data["schemes"][s]
        sh = r["shares"]
        lines.append(f"  {s:<23} used {100 * sh['used']:5.1f}%  reservation {100 * sh['reservation']:5.1f}%  "
                     f"internal {100 * sh['internal']:5.1f}%  external {100 * sh['external']:5.1f}%  "
                     f"waste {100 * r['waste']:5.1f}%  at once: mean {r['mean_running']:.1f}, "
                     f"max {r['max_running']}")
    e = data["engine"]
    lines.append(f"  the engine itself, same stream: KV waste {100 * e['kv_waste']:.1f}%, up to "
                 f"{e['max_running']} requests running, {e['preemptions']} preemptions")
    return "\n".join(lines)
