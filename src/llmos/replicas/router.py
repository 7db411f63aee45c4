"""Request placement over engine replicas: the load balancer in front of N engines.

Where a request runs matters as much as how fast a replica runs (SGLang's
cache-aware router, llm-d): a replica that already holds a prompt's prefix in
its prefix cache skips that prefix's prefill. The router keeps, per replica,
an approximate map of the prefix-cache keys of the blocks it sent there
(`engine.block_manager.prefix_hashes`, the keys the engine itself looks up),
least recently used first, trimmed to the KV capacity the replica reports
after each request and emptied when the replica is lost. Policies:

- `round-robin`: the replicas in turn;
- `least-loaded`: the fewest requests in flight (ties: the lower reported KV
  usage, then the lower index);
- `prefix`: the replica holding the longest prefix of the prompt's blocks;
  with none held anywhere, the replica the session (an agent, a conversation)
  last ran on; else the fewest in flight, then the fewest blocks held (new
  sessions spread over the replicas' memory). A replica more than `max_imbalance`
  requests in flight above the least loaded one is overloaded and is passed
  over, whatever it holds.

Guarantees: a lost (down) or excluded replica is never chosen; with none left
`NoReplicaError`; a choice depends on the router's state alone (no clock, no
randomness), so tests script it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

POLICIES = ("prefix", "least-loaded", "round-robin")
_MAX_SESSIONS = 100_000


class NoReplicaError(RuntimeError):
    """No replica is up to take the request."""


@dataclass
class ReplicaState:
    """What the router believes of one replica."""

    up: bool = True
    in_flight: int = 0  # requests sent and not yet finished or failed
    kv_usage: float = 0.0  # reported share of KV blocks in use
    capacity: int = 1 << 30  # reported KV blocks: the most prefix blocks it can hold
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # block keys, LRU first
    routed: int = 0  # requests sent to it so far

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt it holds (keys chain, so a prefix is all it can hold)."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n


class Router:
    """Chooses a replica per request under one policy; `routed`, `finished`, `lost` keep its state."""

    def __init__(self, num_replicas: int, policy: str = "prefix", max_imbalance: int = 4) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown router {policy!r}; choose one of {', '.join(POLICIES)}")
        if num_replicas < 1:
            raise ValueError("a replica pool needs at least one replica")
        self.policy = policy
        self.max_imbalance = max_imbalance
        self.replicas = [ReplicaState() for _ in range(num_replicas)]
        self.sessions: OrderedDict[str, int] = OrderedDict()  # session -> the replica it last ran on
        self._turn = 0

    def choose(self, hashes: list[int], session: str | None = None, exclude: Iterable[int] = ()) -> int:
        """The replica for a prompt with these block keys, from the session `session`."""
        excluded = set(exclude)
        live = [i for i, r in enumerate(self.replicas) if r.up and i not in excluded]
        if not live:
            raise NoReplicaError("no engine replica is up to serve the request")
        if self.policy == "round-robin":
            i = min(live, key=lambda i: (i - self._turn) % len(self.replicas))
            self._turn = i + 1
            return i
        least = min(live, key=self._load)
        if self.policy == "least-loaded":
            return least
        floor = self.replicas[least].in_flight
        fit = [i for i in live if self.replicas[i].in_flight - floor <= self.max_imbalance]
        best = max(fit, key=lambda i: (self.replicas[i].match(hashes), -self.replicas[i].in_flight, -i))
        if self.replicas[best].match(hashes):
            return best
        home = self.sessions.get(session) if session is not None else None
        if home in fit:
            return home
        return min(fit, key=lambda i: (self.replicas[i].in_flight, len(self.replicas[i].blocks), i))

    def _load(self, i: int) -> tuple[int, float, int]:
        r = self.replicas[i]
        return r.in_flight, r.kv_usage, i

    def routed(self, i: int, hashes: list[int], session: str | None = None) -> None:
        """A request went to replica i: its prompt's blocks will be cached there once it has run."""
        r = self.replicas[i]
        r.in_flight += 1
        r.routed += 1
        for h in hashes:
            r.blocks[h] = None
            r.blocks.move_to_end(h)
        self._trim(r)
        if session is not None:
            self.sessions[session] = i
            self.sessions.move_to_end(session)
            while len(self.sessions) > _MAX_SESSIONS:
                self.sessions.popitem(last=False)

    def finished(self, i: int, kv_usage: float | None = None, capacity: int | None = None) -> None:
        """A request on replica i ended (done, aborted or failed); with what the replica reported."""
        r = self.replicas[i]
        r.in_flight = max(0, r.in_flight - 1)
        if kv_usage is not None:
            r.kv_usage = kv_usage
        if capacity is not None:
            r.capacity = max(1, capacity)
            self._trim(r)

    def lost(self, i: int) -> None:
        """Replica i died: nothing is cached there any more and nothing routes there until `restored`."""
        r = self.replicas[i]
        r.up, r.in_flight, r.kv_usage = False, 0, 0.0
        r.blocks.clear()
        for session in [s for s, home in self.sessions.items() if home == i]:
            del self.sessions[session]

    def restored(self, i: int) -> None:
        self.replicas[i].up = True

    @staticmethod
    def _trim(r: ReplicaState) -> None:
        while len(r.blocks) > r.capacity:
            r.blocks.popitem(last=False)
