"""Detection: fixed rules plus a learned baseline per signal.

A rule says what is wrong on any machine (a granted process above 80% CPU for
three samples); a baseline says what is unusual on this one: each signal keeps
an exponentially weighted mean and variance (EWMA), and a sample whose
z-score stays above the threshold for `persist` samples is an anomaly. The
guarantees: a flat signal never fires (the deviation has a floor, so noise of
a constant is not infinitely unusual), no baseline fires before `warmup`
samples, and anomalous samples are not learned (a fault does not become the
new normal while it lasts).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """Something wrong or unusual about one subject ("pid:12", "path:/tmp/x", "agent:3", "llmos")."""

    kind: str  # runaway_cpu, memory_hog, scratch_full, over_quota, kv_thrashing, anomaly
    subject: str
    signal: str
    value: float
    limit: float  # the rule's threshold, or the baseline's mean + z * deviation
    source: str  # "rule" or "baseline"

    def describe(self) -> str:
        return (f"{self.kind} on {self.subject}: {self.signal}={self.value:.2f} > {self.limit:.2f} "
                f"({self.source})")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "signal": self.signal,
                "value": round(self.value, 3), "limit": round(self.limit, 3), "source": self.source}


@dataclass(frozen=True)
class Rule:
    """`kind` fires for a signal matching `pattern` above `threshold` for `for_samples` samples in a row."""

    kind: str
    pattern: str  # fnmatch over signal names, e.g. "proc.*.cpu_percent"
    threshold: float
    for_samples: int = 1


def default_rules(cpu_percent: float = 80.0, rss_mb: float = 512.0, scratch_mb: float = 256.0,
                  preemption_rate: float = 20.0, quota_use: float = 0.9) -> list[Rule]:
    """The fixed lines; `quota_use` fires before the kernel's hard quota ends the agent."""
    return [
        Rule("runaway_cpu", "proc.*.cpu_percent", cpu_percent, for_samples=3),
        Rule("memory_hog", "proc.*.rss_mb", rss_mb),
        Rule("scratch_full", "scratch.*.mb", scratch_mb),
        Rule("over_quota", "agent.*.quota_use", quota_use),
        Rule("kv_thrashing", "llmos.preemption_rate", preemption_rate, for_samples=2),
        # requests swapped out for want of KV blocks, sample after sample: the cache is too small
        Rule("kv_thrashing", "llmos.num_swapped", 0.5, for_samples=3),
    ]


def subject_of(signal: str) -> str:
    """The thing a signal is about: proc.12.cpu_percent -> pid:12, scratch.<path>.mb -> path:<path>."""
    head, _, rest = signal.partition(".")
    key = rest.rpartition(".")[0]
    return {"proc": f"pid:{key}", "scratch": f"path:{key}", "agent": f"agent:{key}"}.get(head, head)


@dataclass
class Baseline:
    """EWMA mean and variance of one signal."""

    alpha: float = 0.1
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    streak: int = 0  # consecutive anomalous samples

    def deviation(self, min_std: float, rel_std: float) -> float:
        return max(math.sqrt(self.var), min_std, rel_std * abs(self.mean))

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean = x
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.n += 1


@dataclass
class Detector:
    """Rules and baselines over the signals of successive observations."""

    rules: list[Rule] = field(default_factory=default_rules)
    z: float = 4.0
    warmup: int = 10
    persist: int = 2
    alpha: float = 0.1
    min_std: float = 5.0  # floor of the deviation, in the signal's own unit
    rel_std: float = 0.1  # ... and as a fraction of its mean
    watch: tuple[str, ...] = ("proc.*", "scratch.*", "llmos.preemption_rate", "llmos.num_waiting")
    baselines: dict[str, Baseline] = field(default_factory=dict)
    _streaks: dict[tuple[str, str], int] = field(default_factory=dict)

    def update(self, signals: dict[str, float]) -> list[Finding]:
        """Feed one observation's signals; the findings that hold now."""
        findings = self._rules(signals)
        flagged = {f.signal for f in findings}
        for name, x in signals.items():
            if not any(fnmatch.fnmatchcase(name, p) for p in self.watch):
                continue
            anomaly = self._baseline(name, x)
            if anomaly and name not in flagged:
                findings.append(anomaly)
        for name in set(self.baselines) - set(signals):  # a process ended, a dir vanished
            del self.baselines[name]
        return findings

    def _rules(self, signals: dict[str, float]) -> list[Finding]:
        out = []
        for rule in self.rules:
            for name, x in signals.items():
                if not fnmatch.fnmatchcase(name, rule.pattern):
                    continue
                key = (rule.kind, name)
                self._streaks[key] = self._streaks.get(key, 0) + 1 if x > rule.threshold else 0
                if self._streaks[key] >= rule.for_samples:
                    out.append(Finding(rule.kind, subject_of(name), name, x, rule.threshold, "rule"))
        live = set(signals)
        self._streaks = {k: v for k, v in self._streaks.items() if k[1] in live}
        return out

    def _baseline(self, name: str, x: float) -> Finding | None:
        b = self.baselines.setdefault(name, Baseline(self.alpha))
        if b.n < self.warmup:
            b.update(x)
            return None
        bound = b.mean + self.z * b.deviation(self.min_std, self.rel_std)
        if x <= bound:
            b.streak = 0
            b.update(x)
            return None
        b.streak += 1  # not learned: the fault must not become the baseline
        if b.streak < self.persist:
            return None
        return Finding("anomaly", subject_of(name), name, x, bound, "baseline")

    def zscores(self, signals: dict[str, float]) -> dict[str, float]:
        """Each watched signal's current z-score against its baseline (evidence for a reader)."""
        out = {}
        for name, x in signals.items():
            b = self.baselines.get(name)
            if b is not None and b.n >= self.warmup:
                out[name] = (x - b.mean) / b.deviation(self.min_std, self.rel_std)
        return out


def clears(finding: Finding, signals: dict[str, float], rules: Iterable[Rule]) -> bool:
    """Has the condition behind `finding` gone (signal back under its limit, or gone with its subject)?"""
    x = signals.get(finding.signal)
    if x is None:
        return True
    limit = finding.limit
    if finding.source == "rule":
        limit = next((r.threshold for r in rules if r.kind == finding.kind
                      and fnmatch.fnmatchcase(finding.signal, r.pattern)), limit)
    return x <= limit
