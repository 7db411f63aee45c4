"""KV retention policy: what happens to an agent's context while it runs a tool (InferCept's choice).

When an agent's LLM call ends with a tool call, its context's KV blocks can be
kept pinned on the device for a time-to-live, swapped to host memory, or
released to the prefix cache's eviction order. Each choice wastes something,
measured here in block-seconds, the memory-time product the others lose:

- keep: the context's blocks for the expected tool time, weighted by the
  memory pressure (0 while at most half the capacity is in use: idle memory
  nobody wants costs nothing);
- swap: the copy out and back in, during which the resident blocks stall;
- release: the recompute of the context if the prefix cache loses it (more
  likely the higher the pressure), during which the resident blocks stall;
  its cost a token is the engine's own, measured on its prefill steps (a
  GPU-like default until one ran), so a CPU that computes 20x slower values
  its contexts 20x more.

The cheapest wins; ties go to keep, then swap. The expected tool time is
learned per (agent, tool) like sjf's length predictor, falling back to the
tool's and then to all tools' mean. The decision is advice the engine
enforces safely: pinned blocks are released before any running sequence is
preempted, and the time-to-live frees them if the agent never comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACTIONS = ("keep", "swap", "release")


class ToolTimePredictor:
    """Expected tool duration in seconds: an EWMA per (agent, tool), then per tool, then overall."""

    def __init__(self, alpha: float = 0.5, default: float = 1.0) -> None:
        self.alpha = alpha
        self.default = default
        self.per_agent_tool: dict[tuple[str, str], float] = {}
        self.per_tool: dict[str, float] = {}
        self.overall: float | None = None

    def predict(self, agent: str, tool: str) -> float:
        guess = self.per_agent_tool.get((agent, tool), self.per_tool.get(tool))
        if guess is None:
            guess = self.overall if self.overall is not None else self.default
        return guess

    def observe(self, agent: str, tool: str, seconds: float) -> None:
        a = self.alpha
        prev = self.per_agent_tool.get((agent, tool))
        self.per_agent_tool[agent, tool] = seconds if prev is None else a * seconds + (1 - a) * prev
        prev = self.per_tool.get(tool)
        self.per_tool[tool] = seconds if prev is None else a * seconds + (1 - a) * prev
        self.overall = seconds if self.overall is None else 0.2 * seconds + 0.8 * self.overall


@dataclass(frozen=True)
class Memory:
    """The engine's KV memory when the decision is taken."""

    capacity_blocks: int
    used_blocks: int  # held by sequences and pins (the prefix cache's free blocks not counted)
    host_free_blocks: int
    prefill_s_per_token: float = 0.0  # the engine's measured compute cost a token (0: not measured)


@dataclass(frozen=True)
class RetentionDecision:
    action: str  # one of ACTIONS
    ttl: float  # seconds a kept (or swapped) context stays retained
    expected_tool_s: float
    costs: dict[str, float]  # block-seconds wasted by each action

    def describe(self) -> str:
        costs = ", ".join(f"{k} {v:.3g}" for k, v in self.costs.items())
        return f"{self.action} (tool ~{self.expected_tool_s:.2f}s; waste in block-s: {costs})"


@dataclass
class RetentionPolicy:
    prefill_s_per_token: float = 2e-4  # recompute cost of one context token, until the engine measured it
    swap_s_per_block: float = 1e-4  # one block's copy to host (and the same back)
    ttl_factor: float = 2.0  # a kept context lives this many expected tool times ...
    min_ttl: float = 0.5  # ... at least this long
    free_share: float = 0.5  # memory use below which keeping costs nothing
    predictor: ToolTimePredictor = field(default_factory=ToolTimePredictor)

    def pressure(self, memory: Memory) -> float:
        """0 while at most `free_share` of the capacity is in use (that memory is free for the
        taking), rising to 1 when all of it is."""
        used = memory.used_blocks / max(1, memory.capacity_blocks)
        return min(1.0, max(0.0, (used - self.free_share) / (1 - self.free_share)))

    def decide(self, agent: str, tool: str, context_blocks: int, context_tokens: int,
               memory: Memory) -> RetentionDecision:
        expected = self.predictor.predict(agent, tool)
        pressure = self.pressure(memory)
        resident = max(memory.used_blocks, context_blocks)
        costs = {
            "keep": expected * context_blocks * pressure,
            "swap": (2 * self.swap_s_per_block * context_blocks * resident
                     if memory.host_free_blocks >= context_blocks else float("inf")),
            "release": (memory.prefill_s_per_token or self.prefill_s_per_token)
                       * context_tokens * resident * pressure,
        }
        action = min(ACTIONS, key=lambda a: (costs[a], ACTIONS.index(a)))
        ttl = max(self.min_ttl, self.ttl_factor * expected)
        return RetentionDecision(action, ttl, expected, costs)
