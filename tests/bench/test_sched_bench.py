"""The scheduling benchmark's quick form: every policy does the same work (same greedy tokens)."""

import json

from rich.console import Console

from llmos.bench.sched import QUICK, jain, run_sched_bench


def test_jain_index():
    assert jain([3, 3, 3]) == 1.0
    assert jain([1, 0, 0, 0]) == 0.25
    assert jain([0, 0]) == 1.0


def test_quick_bench_runs_each_policy_on_the_same_work(tmp_path):
    out = tmp_path / "sched.json"
    report = run_sched_bench(Console(file=open(tmp_path / "log", "w")), quick=True, json_path=str(out),
                             policies=("fifo", "fair"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    fifo, fair = report["results"]
    assert (fifo["policy"], fair["policy"]) == ("fifo", "fair")
    assert fifo["tokens"] == fair["tokens"] > QUICK.batch * 8  # same greedy output whatever the order
    assert fifo["preemptions"] == 0 and fair["preemptions"] > 0
    for r in report["results"]:
        assert 0 < r["jain_batch"] <= 1 and r["interactive_p99_s"] >= r["interactive_p50_s"] > 0
