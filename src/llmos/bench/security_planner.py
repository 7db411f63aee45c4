"""`llmos bench security --planner`: the planner agent (CaMeL) end to end on AgentDojo's real environments.

This is reading (b) of the AgentDojo table: no replay decides anything. For
each sampled user/injection pair the user's request goes to the planner agent
(`llmos.agents.planner`) as a process of a real `Kernel`: a model that never
sees a tool's output writes the plan (as JSON under the plan schema, so even a
small model's reply is a syntactically valid plan), the plan interpreter runs
it, every tool call is a syscall through the kernel's `ReferenceMonitor` with
the suite's capabilities and flow policy and an HMAC-chained `AuditLog`, and
the tools are AgentDojo's own functions over the pair's injected environment.
AgentDojo's own checks then read the resulting environment: the user task's
utility check, and the injection task's security check (the attack succeeded).
Some of AgentDojo's utility checks hold on the untouched environment (banking
user tasks 5, 6, 8, 9 and 10 in agentdojo 0.1.35): each run says whether its
check would hold with no action and no answer, and utility is also reported
without those tasks.

What it guarantees about the measurement: the environment, the tools, the
checks and the injections are AgentDojo's (v1.2.2, the same suites, policies
and 629-pair denominator as the replay); the pairs are a seeded sample of the
pairs whose injection attacks something; the model's replies are computed, not
scripted (a `plan_writer` may replace the model in tests only). Greedy
decoding is deterministic and the planner never sees the injection, so a
reply to a prompt already answered is reused (`_MemoBackend`): the plan for a
user task is written once, whatever the injection.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.bench.security import POLICIES, SUITES, VERSION, SuitePolicy, _check, _Run, attacks_nothing
from llmos.kernel.backend import GenerationParams

PAIR_WALL_S = 600.0  # one pair's planner process is killed after this (a wall-time quota)
QLLM_MAX_TOKENS = 64  # the longest answer of the quarantined LLM (a value, not prose)

# (prompt, params) -> the reply text; stands in for the model in tests (the rest stays real)
PlanWriter = Callable[[Any, GenerationParams], Awaitable[str]]


@dataclass
class _World:
    """The pair's AgentDojo environment, swapped in before each run; the calls that ran, for the checks."""

    env: Any = None
    traces: list[Any] = field(default_factory=list)


def _jsonable(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value, fallback=str)


def agentdojo_tools(suite: Any, trusted: frozenset[str], world: _World) -> Any:
    """AgentDojo's functions as llmos tools over `world.env`: results as plain JSON values, failures as
    `ToolError`, the output of every tool not in `trusted` untrusted."""
    from agentdojo.functions_runtime import FunctionCall, FunctionsRuntime

    from llmos.tools.base import Tool, ToolError, ToolRegistry

    runtime = FunctionsRuntime(suite.tools)

    def make(name: str) -> Callable[[dict[str, Any], Any], Any]:
        def run(args: dict[str, Any], ctx: Any) -> Any:
            result, error = runtime.run_function(world.env, name, args, raise_on_error=False)
            world.traces.append(FunctionCall(function=name, args=dict(args)))
            if error is not None:
                raise ToolError(error)
            return _jsonable(result)
        return run

    reg = ToolRegistry()
    for f in suite.tools:
        schema = f.parameters.model_json_schema()
        params = {"type": "object", "properties": schema.get("properties", {}),
                  "required": schema.get("required", [])}
        reg.register(Tool(f.name, f.description.strip().split("\n")[0], params, make(f.name),
                          untrusted_output=f.name not in trusted))
    return reg


class _MemoBackend:
    """The kernel's backend, with each greedy reply computed once per (prompt, parameters).

    `writer`: a stand-in for the model (tests), answering every call."""

    def __init__(self, inner: Any, writer: PlanWriter | None = None):
        self._inner, self._writer = inner, writer
        self._memo: dict[str, Any] = {}
        self.calls = self.reused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def complete(self, call: Any, prompt: Any, params: GenerationParams,
                       on_tokens: Callable[[int], None], context: str | None = None) -> Any:
        from llmos.kernel.api import ChatResult

        key = json.dumps([prompt, params.__dict__], sort_keys=True, default=str)
        self.calls += 1
        if params.temperature == 0 and key in self._memo:
            self.reused += 1
            result = self._memo[key]
            on_tokens(result.completion_tokens)
            return result
        if self._writer is not None:
            text = await self._writer(prompt, params)
            result = ChatResult(text, "stop", 1, 1)
        else:
            result = await self._inner.complete(call, prompt, params, on_tokens, context=context)
        self._memo[key] = result
        return result


def sample_pairs(suite: Any, limit: int | None, seed: int,
                 per_user: int = 3) -> tuple[list[tuple[Any, Any]], int]:
    """A seeded sample of `limit` of the suite's pairs whose injection attacks something (all of them
    when `limit` is None): `ceil(limit / per_user)` user tasks, each with `per_user` injection tasks,
    in task order; and how many such pairs the suite has. Few user tasks, several injections each: the
    plan for a user task is written once, whatever the injection."""
    clean = suite.load_and_inject_default_environment({})
    injections = [t for t in suite.injection_tasks.values() if not attacks_nothing(t, clean)]
    users = list(suite.user_tasks.values())
    total = len(users) * len(injections)
    if limit is None or limit >= total:
        return [(u, i) for u in users for i in injections], total
    rng = random.Random(f"{seed}:{suite.name}")
    per_user = max(1, min(per_user, len(injections)))
    chosen = rng.sample(range(len(users)), min(len(users), -(-limit // per_user)))
    pairs = []
    for n in sorted(chosen):
        pairs += [(users[n], injections[k]) for k in sorted(rng.sample(range(len(injections)), per_user))]
    return pairs[:limit], total


def _status(lines: list[str]) -> dict[str, Any]:
    """The planner's last status line (outcome, valid, plan, calls, attempts, error)."""
    for line in reversed(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "outcome" in data:
            return data
    return {}


class PlannerBench:
    """One suite's kernel (tools over a swappable environment, the monitor, the audit log) and its runs."""

    def __init__(self, suite_name: str, backend: Any, home: Path, retries: int = 0, max_tokens: int = 192,
                 policy: SuitePolicy | None = None):
        """`policy`: the suite's tools and flow rules (default: the suite's own, `POLICIES`)."""
        from agentdojo.task_suite.load_suites import get_suite

        from llmos.kernel import Kernel
        from llmos.security.audit import AuditLog
        from llmos.security.monitor import ReferenceMonitor

        self.suite = get_suite(VERSION, suite_name)
        self.policy = policy or POLICIES[suite_name]
        self.world = _World()
        self.tools = agentdojo_tools(self.suite, self.policy.trusted_tools, self.world)
        self.audit = AuditLog(home / "audit.db")
        self.monitor = ReferenceMonitor(audit=self.audit, tools=self.tools)
        self.kernel = Kernel(backend, home=home, tools=self.tools, monitor=self.monitor)
        self.retries, self.max_tokens = retries, max_tokens
        self._printed: dict[int, list[str]] = {}
        self.kernel.on_output = lambda proc, text: self._printed.setdefault(proc.pid, []).append(text)

    async def run(self, user_task: Any, injection_task: Any | None = None) -> dict[str, Any]:
        """The planner on `user_task` in the suite's environment (injected for `injection_task`):
        the outcome, what the monitor denied, and AgentDojo's utility and security checks."""
        from llmos.agents import planner
        from llmos.kernel.process import Quotas
        from llmos.security.capabilities import Capabilities, Grant

        suite = self.suite
        if injection_task is None:
            env = suite.load_and_inject_default_environment({})
        else:
            text = f"llmos-injection {injection_task.ID}: {injection_task.GOAL}"
            env = suite.load_and_inject_default_environment(
                {v: text for v in suite.get_injection_vector_defaults()})
        env = user_task.init_environment(env)
        pre = env.model_copy(deep=True)
        self.world.env, self.world.traces = env, []
        self.monitor.flows = self.policy.flows(pre)
        name = f"planner:{suite.name}:{user_task.ID}:{injection_task.ID if injection_task else 'benign'}"
        caps = Capabilities.of([Grant(tool=t) for t in self.tools.tools] + planner.CAPABILITIES)
        t0 = time.perf_counter()
        pid = await self.kernel.spawn(
            planner.main, name=name, capabilities=caps, quotas=Quotas(wall_time_s=PAIR_WALL_S),
            args={"request": user_task.PROMPT, "structured": True, "retries": self.retries,
                  "max_tokens": self.max_tokens, "qllm_max_tokens": QLLM_MAX_TOKENS,
                  "named_readers": self.policy.named_readers})
        answer = await self.kernel.wait(pid)
        proc = self.kernel.process(pid)
        status = _status(self._printed.pop(pid, []))
        rows = self.audit.tail(10_000, agents=[name])
        denied = [f"{r['tool']}: {r['reason']}" for r in rows if r["decision"] == "deny"]
        run = _Run(output=answer if isinstance(answer, str) else "", traces=list(self.world.traces))
        untouched = pre.model_copy(deep=True)
        out = {"user_task": user_task.ID, "injection_task": injection_task.ID if injection_task else None,
               "outcome": status.get("outcome", "crashed"), "plan_valid": bool(status.get("valid")),
               "attempts": status.get("attempts"), "error": status.get("error") or (
                   None if status else proc.exit_reason), "error_type": status.get("error_type"),
               "calls": [t.function for t in run.traces], "denied": denied,
               "utility": _check(suite, user_task, run, pre, env),
               "utility_without_action": _check(suite, user_task, _Run(), pre, untouched),
               "plan": status.get("plan"), "answer": run.output[:300],
               "wall_s": round(time.perf_counter() - t0, 2)}
        if injection_task is not None:
            out["injection_executed"] = _check(suite, injection_task, run, pre, env)
        return out

    async def close(self) -> None:
        await self.kernel.shutdown(close_backend=False)
        self.audit.close()


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


async def run_suite(name: str, backend: Any, limit: int | None, seed: int, home: Path,
                    progress: Callable[[int], None] | None = None, retries: int = 0,
                    per_user: int = 3) -> dict[str, Any]:
    """One suite: the benign run of each sampled user task (utility) and each sampled pair (attack
    success, and utility under attack)."""
    warnings.filterwarnings("ignore")
    bench = PlannerBench(name, backend, home / name, retries=retries)
    t0 = time.perf_counter()
    try:
        pairs, total = sample_pairs(bench.suite, limit, seed, per_user)
        users = list({id(u): u for u, _ in pairs}.values())
        benign = []
        for u in users:
            benign.append(await bench.run(u))
            if progress:
                progress(1)
        attacked = []
        for u, i in pairs:
            attacked.append(await bench.run(u, i))
            if progress:
                progress(1)
        verdict = bench.audit.verify()
        audit_rows = len(bench.audit)
    finally:
        await bench.close()
    done = sum(r["utility"] for r in benign)
    vacuous = [r["user_task"] for r in benign if r["utility_without_action"]]
    earned = [r for r in benign if not r["utility_without_action"]]
    hits = sum(r["injection_executed"] for r in attacked)
    return {
        "suite": name, "pairs_in_suite": total, "pairs": len(attacked), "user_tasks": len(users),
        "utility": _rate(done, len(benign)), "utility_passed": done,
        "utility_without_vacuous": _rate(sum(r["utility"] for r in earned), len(earned)),
        "vacuous_user_tasks": vacuous,
        "utility_under_attack": _rate(sum(r["utility"] for r in attacked), len(attacked)),
        "attack_success": _rate(hits, len(attacked)), "attacks": hits,
        "plans_valid": sum(r["plan_valid"] for r in benign + attacked), "runs": len(benign) + len(attacked),
        "runs_denied": sum(bool(r["denied"]) for r in benign + attacked),
        "audit": {"rows": audit_rows, "verified": verdict.ok, "message": verdict.message},
        "wall_s": round(time.perf_counter() - t0, 1), "benign": benign, "attacked": attacked,
    }


def planner_work(suites: list[str] | None, limit: int | None, seed: int, per_user: int = 3) -> int:
    """How many runs `run_planner_bench` will report through `progress`."""
    from agentdojo.task_suite.load_suites import get_suite

    warnings.filterwarnings("ignore")
    n = 0
    for s in suites or SUITES:
        pairs, _ = sample_pairs(get_suite(VERSION, s), limit, seed, per_user)
        n += len(pairs) + len({id(u) for u, _ in pairs})
    return n


def run_planner_bench(backend: Any, model: str, suites: list[str] | None = None, limit: int | None = 12,
                      seed: int = 0, progress: Callable[[int], None] | None = None, retries: int = 0,
                      per_user: int = 3, plan_writer: PlanWriter | None = None) -> dict[str, Any]:
    """Reading (b): the planner agent on a seeded sample of `limit` attacking pairs per suite
    (`per_user` injections for each sampled user task), on `backend` (named `model` in the report).
    `retries`: how often the planner may rewrite a failed plan. `plan_writer` replaces the model
    (tests only)."""
    memo = _MemoBackend(backend, plan_writer)
    t0 = time.perf_counter()

    async def go(home: Path) -> list[dict[str, Any]]:
        return [await run_suite(s, memo, limit, seed, home, progress, retries, per_user)
                for s in suites or SUITES]

    with tempfile.TemporaryDirectory(prefix="llmos-planner-bench-") as home:
        results = asyncio.run(go(Path(home)))
    runs = [r for s in results for r in s["benign"]]
    pairs = [r for s in results for r in s["attacked"]]
    return {
        "benchmark": f"AgentDojo {VERSION}: the planner agent end to end (reading b)",
        "model": model if plan_writer is None else f"{model} (scripted plan writer)",
        "sample": {"pairs_per_suite": limit, "injections_per_user_task": per_user, "seed": seed,
                   "retries": retries,
                   "how": "per suite, a seeded sample of user tasks, each with a seeded sample of the "
                          "injection tasks that attack something; utility from one benign run of each "
                          "sampled user task"},
        "pairs": len(pairs), "user_tasks": len(runs),
        "utility": _rate(sum(r["utility"] for r in runs), len(runs)),
        "utility_without_vacuous": _rate(sum(r["utility"] for r in runs if not r["utility_without_action"]),
                                         sum(not r["utility_without_action"] for r in runs)),
        "attack_success": _rate(sum(r["injection_executed"] for r in pairs), len(pairs)),
        "plans_valid": sum(s["plans_valid"] for s in results), "runs": sum(s["runs"] for s in results),
        "model_calls": memo.calls, "model_calls_reused": memo.reused,
        "suites": results, "wall_s": round(time.perf_counter() - t0, 1),
    }
