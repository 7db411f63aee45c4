"""The CPU decode-attention kernels (engine/native.py) on the quantized kernels' thread pool:
the same bits for any thread count, and the one-call KV write's guarantees."""

from __future__ import annotations

import pytest
import torch

from llmos.engine import native
from llmos.models import quant

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels need a compiler")


@pytest.fixture
def restore_threads():
    yield
    quant.set_num_threads(quant.num_threads())


def _cache(blocks: int = 50, bs: int = 16, hkv: int = 3, d: int = 64):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(blocks, bs, hkv, d, generator=gen), torch.randn(blocks, bs, hkv, d, generator=gen)


@pytest.mark.parametrize(("hq", "d"), [(9, 64), (6, 32)])  # a specialised and the generic shape
def test_decode_attention_is_the_same_for_any_thread_count(hq, d, restore_threads):
    k, v = _cache(d=d)
    lens = torch.tensor([700, 1, 333])
    tables = torch.stack([torch.randperm(50)[:44] for _ in range(3)])
    q = torch.randn(3, hq, d)
    quant.set_num_threads(1)
    alone = native.paged_decode(q, k, v, tables, lens)
    for threads in (2, 5):
        quant.set_num_threads(threads)
        for _ in range(10):
            assert torch.equal(native.paged_decode(q, k, v, tables, lens), alone)
    # Each sequence alone computes exactly what it did beside the others.
    assert torch.equal(native.paged_decode(q[1:2], k, v, tables[1:2], lens[1:2])[0], alone[1])


def test_cache_write_copies_strided_rows_into_their_slots():
    k_cache, v_cache = torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8)
    qkv = torch.randn(3, 9 + 6, 8)  # a fused projection: q heads, then k, then v
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.tensor([5, 0, 7])
    assert native.write_cache(k, v, slots, k_cache, v_cache)
    flat_k, flat_v = k_cache.view(-1, 3, 8), v_cache.view(-1, 3, 8)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    assert flat_k[[1, 2, 3, 4, 6]].abs().sum() == 0  # no other slot touched


def test_cache_write_refuses_a_slot_outside_the_cache_and_writes_nothing():
    k_cache, v_cache = torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8)
    k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    for bad in (8, -1, 2**40):
        with pytest.raises(IndexError, match="outside the cache's 8 slots"):
            native.write_cache(k, v, torch.tensor([1, bad]), k_cache, v_cache)
        assert k_cache.abs().sum() == 0 and v_cache.abs().sum() == 0  # not even the valid slot 1


def test_cache_write_declines_a_layout_it_cannot_copy_by_rows():
    k_cache, v_cache = torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8)
    k = torch.randn(2, 8, 3).transpose(1, 2)  # rows not contiguous
    assert not native.write_cache(k, k, torch.tensor([0, 1]), k_cache, v_cache)
    assert k_cache.abs().sum() == 0


def test_a_float16_cache_is_read_as_its_float32_values():
    # The kernel converts each cached half on load: the same result as the float32 cache of the
    # same (rounded) values, for contexts of one piece and of several.
    k, v = _cache(blocks=60)
    k16, v16 = k.half(), v.half()
    lens = torch.tensor([5, 300, 900])
    tables = torch.stack([torch.randperm(60)[:57] for _ in range(3)])
    q = torch.randn(3, 9, 64)
    torch.testing.assert_close(native.paged_decode(q, k16, v16, tables, lens),
                               native.paged_decode(q, k16.float(), v16.float(), tables, lens),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="float32 or float16"):
        native.paged_decode(q, k.bfloat16(), v.bfloat16(), tables, lens)


def test_cache_write_rounds_into_a_float16_cache():
    k_cache = torch.zeros(4, 16, 3, 64, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(2, 15, 64) * 100  # k at heads 9..11, v at 12..14 of a fused projection
    slots = torch.tensor([5, 40])
    assert native.write_cache(qkv[:, 9:12], qkv[:, 12:15], slots, k_cache, v_cache)
    flat_k, flat_v = k_cache.view(-1, 3, 64), v_cache.view(-1, 3, 64)
    assert torch.equal(flat_k[slots], qkv[:, 9:12].half())
    assert torch.equal(flat_v[slots], qkv[:, 12:15].half())
    assert flat_k.float().abs().sum() == qkv[:, 9:12].half().float().abs().sum()  # nothing else written


def test_the_engine_caches_float16_beside_quantized_weights_only(smollm):
    from llmos.engine import LLM

    quantized = LLM("smollm2-135m-instruct", kv_budget="8MiB")
    assert quantized.engine.kv_cache.kv.dtype == torch.float16
    fp32 = LLM(smollm, kv_budget="8MiB")
    assert fp32.engine.kv_cache.kv.dtype == torch.float32
    # The same budget holds twice the blocks at half the bytes.
    assert quantized.engine.blocks.num_blocks == 2 * fp32.engine.blocks.num_blocks
    # A step runs torch on one thread beside the kernels' pool, and gives the setting back.
    from llmos.engine import SamplingParams

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    quantized.generate([[1, 2, 3]], SamplingParams(max_tokens=2), on_step=lambda _: seen.append(
        torch.get_num_threads()))
    try:
        assert torch.get_num_threads() == 2 and seen and all(n == 2 for n in seen)
    finally:
        torch.set_num_threads(before)
