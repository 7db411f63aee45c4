"""Token sampling: logit bias, penalties, grammar masks, greedy, temperature, top-k, top-p,
min-p, per-request seeds, logprobs.

Each sequence samples with its own generator, so a seeded request gives the
same tokens whatever else shares its batch. Logit bias and the presence,
frequency and repetition penalties run as batched tensor operations over
the rows that ask for them; a batch where no request uses them pays
nothing. A row that fails (a grammar error, an impossible distribution) is
reported in `errors` and fails only its own sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmos.engine.guided import mask_logits
from llmos.engine.sequence import Sequence


def _bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [(i, t, v) for i, s in enumerate(seqs) for t, v in s.params.logit_bias.items()]
    if rows:
        r, t, v = zip(*rows, strict=True)
        logits.index_put_((torch.tensor(r), torch.tensor(t)),
                          torch.tensor(v, dtype=logits.dtype, device=logits.device), accumulate=True)


def _penalise(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Presence, frequency and repetition penalties (vLLM's definitions) for the rows that use them."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalised]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    out_r, out_t, seen_r, seen_t = [], [], [], []
    for j, i in enumerate(rows):
        seq = seqs[i]
        out = seq.output_token_ids
        out_r += [j] * len(out)
        out_t += out
        if seq.params.repetition_penalty != 1.0:
            prompt = seq.token_ids[: seq.num_prompt_tokens]
            seen_r += [j] * len(prompt)
            seen_t += prompt
    counts = torch.zeros(len(rows), vocab, device=device)
    if out_t:
        counts.index_put_((torch.tensor(out_r, device=device), torch.tensor(out_t, device=device)),
                          torch.ones(len(out_t), device=device), accumulate=True)
    seen = counts > 0
    if seen_t:
        seen[torch.tensor(seen_r, device=device), torch.tensor(seen_t, device=device)] = True

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(seqs[i].params, name) for i in rows], device=device).unsqueeze(1)

    index = torch.tensor(rows, device=device)
    sub = logits[index]
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    logits[index] = sub


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence], forced: dict[int, int] | None = None,
           check: Callable[[int, int], int] | None = None,
           ) -> tuple[list[int], list[dict[int, float] | None], dict[int, Exception]]:
    """One next token per row of `logits` [N, V]; logprobs where asked; rows that failed, by row.

    `forced` gives rows whose token is already chosen (a grammar closing within its budget);
    `check(row, token)` may replace a chosen token (the same grammar's look-ahead)."""
    forced = forced or {}
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
    biased = any(s.params.logit_bias for s in seqs)
    if any(want_logprobs) or guided or biased or not all(s.params.greedy for s in seqs):
        logits = logits.cpu()  # per-request generators and grammar masks live on the host
    logits = logits.float()
    errors: dict[int, Exception] = {}
    if biased:
        _bias(logits, seqs)
    _penalise(logits, seqs)
    for i in guided:
        try:
            mask_logits(logits[i], seqs[i].matcher)
        except Exception as e:  # noqa: BLE001 - the grammar's failure is this row's alone
            errors[i] = e
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    tokens = [forced.get(i, t) for i, t in enumerate(tokens)]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy or i in errors or i in forced:
            continue
        try:
            tokens[i] = _sample_row(logits[i], seq)
        except Exception as e:  # noqa: BLE001 - e.g. every token masked: fails this row only
            errors[i] = e
    if check is not None:
        for i in guided:
            if i not in errors and i not in forced:
                try:
                    tokens[i] = check(i, tokens[i])
                except Exception as e:  # noqa: BLE001 - this row's grammar failed
                    errors[i] = e
    out: list[dict[int, float] | None] = []
    for i, seq in enumerate(seqs):
        if not want_logprobs[i] or i in errors:
            out.append(None)
            continue
        row = logprobs[i]
        entry = {tokens[i]: float(row[tokens[i]])}
        if seq.params.logprobs:
            top = torch.topk(row, seq.params.logprobs)
            for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                entry.setdefault(t, v)
        out.append(entry)
    return tokens, out, errors


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
