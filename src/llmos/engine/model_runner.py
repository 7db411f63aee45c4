"""Turns a scheduler decision into one forward pass over a flat token batch."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import torch

from llmos.engine.attention import AttentionMetadata, PagedAttention, PrefillChunk
from llmos.engine.kv_cache import KVCache
from llmos.engine.sequence import Sequence
from llmos.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.kv.device
        if self.device.type == "cpu":
            _return_large_buffers()

    @torch.inference_mode()
    def execute(self, scheduled: dict[Sequence, int]) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run the step; return logits of the sequences whose last token was computed."""
        bs = self.block_size
        decodes = [s for s, n in scheduled.items() if n == 1 and s.num_uncomputed == 1]
        prefills = [(s, n) for s, n in scheduled.items() if not (n == 1 and s.num_uncomputed == 1)]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq in decodes:
            pos = len(seq) - 1
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            sample_rows.append(len(ids) - 1)
            sample_seqs.append(seq)
        chunks: list[PrefillChunk] = []
        for seq, n in prefills:
            start = seq.num_computed_tokens
            table = seq.block_table
            chunks.append(PrefillChunk(len(ids), n, start, torch.tensor(
                table[: -(-(start + n) // bs)], device=self.device)))
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == len(seq):
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            num_decodes=len(decodes),
            decode_block_tables=None,
            decode_context_lens=None,
            prefills=chunks,
        )
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in decodes]
            meta.decode_block_tables = torch.tensor(tables, device=self.device)
            meta.decode_context_lens = torch.tensor([len(s) for s in decodes], device=self.device)
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            PagedAttention(self.kv_cache.kv, meta),
        )
        if not sample_rows:
            return None, []
        rows = torch.tensor(sample_rows, device=self.device)
        return self.model.compute_logits(hidden[rows]), sample_seqs


@cache
def _return_large_buffers(threshold: int = 256 * 1024) -> None:
    """Have glibc map every buffer of 256 KiB and more on its own and unmap it when freed.

    By default glibc raises that threshold to the largest buffer freed so far, so a
    step's large activations (a prefill's, tens of MB) stay in its heap afterwards and
    the process's resident memory keeps its highest step's. Small decode tensors are
    unaffected. A no-op where the C library has no mallopt.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it ends the adjustment)
    except OSError:
        pass
