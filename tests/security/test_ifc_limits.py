"""Allocation bounds: sizes a plan asks for are checked before anything is allocated in the kernel."""

from __future__ import annotations

import asyncio
import resource
import time

import pytest

from llmos.bench.security import ALLOCATION_CASES, run_plan_case
from llmos.security import interpreter
from llmos.security.interpreter import LimitExceeded, PlanError, PlanInterpreter, ToolOutcome

NOT_ALLOWED = {"%-format width"}  # refused as outside the subset, not as too large


@pytest.mark.parametrize("name", list(ALLOCATION_CASES))
def test_oversized_requests_are_refused_before_allocating(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, _, error = run_plan_case(ALLOCATION_CASES[name])
    assert time.perf_counter() - t0 < 2
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100  # MB
    if name in NOT_ALLOWED:
        assert type(error) is PlanError and "not allowed" in str(error)
    else:
        assert isinstance(error, LimitExceeded), error
        assert str(error).startswith("line ")


def run(plan: str) -> dict:
    interp = PlanInterpreter(set(), None)
    asyncio.run(interp.run(plan))
    return {k: v.value for k, v in interp.env.items()}


def test_sizes_within_the_bounds_work():
    env = run('a = "ab" * 1000\nb = [0] * 1000\nc = 2 ** 64\nd = f"{7:>5}|{1.25:.3f}"\n'
              'e = "{:>4}{}".format(1, 2)\nf = "-".join(["x"] * 3)\ng = "aXa".replace("X", "yy")\n'
              'h = sum(range(1000))\nk = round(1234, -2)\nm = (10 ** 60) ** 2\n'
              'n = "{who}!".format(who="hi")\n')
    assert len(env["a"]) == 2000 and len(env["b"]) == 1000 and env["c"] == 2 ** 64
    assert env["d"] == "    7|1.250" and env["e"] == "   12" and env["f"] == "x-x-x" and env["g"] == "ayya"
    assert env["h"] == 499500 and env["k"] == 1200 and env["m"] == 10 ** 120
    assert env["n"] == "hi!"


@pytest.mark.parametrize("plan, message", [
    ('x = "{0.__class__}".format(1)', "format fields may only be {}, {N} or {name}"),
    ('x = "{0[0]}".format([1])', "format fields may only be {}, {N} or {name}"),
    ('x = b"a" * 10', "bytes constants are not allowed"),
    ('x = sum([[0] * 1000] * 1000, [])', "TypeError while evaluating"),
    ('x = "{:{}}".format(1, 5)', "nested fields in a format specification are not allowed"),
    ('x = []\nfor i in range(200):\n    x = [x]\ny = str(x)', "values may nest at most 64 containers deep"),
])
def test_format_and_nesting_are_closed(plan, message):
    with pytest.raises(PlanError, match=message):
        run(plan)


def test_deep_keys_are_refused_before_hashing():
    with pytest.raises(LimitExceeded, match="line 5: values may nest at most 64 containers deep"):
        run('t = (1,)\nfor i in range(900):\n    t = (t,)\nd = {}\nd[t] = 1\n')


def test_work_over_the_whole_plan_is_bounded(monkeypatch):
    # each use of a big value is cheap on its own; a loop of them is bounded over the whole plan
    monkeypatch.setattr(interpreter, "MAX_WORK", 200_000)
    plan = 'x = [[0] * 100] * 100\nfor i in range(1000):\n    y = len(str(x))\n'
    with pytest.raises(LimitExceeded, match="line 3: the plan's values are too large to track"):
        run(plan)


def test_running_out_of_a_budget_depends_on_what_was_read(monkeypatch):
    # the failing line builds only trusted values, but when it fails depends on the untrusted page's size
    async def web(name, args, labels):
        return ToolOutcome(True, "x" * 500_000, trusted=False)

    monkeypatch.setattr(interpreter, "MAX_ALLOCATED", 1_000_000)
    interp = PlanInterpreter({"web"}, web)
    with pytest.raises(LimitExceeded) as e:
        asyncio.run(interp.run('page = web()\nkept = []\nfor i in range(1000):\n'
                               '    kept.append("y" * 999)\n'))
    assert str(e.value) == "line 4: the plan built more than 1000000 characters and elements"
    assert e.value.label.untrusted_sources() == ["tool:web"]
