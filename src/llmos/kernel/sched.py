"""The agent scheduler: which agents' LLM calls run on the engine, like a CPU scheduler.

The engine runs at most `max_running` calls at once (a loaded server's batch
cap); every tick (one engine step) the policy picks who holds those slots:

- `fifo`: first come, first served, never preempts (AIOS's default).
- `rr`: round robin; a call that generated `quantum` tokens goes to the back of
  the queue when someone is waiting.
- `priority`: strict priority (lower runs first, as `nice`), preemptive; a
  waiting call's priority improves by one level every `aging` ticks, so
  nothing starves.
- `fair`: weighted fair share, CFS-style: each agent's virtual runtime is
  the tokens it generated divided by its weight, and the lowest runs; a new
  or sleeping agent starts at the queue's minimum less one quantum.
- `sjf`: shortest predicted remaining job first (preemptive, as SRTF), with
  aging; the prediction is learned per agent from its own past calls
  (`LengthPredictor`); a call that outlived its prediction is expected to run
  to its max_tokens. A running call yields to one predicted to need less
  than half of what it still needs, once it has run a quantum.
- `las`: least attained service over whole programs, discretized as in
  Autellix's PLAS: a process's service is the tokens it has been served across
  all its LLM calls; it sits in level 0 below `quantum` tokens, and each next
  level's threshold doubles (quantum, 3x, 7x, ...), as in a multi-level
  feedback queue. Lower levels run first, so short programs finish early and a
  long program's tenth call does not jump ahead of a newcomer's first; within a
  level programs run in the order they arrived (FCFS over programs), so a
  program's next call goes before a later program's, and programs run
  depth-first instead of all advancing together. Aging: every `aging` ticks of
  waiting lift a call one level, so long programs still finish. A running call
  yields only to a call of a lower level, once it has run a quantum.

Preemption is a pause: the engine keeps the call's KV blocks (or swaps them
when memory runs short) and resumes it exactly where it stopped. The
scheduler is a plain object driven by ticks, so its decisions are
deterministic and testable without an engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

POLICIES = ("fifo", "rr", "priority", "fair", "sjf", "las")
_PREEMPTIVE = {"rr", "priority", "fair", "sjf", "las"}


@dataclass(eq=False)
class LLMCall:
    """One LLM syscall as the scheduler sees it."""

    call_id: str
    pid: int
    priority: int = 0
    weight: float = 1.0
    max_tokens: int = 256
    predicted: float = 0.0  # predicted output tokens (sjf), set on submit
    order: int = 0  # submission order, the fifo tie-break
    enqueued: int = 0  # tick it last joined the ready queue (rr)
    generated: int = 0  # tokens generated so far
    slice_start: int = 0  # `generated` when it was last admitted
    waited: int = 0  # ticks spent waiting in all (aging)
    running: bool = False
    held: bool = False  # its agent is suspended
    cached_tokens: int = 0  # prompt tokens served from KV already there (prefix hit, retained)
    output_ids: list[int] = field(default_factory=list)  # its answer's tokens (embedded engine)


class LengthPredictor:
    """Predicts a call's output length from its agent's history (an EWMA), a lightweight
    learned model in the kernel in the spirit of LinnOS; falls back to the all-agents mean."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.per_agent: dict[int, float] = {}
        self.overall: float | None = None
        self.errors: list[float] = []  # |predicted - actual| of finished calls

    def predict(self, pid: int, max_tokens: int) -> float:
        guess = self.per_agent.get(pid, self.overall if self.overall is not None else max_tokens / 2)
        return min(float(max_tokens), guess)

    def observe(self, pid: int, predicted: float, actual: int) -> None:
        self.errors.append(abs(predicted - actual))
        a = self.alpha
        prev = self.per_agent.get(pid)
        self.per_agent[pid] = actual if prev is None else a * actual + (1 - a) * prev
        self.overall = actual if self.overall is None else 0.2 * actual + 0.8 * self.overall


@dataclass
class SchedulerSettings:
    policy: str = "fifo"
    max_running: int = 8
    quantum: int = 16  # tokens: the rr time slice and the fair-share granularity
    aging: int = 64  # ticks of waiting that raise a call's priority one level (priority, sjf)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; "
                             f"choose one of {', '.join(POLICIES)}")
        for name in ("max_running", "quantum", "aging"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class AgentScheduler:
    settings: SchedulerSettings = field(default_factory=SchedulerSettings)
    predictor: LengthPredictor = field(default_factory=LengthPredictor)
    waiting: list[LLMCall] = field(default_factory=list)
    running: list[LLMCall] = field(default_factory=list)
    vruntime: dict[int, float] = field(default_factory=dict)  # pid -> tokens / weight (fair)
    min_vruntime: float = 0.0
    attained: dict[int, int] = field(default_factory=dict)  # pid -> tokens served, all its calls (las)
    arrived: dict[int, int] = field(default_factory=dict)  # pid -> order of its first call (las)
    held: set[int] = field(default_factory=set)  # suspended pids
    tick: int = 0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self._order = itertools.count()

    # -- events ---------------------------------------------------------------

    def submit(self, call: LLMCall) -> None:
        call.order = next(self._order)
        self.arrived.setdefault(call.pid, call.order)
        call.enqueued = self.tick
        call.held = call.pid in self.held
        call.predicted = self.predictor.predict(call.pid, call.max_tokens)
        # A new or sleeping agent starts one quantum below the busiest's minimum: it runs soon,
        # but cannot bank the time it slept.
        floor = self.min_vruntime - self.settings.quantum
        self.vruntime[call.pid] = max(self.vruntime.get(call.pid, floor), floor)
        self.waiting.append(call)

    def progress(self, call: LLMCall, generated: int) -> None:
        """The call has generated `generated` tokens in all."""
        delta = generated - call.generated
        if delta > 0:
            call.generated = generated
            self.attained[call.pid] = self.attained.get(call.pid, 0) + delta
            self.vruntime[call.pid] = self.vruntime.get(call.pid, 0.0) + delta / call.weight

    def finish(self, call: LLMCall) -> None:
        """The call ended (finished or aborted): its slot is free."""
        for queue in (self.running, self.waiting):
            if call in queue:
                queue.remove(call)
                self.predictor.observe(call.pid, call.predicted, call.generated)
        call.running = False

    def hold(self, pid: int) -> None:
        """Suspend an agent: its calls leave the engine at the next tick."""
        self.held.add(pid)
        for call in self.calls():
            if call.pid == pid:
                call.held = True

    def release(self, pid: int) -> None:
        self.held.discard(pid)
        for call in self.calls():
            if call.pid == pid:
                call.held = False

    def calls(self) -> list[LLMCall]:
        return self.running + self.waiting

    # -- the decision -----------------------------------------------------------

    def schedule(self, preemptive: bool = True) -> tuple[list[LLMCall], list[LLMCall]]:
        """One tick: returns (calls to start or resume, calls to pause)."""
        self.tick += 1
        self._advance_min_vruntime()
        for call in self.waiting:
            call.waited += 1
        stopped = [c for c in self.running if c.held]
        for call in stopped:
            self._pause(call)
        if preemptive and self.settings.policy in _PREEMPTIVE:
            stopped += self._preempt()
        ready = sorted((c for c in self.waiting if not c.held), key=self._key)
        started = ready[: max(0, self.settings.max_running - len(self.running))]
        for call in started:
            self.waiting.remove(call)
            self.running.append(call)
            call.running = True
            call.slice_start = call.generated
        paused = [c for c in stopped if c not in started]
        self.preemptions += sum(1 for c in paused if not c.held)
        return started, paused

    def level(self, call: LLMCall) -> int:
        """las: the queue of `call`'s program: attained service below `quantum` is level 0, each
        next threshold doubles (quantum, 3 quanta, 7 ...); `aging` ticks of waiting lift it one."""
        s = self.settings
        level = (self.attained.get(call.pid, 0) // s.quantum + 1).bit_length() - 1
        return max(0, level - call.waited // s.aging)

    def _key(self, call: LLMCall) -> tuple[float, ...]:
        policy, s = self.settings.policy, self.settings
        if policy == "rr":
            return (call.enqueued, call.order)
        if policy == "priority":
            return (call.priority - call.waited // s.aging, call.order)
        if policy == "fair":
            return (self.vruntime.get(call.pid, 0.0), call.order)
        if policy == "sjf":
            return (self._remaining(call) - call.waited * s.quantum / s.aging, call.order)
        if policy == "las":
            return (self.level(call), self.arrived.get(call.pid, call.order), call.order)
        return (call.order, 0)

    def _preempt(self) -> list[LLMCall]:
        """Pause running calls that the policy says should yield to a waiting one."""
        paused = []
        ready = [c for c in self.waiting if not c.held]
        while ready and self.running:
            best = min(ready, key=self._key)
            victim = self._victim(best)
            if victim is None:
                break
            self._pause(victim)
            ready.remove(best)  # best takes the slot in this tick's admission
            paused.append(victim)
        return paused

    def _victim(self, best: LLMCall) -> LLMCall | None:
        policy, q = self.settings.policy, self.settings.quantum
        if len(self.running) < self.settings.max_running:
            return None  # a free slot: nobody needs to yield
        if policy == "rr":
            expired = [c for c in self.running if c.generated - c.slice_start >= q]
            return max(expired, key=lambda c: c.generated - c.slice_start) if expired else None
        worst = max(self.running, key=self._key)
        if policy == "sjf":
            ran = worst.generated - worst.slice_start >= q
            return worst if ran and self._key(best)[0] < self._remaining(worst) / 2 else None
        if policy == "priority":
            return worst if self._key(best)[0] < self._key(worst)[0] else None
        if policy == "las":
            ran = worst.generated - worst.slice_start >= q
            return worst if ran and self.level(best) < self.level(worst) else None
        # fair: yield once the gap exceeds the granularity and the victim has run at all
        gap = self.vruntime[worst.pid] - self.vruntime[best.pid]
        return worst if gap > q / best.weight and worst.generated > worst.slice_start else None

    @staticmethod
    def _remaining(call: LLMCall) -> float:
        """Tokens a call still needs by its prediction; past the prediction, up to max_tokens."""
        expected = call.predicted if call.generated < call.predicted else call.max_tokens
        return max(0.0, expected - call.generated)

    def _pause(self, call: LLMCall) -> None:
        self.running.remove(call)
        self.waiting.append(call)
        call.running = False
        call.enqueued = self.tick

    def _advance_min_vruntime(self) -> None:
        """The queue's minimum virtual runtime; it never goes back (as in CFS)."""
        active = [self.vruntime[c.pid] for c in self.calls() if c.pid in self.vruntime]
        if active:
            self.min_vruntime = max(self.min_vruntime, min(active))

    # -- settings ---------------------------------------------------------------

    def configure(self, **changes: int | str) -> dict[str, int | str]:
        """Change settings at run time; returns the previous values of those changed."""
        unknown = set(changes) - {"policy", "max_running", "quantum", "aging"}
        if unknown:
            raise ValueError(f"unknown scheduler setting(s): {', '.join(sorted(unknown))}")
        old = {k: getattr(self.settings, k) for k in changes}
        self.settings = SchedulerSettings(**{**self.settings.__dict__, **changes})
        return old
