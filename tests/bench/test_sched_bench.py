"""The scheduling benchmark's quick form: every policy does the same work (same greedy tokens)."""

import json

from rich.console import Console

from llmos.bench.sched import QUICK, interleaved, jain, run_sched_bench


def test_jain_index():
    assert jain([3, 3, 3]) == 1.0
    assert jain([1, 0, 0, 0]) == 0.25
    assert jain([0, 0]) == 1.0


def test_runs_are_interleaved_so_no_policy_always_runs_first():
    assert interleaved(("fifo", "rr", "fair"), 3) == ["fifo", "rr", "fair", "rr", "fair", "fifo",
                                                      "fair", "fifo", "rr"]


def test_quick_bench_runs_each_policy_on_the_same_work(tmp_path):
    out = tmp_path / "sched.json"
    report = run_sched_bench(Console(file=open(tmp_path / "log", "w")), quick=True, json_path=str(out),
                             policies=("fifo", "fair"), repeats=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    fifo, fair = report["results"]
    assert (fifo["policy"], fair["policy"]) == ("fifo", "fair")
    assert report["order"] == ["fifo", "fair", "fair", "fifo"]
    assert fifo["tokens"] == fair["tokens"] > QUICK.batch * 8  # same greedy output whatever the order
    assert all(r["tokens"] == fifo["tokens"] for r in fifo["runs"] + fair["runs"])  # and every repeat
    assert fifo["preemptions"] == 0 and fair["preemptions"] > 0
    for r in report["results"]:
        assert r["repeats"] == 2 and r["latency_samples"] == 2 * QUICK.interactive_requests
        assert r["tok_per_s_min"] <= r["tok_per_s"] <= r["tok_per_s_max"]
        assert 0 < r["jain_batch"] <= 1
        assert r["interactive_max_s"] >= r["interactive_p90_s"] >= r["interactive_p50_s"] > 0
        assert len(r["run_p50s_s"]) == len(r["run_p90s_s"]) == 2  # each run's own, for the spread
        assert all(p90 >= p50 > 0 for p50, p90 in zip(r["run_p50s_s"], r["run_p90s_s"], strict=True))
        assert max(r["run_p90s_s"]) <= r["interactive_max_s"]
