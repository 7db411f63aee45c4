"""Labels through containers: mutation through any alias raises what a tool argument's label reaches."""

from __future__ import annotations

import asyncio

import pytest

from llmos.bench.security import ATTACKER, CONTAINER_CASES, run_plan_case
from llmos.security.ifc import PLAN_SOURCE, Label, Source
from llmos.security.interpreter import Labeled, PlanInterpreter, PolicyDenied, ToolOutcome

UNTRUSTED_TO = "argument 'to' depends on untrusted data from tool:read_inbox"
TRUSTED_ADDR = 'addr = "carol@corp.org"\n'


@pytest.mark.parametrize("name", list(CONTAINER_CASES))
def test_attacker_address_through_a_container_is_denied(name):
    sent, _, error = run_plan_case(CONTAINER_CASES[name])
    assert sent == []
    assert isinstance(error, PolicyDenied) and error.tool == "send_email" and UNTRUSTED_TO in error.reason


@pytest.mark.parametrize("name", list(CONTAINER_CASES))
def test_the_same_plan_with_a_trusted_address_sends(name):
    # the denial above is about where the address came from, not about the shape of the plan
    plan = CONTAINER_CASES[name].replace('addr = mail[1]["from"]\n', TRUSTED_ADDR)
    sent, _, error = run_plan_case(plan)
    assert error is None and len(sent) == 1
    assert "carol@corp.org" in str(sent[0]["to"]) and ATTACKER not in str(sent[0]["to"])


def run(plan: str) -> PlanInterpreter:
    async def call(name, args, labels):
        return ToolOutcome(True, {"read_inbox": [{"from": ATTACKER}]}[name], trusted=False)

    interp = PlanInterpreter({"read_inbox"}, call)
    asyncio.run(interp.run(plan))
    return interp


def untrusted(interp: PlanInterpreter, name: str) -> bool:
    return not interp.deep_label(interp.env[name]).trusted


def test_python_aliasing_is_kept():
    i = run('lst = []\nd = {"k": lst}\nlst.append(1)\nalias = lst\nalias += [2]\nd["k"].insert(0, 0)\n'
            'n = len(d["k"])\nt = d.setdefault("t", [])\nt.append(5)\ne = {"x": 1}\ne.update({"y": 2})\n'
            'p = e.pop("x")\nq = lst.pop(0)\nlst.remove(2)\nrows = [[1]]\nrows[0][0] = 7\n')
    plain = {k: v.value for k, v in i.env.items()}
    assert plain["n"] == 3 and plain["p"] == 1 and plain["q"] == 0
    assert [x.value for x in plain["lst"]] == [1] and plain["alias"] is plain["lst"]
    assert [x.value for x in plain["d"]["k"].value] == [1] and [x.value for x in plain["d"]["t"].value] == [5]
    assert set(plain["e"]) == {"y"} and plain["rows"][0].value[0].value == 7
    assert not any(untrusted(i, name) for name in i.env)  # nothing untrusted was ever read


def test_labels_stay_per_element():
    # a trusted element stays trusted beside an untrusted one; the whole container is untrusted
    i = run('mail = read_inbox()\nd = {"to": "bob@corp.org"}\nd["from"] = mail[0]["from"]\nto = d["to"]\n'
            'who = d["from"]\nlst = ["bob@corp.org"]\nlst.append(who)\nfirst = lst[0]\nlast = lst[-1]\n')
    assert not untrusted(i, "to") and not untrusted(i, "first")
    assert untrusted(i, "who") and untrusted(i, "last") and untrusted(i, "d") and untrusted(i, "lst")


def test_structure_changed_under_untrusted_control_taints_positions():
    # which element sits at lst[1] depends on whether the untrusted branch inserted one
    i = run('mail = read_inbox()\nlst = ["a", "b"]\nif "eve" in mail[0]["from"]:\n    lst.insert(0, "z")\n'
            'second = lst[1]\nn = len(lst)\n')
    assert i.env["second"].value == "a" and untrusted(i, "second") and untrusted(i, "n")


def test_mutation_through_an_untrusted_index_taints_the_container():
    i = run('mail = read_inbox()\nk = 0 if "eve" in mail[0]["from"] else 1\ngroups = [[], []]\n'
            'groups[k].append("x")\nfirst = groups[0]\nsize = len(first)\n')
    assert untrusted(i, "size") and untrusted(i, "first")


def test_a_cycle_is_labelled_without_looping():
    i = run('mail = read_inbox()\na = []\na.append(a)\na[0].append(mail[0]["from"])\nb = a[0][0][0]\n')
    assert untrusted(i, "a") and untrusted(i, "b")


def test_tool_output_is_a_copy():
    inbox = [{"from": ATTACKER}]

    async def call(name, args, labels):
        return ToolOutcome(True, inbox, trusted=False)

    asyncio.run(PlanInterpreter({"read_inbox"}, call).run('m = read_inbox()\nm.append(1)\nm[0]["x"] = 2\n'))
    assert inbox == [{"from": ATTACKER}]


def test_deep_label_joins_every_reachable_label():
    untrusted_source = Source("tool:web", False)
    interp = PlanInterpreter(set(), None)
    inner = [Labeled("x", Label.of(untrusted_source))]
    outer = Labeled({"a": Labeled((1, Labeled(inner, Label.of(PLAN_SOURCE))))}, Label.of(PLAN_SOURCE))
    assert interp.deep_label(outer).untrusted_sources() == ["tool:web"]
