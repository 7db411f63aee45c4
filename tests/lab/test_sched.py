"""`llmos lab sched`: every policy of the kernel's registry runs the same agent mix; its timeline covers
every agent, never runs more calls at once than the cap, and the JSON holds the latencies and fairness."""

import json

import pytest

from llmos.kernel import POLICIES
from llmos.lab import run_lab
from llmos.lab.sched import SIZE


@pytest.fixture(scope="module")
def result(model, tmp_path_factory):
    return run_lab("sched", tmp_path_factory.mktemp("lab"), "small", model=model)


def test_every_policy_of_the_registry_runs_the_same_agents(result):
    d, w = result.data, SIZE["small"]
    assert json.loads(result.json_path.read_text()) == d
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(d["policies"]) == list(POLICIES)
    agents = {f"interactive-{i}" for i in range(w.interactive)} | {f"batch-{i}" for i in range(w.batch)}
    for policy, p in d["policies"].items():
        assert set(p["timeline"]) == agents, policy
        for name, spans in p["timeline"].items():
            assert spans, f"{policy}: {name} never ran"
            assert all(0 <= a < b for a, b in spans), (policy, name)
            assert all(b0 < a1 for (_, b0), (a1, _) in zip(spans, spans[1:], strict=False)), (policy, name)
            assert p["busy_s"][name] == pytest.approx(sum(b - a for a, b in spans))


def test_no_policy_runs_more_calls_at_once_than_the_cap(result):
    cap = SIZE["small"].max_running
    for policy, p in result.data["policies"].items():
        edges = sorted((t, +1 if k == 0 else -1) for spans in p["timeline"].values()
                       for span in spans for k, t in enumerate(span))
        running = 0
        for _, change in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at one instant
            running += change
            assert running <= cap, policy


def test_latency_and_fairness_are_measured_per_policy(result):
    w = SIZE["small"]
    for policy, p in result.data["policies"].items():
        assert p["latency_samples"] == w.interactive_requests == len(p["interactive_latencies_s"])
        assert 0 < p["interactive_p50_s"] <= p["interactive_p90_s"] <= p["interactive_max_s"]
        assert p["interactive_max_s"] == max(p["interactive_latencies_s"])
        assert 1 / w.batch <= p["jain_batch"] <= 1 + 1e-9, policy
        assert len(p["batch_shares"]) == w.batch and p["tokens"] > 0
    assert result.data["policies"]["fifo"]["preemptions"] == 0  # fifo never preempts
    for policy in POLICIES:
        assert policy in result.summary
    assert "Jain (batch)" in result.summary
