"""Autotuning: the operator searches llmos's own engine settings (the AutoOS idea applied to llmos).

Each candidate setting runs a short engine benchmark inside guardrails: only
values from an allowlisted grid (the KV budget bounded in bytes), a wall-time
bound per trial and for the whole search, and a resident-memory bound, both
checked at every engine step (a trial over either is aborted and scored 0).
Candidates come from a plain optimiser (coordinate descent from the
defaults) or, with a model, from the LLM answering under a JSON schema of the
grid. The best setting is re-measured against the defaults side by side
(alternating runs, medians) and written as a config file the user reviews.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

GRID: dict[str, list[Any]] = {
    "max_num_seqs": [4, 8, 16, 32, 64],
    "max_num_batched_tokens": [128, 256, 512, 1024, 2048],
    "block_size": [8, 16, 32],
    "kv_budget": ["64MiB", "256MiB", 0.9],  # 0.9: of free memory, capped at EngineConfig.kv_cpu_cap
}
DEFAULTS: dict[str, Any] = {"max_num_seqs": 64, "max_num_batched_tokens": 512, "block_size": 16,
                            "kv_budget": 0.9}  # EngineConfig's own defaults on CPU


class TrialAborted(Exception):
    """A trial crossed its time or memory bound."""


@dataclass
class Trial:
    settings: dict[str, Any]
    tok_per_s: float
    wall_s: float
    note: str = ""


@dataclass
class TuneBounds:
    budget_s: float = 300.0  # the whole search, final comparison included
    trial_s: float = 60.0
    rss_bytes: int = 6 * 2**30
    compare_rounds: int = 3  # default and best alternate this many times at the end (medians)


def grid_schema() -> dict[str, Any]:
    """The JSON schema a model's proposal must follow: one value of the grid per setting."""
    return {"type": "object", "additionalProperties": False, "required": list(GRID),
            "properties": {k: {"enum": v} for k, v in GRID.items()}}


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Only grid values pass: the guardrail on what a trial may configure."""
    unknown = set(settings) - set(GRID)
    if unknown:
        raise ValueError(f"not tunable: {sorted(unknown)} (tunable: {', '.join(GRID)})")
    for k, v in settings.items():
        if v not in GRID[k]:
            raise ValueError(f"{k}={v!r} is outside the allowed values {GRID[k]}")
    return {**DEFAULTS, **settings}


def coordinate_descent(best: Callable[[], dict[str, Any]], tried: Callable[[dict[str, Any]], bool]
                       ) -> Iterator[dict[str, Any]]:
    """Vary one setting at a time around the best so far, nearest values first; sweep until nothing is new."""
    while True:
        fresh = False
        for key, values in GRID.items():
            centre = best()
            i = values.index(centre[key])
            for j in sorted(range(len(values)), key=lambda j: (abs(j - i), j)):
                candidate = {**best(), key: values[j]}
                if not tried(candidate):
                    fresh = True
                    yield candidate
        if not fresh:
            return


def _llm_proposals(chat: Callable[[list[dict[str, Any]], dict[str, Any]], str],
                   history: Callable[[], list[Trial]], fallback: Iterator[dict[str, Any]],
                   tried: Callable[[dict[str, Any]], bool]) -> Iterator[dict[str, Any]]:
    """The model proposes the next setting from the trials so far; a repeat falls back to the optimiser."""
    system = ("You tune an LLM inference engine for throughput (output tokens per second). Given the "
              "settings tried and their throughput, answer the next settings to try as JSON.")
    while True:
        past = [{**t.settings, "tok_per_s": round(t.tok_per_s, 1)} for t in history()]
        text = chat([{"role": "system", "content": system},
                     {"role": "user", "content": json.dumps({"trials": past})}], grid_schema())
        try:
            candidate = check_settings(json.loads(text))
        except (ValueError, json.JSONDecodeError):
            candidate = None
        if candidate is None or tried(candidate):
            candidate = next(fallback, None)
            if candidate is None:
                return
        yield candidate


@dataclass
class Tuner:
    loaded: Any  # the LoadedModel every trial runs
    requests: list[Any]
    bounds: TuneBounds = field(default_factory=TuneBounds)
    device: str = "cpu"
    on_trial: Callable[[Trial], None] | None = None
    trials: list[Trial] = field(default_factory=list)

    def measure(self, settings: dict[str, Any], time_left: float) -> Trial:
        """One bounded benchmark run of `settings` (0 tok/s if it is aborted or fails)."""
        from llmos.bench.engine import run_llmos

        settings = check_settings(settings)
        limit = min(self.bounds.trial_s, time_left)
        started = time.monotonic()
        me = psutil.Process()

        def guard(_: int) -> None:
            if time.monotonic() - started > limit:
                raise TrialAborted(f"over the {limit:.0f}s trial bound")
            if me.memory_info().rss > self.bounds.rss_bytes:
                raise TrialAborted(f"over the {self.bounds.rss_bytes / 2**30:.1f} GiB memory bound")

        try:
            r = run_llmos(self.loaded, self.requests, advance=guard, device=self.device, **settings)
            trial = Trial(settings, r.throughput, r.wall_s, f"{r.extra['preemptions']} preemptions")
        except (TrialAborted, ValueError, RuntimeError) as e:
            trial = Trial(settings, 0.0, time.monotonic() - started, f"aborted: {e}")
        finally:
            gc.collect()
        return trial

    def search(self, proposer: str = "optimiser", chat: Any = None) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + self.bounds.budget_s

        rounds = self.bounds.compare_rounds

        def reserve() -> float:  # time kept for the final side-by-side comparison
            walls = [t.wall_s for t in self.trials if t.tok_per_s > 0]
            return 2 * rounds * (max(walls) if walls else 0.0) * 1.2

        def best() -> dict[str, Any]:
            return max(self.trials, key=lambda t: t.tok_per_s).settings if self.trials else dict(DEFAULTS)

        def tried(s: dict[str, Any]) -> bool:
            return any(t.settings == s for t in self.trials)

        self._record(self.measure(DEFAULTS, deadline - time.monotonic()))
        # on a slow (or busy) machine the comparison gets at most ~40% of the budget, one round at least
        fits = int(0.4 * self.bounds.budget_s / (2.4 * max(self.trials[0].wall_s, 1e-3)))
        rounds = max(1, min(rounds, fits))
        candidates = coordinate_descent(best, tried)
        if proposer == "model" and chat is not None:
            candidates = _llm_proposals(chat, lambda: self.trials, candidates, tried)
        for candidate in candidates:
            left = deadline - time.monotonic() - reserve()
            if left < self.trials[0].wall_s:  # not even time for a run as long as the defaults'
                break
            self._record(self.measure(candidate, left))
        chosen = best()
        # side by side: default and best alternate, so load from other work hits both alike
        default_runs: list[float] = []
        best_runs: list[float] = []
        for i in range(rounds if chosen != DEFAULTS else 0):  # nothing to compare when the defaults won
            for j, (runs, s) in enumerate(((default_runs, DEFAULTS), (best_runs, chosen))):
                share = (deadline - time.monotonic()) / (2 * (rounds - i) - j)
                runs.append(self.measure(s, max(share, 1.0)).tok_per_s)
        done_d, done_b = [x for x in default_runs if x > 0], [x for x in best_runs if x > 0]  # not aborted
        default_tps = statistics.median(done_d) if done_d else self.trials[0].tok_per_s
        best_tps = statistics.median(done_b) if done_b else 0.0
        searched = chosen
        if best_tps <= default_tps:  # the search's winner did not hold up side by side: keep the defaults
            chosen, best_tps, best_runs = dict(DEFAULTS), default_tps, default_runs
        return {
            "defaults": DEFAULTS, "best": chosen, "search_winner": searched, "proposer": proposer,
            "default_tok_per_s": default_tps, "best_tok_per_s": best_tps,
            "gain": best_tps / default_tps - 1 if default_tps else None,
            "default_runs": default_runs, "best_runs": best_runs,
            "trials": [t.__dict__ for t in self.trials], "seconds": time.monotonic() - t0,
            "budget_s": self.bounds.budget_s,
        }

    def _record(self, trial: Trial) -> None:
        self.trials.append(trial)
        if self.on_trial:
            self.on_trial(trial)


def write_config(path: str | Path, result: dict[str, Any]) -> Path:
    """The tuned engine settings as a TOML file for review (EngineConfig field names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gain = result["gain"]
    lines = ["# llmos engine settings found by `llmos tune` (llmos.EngineConfig fields).",
             f"# {result['best_tok_per_s']:.1f} tok/s vs {result['default_tok_per_s']:.1f} with the defaults"
             + (f" ({gain:+.1%})" if gain is not None else "") + "; review before use.", "", "[engine]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in result["best"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path
