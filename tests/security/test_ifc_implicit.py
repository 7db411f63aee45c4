"""Implicit flows: once a plan branches or loops on untrusted data, what follows depends on it."""

from __future__ import annotations

import asyncio

import pytest

from llmos.bench.security import IMPLICIT_CASES, PAYEE, run_plan_case
from llmos.security.ifc import Label, Source
from llmos.security.interpreter import PlanError, PlanInterpreter, PolicyDenied, ToolOutcome

DECIDED = "calling send_money was decided by untrusted data from tool:read_inbox"


@pytest.mark.parametrize("name", list(IMPLICIT_CASES))
def test_payment_decided_by_an_early_exit_on_untrusted_data_is_denied(name):
    _, paid, error = run_plan_case(IMPLICIT_CASES[name])
    assert paid == []
    assert isinstance(error, PolicyDenied) and error.tool == "send_money" and DECIDED in error.reason


@pytest.mark.parametrize("name", list(IMPLICIT_CASES))
def test_the_same_plan_on_trusted_data_pays(name):
    plan = IMPLICIT_CASES[name].replace('body = mail[1]["body"]\n', 'body = "pay the rent"\n')
    _, paid, error = run_plan_case(plan)
    assert error is None and paid == [{"iban": PAYEE, "amount": 10}]


@pytest.mark.parametrize("plan", [
    'x = 1 if "pay" in body else 2\n',  # a pure conditional expression only labels its value
    'y = "pay" in body and "now"\n',
    'if True:\n    pass\n',
    'for i in range(2):\n    if i == 1:\n        break\n',
])
def test_what_does_not_branch_on_untrusted_data_leaves_control_trusted(plan):
    _, paid, error = run_plan_case('mail = read_inbox()\nbody = mail[1]["body"]\n' + plan +
                                   f'send_money(iban="{PAYEE}", amount=10)')
    assert error is None and len(paid) == 1


def interp_over(content) -> PlanInterpreter:
    async def call(name, args, labels):
        return ToolOutcome(True, content, trusted=False)

    return PlanInterpreter({"web"}, call)


def test_control_label_never_drops_after_a_branch():
    i = interp_over("yes")
    asyncio.run(i.run('page = web()\nif page == "no":\n    x = 1\ny = 2\n'))
    assert not i.env["y"].label.trusted and i.pc.untrusted_sources() == ["tool:web"]


def test_a_failure_carries_what_it_depended_on():
    i = interp_over("not a number")
    with pytest.raises(PlanError) as e:
        asyncio.run(i.run('page = web()\nx = int(page)\n'))
    assert e.value.label.untrusted_sources() == ["tool:web"]
    with pytest.raises(PlanError) as e:
        asyncio.run(interp_over("x").run('x = int("not a number")\n'))
    assert e.value.label.trusted
    with pytest.raises(PlanError) as e:  # a trusted operation reached only because of untrusted data
        asyncio.run(interp_over("yes").run('page = web()\nif page == "yes":\n    x = int("a")\n'))
    assert e.value.label.untrusted_sources() == ["tool:web"]
    with pytest.raises(PlanError) as e:  # a branch of a pure conditional expression
        asyncio.run(interp_over("yes").run('page = web()\nx = [][1] if page == "yes" else 0\n'))
    assert e.value.label.untrusted_sources() == ["tool:web"]
    with pytest.raises(PlanError) as e:  # an operand of `and` evaluated only because of the first
        asyncio.run(interp_over("yes").run('page = web()\nx = page == "yes" and int("a")\n'))
    assert e.value.label.untrusted_sources() == ["tool:web"]


def test_a_plan_may_start_under_a_control_label():
    seen = []

    async def call(name, args, labels):
        seen.append(labels["$control"])
        return ToolOutcome(True, "ok")

    start = Label.of(Source("tool:web", False))
    asyncio.run(PlanInterpreter({"send"}, call, control=start).run('send(to="bob")\n'))
    assert seen == [start]
