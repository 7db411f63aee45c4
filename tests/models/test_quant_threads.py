"""The quantized kernels' thread pool: the same bits whatever the thread count, and no stalls or
deadlocks in the ways a pool breaks (concurrent callers, a fork, a thread count changed mid-run)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch

from llmos.models import quant
from llmos.models.config import ModelError
from llmos.models.quant import QuantFormat

pytestmark = pytest.mark.skipif(not quant.available(), reason="the C kernel needs a compiler")


@pytest.fixture
def restore_threads():
    yield
    quant.set_num_threads(quant.num_threads())


def _product(fmt: QuantFormat = QuantFormat.Q4_1, rows: int = 3, n: int = 1000, k: int = 576):
    gen = torch.Generator().manual_seed(n + k + rows)
    return torch.randn(rows, k, generator=gen), quant.quantize(torch.randn(n, k, generator=gen), fmt)


@pytest.mark.parametrize("fmt", list(QuantFormat))
def test_every_thread_count_computes_the_same_bits(fmt, restore_threads):
    x, w = _product(fmt)
    quant.set_num_threads(1)
    alone = quant.quant_linear(x, w)
    embedded = quant.QuantizedEmbedding(w)(torch.arange(w.shape[0]))
    for threads in (2, 3, 8):
        quant.set_num_threads(threads)
        for _ in range(20):  # chunks land on different threads from call to call
            assert torch.equal(quant.quant_linear(x, w), alone)
        assert torch.equal(quant.QuantizedEmbedding(w)(torch.arange(w.shape[0])), embedded)


def test_concurrent_callers_each_get_their_own_result(restore_threads):
    # A second caller while a job runs computes alone instead of joining (or corrupting) it.
    quant.set_num_threads(2)
    cases = [_product(rows=r, n=700 + r) for r in range(1, 5)]
    expected = [quant.quant_linear(x, w) for x, w in cases]
    failures: list[int] = []

    def hammer(i: int) -> None:
        x, w = cases[i]
        for _ in range(50):
            if not torch.equal(quant.quant_linear(x, w), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and failures == []


def _child_product(queue) -> None:
    x, w = _product()
    queue.put(quant.quant_linear(x, w).tolist())


def test_a_forked_child_starts_its_own_workers(restore_threads):
    # The parent's workers do not exist in the child: its first product must not wait for them.
    quant.set_num_threads(2)
    x, w = _product()
    expected = quant.quant_linear(x, w)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_product, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and torch.equal(torch.tensor(got), expected)


def test_thread_count_comes_from_the_environment_or_the_affinity(monkeypatch):
    monkeypatch.setenv("LLMOS_NUM_THREADS", "3")
    assert quant.num_threads() == 3
    monkeypatch.setenv("LLMOS_NUM_THREADS", "0")
    assert quant.num_threads() == 1
    monkeypatch.setenv("LLMOS_NUM_THREADS", "two")
    with pytest.raises(ModelError, match="LLMOS_NUM_THREADS must be a whole number"):
        quant.num_threads()
    monkeypatch.delenv("LLMOS_NUM_THREADS")
    assert quant.num_threads() == len(os.sched_getaffinity(0))
