"""`llmos bench memory` in its quick form: the generated conversation, retrieval, latency."""

import json

import numpy as np
from rich.console import Console

from llmos.bench.virtual_context import make_conversation, run_memory_bench


def test_conversation_is_seeded_and_states_each_fact_once():
    a, b = make_conversation(sessions=30, facts=20, seed=3), make_conversation(sessions=30, facts=20, seed=3)
    assert a.rows == b.rows and a.facts == b.facts
    assert len(a.rows) == 30 * 28 and len(a.facts) == 20
    texts = [c for _, c, _ in a.rows]
    for row, question in a.facts:
        assert a.rows[row][0] == "user" and texts.count(texts[row]) == 1
        assert question not in texts  # asked later: questions are not part of the stored conversation
    assert make_conversation(sessions=30, facts=20, seed=4).rows != a.rows


def test_quick_bench_writes_its_report(tmp_path):
    out = tmp_path / "memory.json"
    report = run_memory_bench(Console(file=open(tmp_path / "log.txt", "w")), quick=True, context=False,
                              json_path=str(out))
    assert json.loads(out.read_text())["retrieval"]["facts"] == 20
    r = report["retrieval"]
    assert r["messages"] == 20 * 28 and r["tokens"] > 8000
    assert r["recall_at_5"]["archival_memory_search"] >= 0.9
    assert 0 < r["recall_at_5"]["conversation_search"] <= 1
    assert set(report["latency"]) == {"1000", "5000"}
    for res in report["latency"].values():
        assert 0 < res["conversation_search"]["p50_ms"] <= res["conversation_search"]["p99_ms"]
        assert res["ivf_in_use"] is False  # exact below 20k: no approximate figure to report
        assert "ivf_recall_vs_exact_on_noisy_copies" not in res
    v = report["ivf_real"]
    assert v["vectors"] == 20 * 28 and v["queries"] == 20 and v["nlist"] == int(2 * np.sqrt(20 * 28))
    r = v["recall_vs_exact_by_nprobe"]  # measured: 0.88, 0.96, 0.97 (4, 8, 16 of 47 cells scanned)
    assert 0.75 <= r["4"] < 1 and r["4"] <= r["8"] <= r["16"] and r["16"] >= 0.9  # approximate, yet close
    assert v["default_nprobe"] == 21 and r["21"] >= 0.95  # the default, 3 * sqrt(47) cells
