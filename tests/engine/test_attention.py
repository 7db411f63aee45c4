"""Paged attention equals dense causal attention, for decodes and chunked prefills."""

import pytest
import torch
import torch.nn.functional as F

from llmos.engine.attention import AttentionMetadata, PagedAttention, PrefillChunk


def dense(q, k, v):
    """Reference: causal attention of one whole sequence, q [T, Hq, D], k/v [T, Hkv, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True)
    return out.transpose(0, 1)


def test_paged_matches_dense_for_mixed_decode_and_prefill_steps():
    torch.manual_seed(0)
    hq, hkv, d, bs, nblocks = 6, 2, 16, 4, 64
    kv = torch.zeros(1, 2, nblocks, bs, hkv, d, dtype=torch.float64)
    lengths = [1, 7, 13, 22]  # tokens per sequence
    q_all = [torch.randn(n, hq, d, dtype=torch.float64) for n in lengths]
    k_all = [torch.randn(n, hkv, d, dtype=torch.float64) for n in lengths]
    v_all = [torch.randn(n, hkv, d, dtype=torch.float64) for n in lengths]
    perm = torch.randperm(nblocks).tolist()  # scattered physical blocks
    tables = []
    for n in lengths:
        tables.append([perm.pop() for _ in range(-(-n // bs))])
    # Step 1 caches all but the last 1 / 3 / 5 / 9 tokens; step 2 runs the rest together:
    # two decodes (sequences 0 handled as a fresh 1-token prefill) and chunked prefills.
    split = [0, 6, 10, 13]

    def run(rows):  # rows: (seq, start, end) in flat order, decodes first
        q = torch.cat([q_all[s][a:b] for s, a, b in rows])
        k = torch.cat([k_all[s][a:b] for s, a, b in rows])
        v = torch.cat([v_all[s][a:b] for s, a, b in rows])
        slots, prefills, decodes, offset = [], [], [], 0
        for s, a, b in rows:
            slots += [tables[s][p // bs] * bs + p % bs for p in range(a, b)]
            if b - a == 1 and a > 0:
                decodes.append(s)
            else:
                prefills.append(PrefillChunk(offset, b - a, a, torch.tensor(tables[s])))
            offset += b - a
        width = max((len(tables[s]) for s in decodes), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            num_decodes=len(decodes),
            decode_block_tables=torch.tensor([tables[s] + [0] * (width - len(tables[s]))
                                              for s in decodes]) if decodes else None,
            decode_context_lens=torch.tensor([lengths[s] for s in decodes]) if decodes else None,
            prefills=prefills,
        )
        return PagedAttention(kv, meta)(0, q, k, v)

    run([(s, 0, split[s]) for s in range(4) if split[s]])
    out = run([(1, 6, 7)] + [(s, split[s], lengths[s]) for s in (0, 2, 3)])
    expected = torch.cat([dense(q_all[s], k_all[s], v_all[s])[a:] for s, a in
                          [(1, 6), (0, 0), (2, 10), (3, 13)]])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_native_decode_kernel_matches_torch_path():
    from llmos.engine import native
    from llmos.engine.attention import _decode

    assert native.available(), "the C kernel must build here (cc is part of the set-up)"
    torch.manual_seed(1)
    # Contexts of one piece and of several (256 tokens a piece, merged by their softmax sums),
    # a block size that puts piece boundaries inside blocks.
    b, hq, hkv, d, bs, nblocks = 8, 9, 3, 64, 24, 80
    k = torch.randn(nblocks, bs, hkv, d)
    v = torch.randn(nblocks, bs, hkv, d) * 3
    lens = torch.tensor([1, 16, 17, 40, 256, 257, 700, 1100])
    tables = torch.stack([torch.randperm(nblocks)[:47] for _ in range(b)])
    q = torch.randn(b, hq, d) * 2
    mask = (torch.arange(47 * bs)[None] < lens[:, None])[:, None, None, :]
    expected = _decode(q, k, v, tables, mask)
    torch.testing.assert_close(native.paged_decode(q, k, v, tables, lens), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA device")
def test_triton_decode_kernel_matches_torch_path():
    from llmos.engine import triton_attention
    from llmos.engine.attention import _decode

    torch.manual_seed(2)
    b, hq, hkv, d, bs, nblocks = 7, 16, 8, 128, 16, 300
    k = torch.randn(nblocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(nblocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1, 15, 16, 17, 300, 511, 700], device="cuda")
    tables = torch.stack([torch.randperm(nblocks, device="cuda")[:44] for _ in range(b)])
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    mask = (torch.arange(44 * bs, device="cuda")[None] < lens[:, None])[:, None, None, :]
    expected = _decode(q.float(), k.float(), v.float(), tables, mask)
    out = triton_attention.paged_decode(q, k, v, tables, lens).float()
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2
