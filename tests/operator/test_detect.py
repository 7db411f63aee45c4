import random

from llmos.agents.operator.detect import Baseline, Detector, Finding, Rule, clears, subject_of


def _feed(det: Detector, values: list[float], name: str = "proc.7.cpu_percent") -> list[list[Finding]]:
    return [det.update({name: v}) for v in values]


def test_a_flat_signal_never_fires():
    det = Detector(rules=[])
    assert all(f == [] for f in _feed(det, [12.0] * 300))


def test_stationary_noise_stays_quiet():
    rnd = random.Random(0)
    det = Detector(rules=[])
    assert all(f == [] for f in _feed(det, [20 + rnd.gauss(0, 3) for _ in range(500)]))


def test_a_step_fires_after_persist_samples_and_is_not_learned():
    det = Detector(rules=[], warmup=10, persist=2, z=4.0, min_std=5.0)
    quiet = _feed(det, [10.0] * 30)
    assert all(f == [] for f in quiet)
    mean = det.baselines["proc.7.cpu_percent"].mean
    first, second, third = _feed(det, [60.0, 60.0, 60.0])
    assert first == []  # one sample is not yet an anomaly
    assert second == [Finding("anomaly", "pid:7", "proc.7.cpu_percent", 60.0, 30.0, "baseline")]
    assert third == second
    assert det.baselines["proc.7.cpu_percent"].mean == mean  # the fault is not learned


def test_a_single_spike_does_not_fire():
    det = Detector(rules=[], persist=2)
    assert all(f == [] for f in _feed(det, [10.0] * 30 + [90.0] + [10.0] * 10))


def test_no_baseline_fires_during_warmup():
    det = Detector(rules=[], warmup=10)
    assert all(f == [] for f in _feed(det, [0.0, 100.0] * 5))


def test_rule_needs_consecutive_samples():
    det = Detector(rules=[Rule("runaway_cpu", "proc.*.cpu_percent", 80.0, for_samples=3)], watch=())
    out = _feed(det, [90.0, 95.0, 50.0, 90.0, 91.0, 92.0])
    assert out[:5] == [[], [], [], [], []]
    assert out[5] == [Finding("runaway_cpu", "pid:7", "proc.7.cpu_percent", 92.0, 80.0, "rule")]


def test_a_rule_finding_hides_the_baseline_one_for_the_same_signal():
    det = Detector(rules=[Rule("memory_hog", "proc.*.rss_mb", 100.0)], warmup=5, persist=1)
    _feed(det, [10.0] * 10, "proc.3.rss_mb")
    assert det.update({"proc.3.rss_mb": 500.0}) == [
        Finding("memory_hog", "pid:3", "proc.3.rss_mb", 500.0, 100.0, "rule")]


def test_vanished_signals_forget_their_baseline():
    det = Detector(rules=[])
    _feed(det, [1.0] * 5)
    det.update({"proc.8.cpu_percent": 1.0})
    assert set(det.baselines) == {"proc.8.cpu_percent"}


def test_clears_and_subjects():
    f = Finding("runaway_cpu", "pid:7", "proc.7.cpu_percent", 99.0, 80.0, "rule")
    assert not clears(f, {"proc.7.cpu_percent": 85.0}, [])
    assert clears(f, {"proc.7.cpu_percent": 3.0}, [])
    assert clears(f, {}, [])  # the process is gone
    assert subject_of("scratch./tmp/a.b/c.mb") == "path:/tmp/a.b/c"
    assert subject_of("agent.4.quota_use") == "agent:4"
    assert subject_of("llmos.preemption_rate") == "llmos"


def test_ewma_tracks_the_mean():
    b = Baseline(alpha=0.5)
    for x in (10.0, 20.0):
        b.update(x)
    assert (b.n, b.mean, b.var) == (2, 15.0, 25.0)
