"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Each sequence samples with its own generator, so a seeded request gives the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from llmos.engine.guided import mask_logits
from llmos.engine.sequence import Sequence


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """One next token per row of `logits` [N, V] (float32); plus logprobs where asked."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if any(want_logprobs) or guided or not all(s.params.greedy for s in seqs):
        logits = logits.cpu()  # per-request generators and grammar masks live on the host
    logits = logits.float()
    for i in guided:
        mask_logits(logits[i], seqs[i].matcher)
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    out: list[dict[int, float] | None] = []
    for i, seq in enumerate(seqs):
        if not want_logprobs[i]:
            out.append(None)
            continue
        row = logprobs[i]
        entry = {tokens[i]: float(row[tokens[i]])}
        if seq.params.logprobs:
            top = torch.topk(row, seq.params.logprobs)
            for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                entry.setdefault(t, v)
        out.append(entry)
    return tokens, out
