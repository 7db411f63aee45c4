"""Every attack of `llmos bench security`'s monitor classes holds (llmos.security.monitor_attacks)."""

from __future__ import annotations

import pytest

from llmos.security.monitor_attacks import monitor_attack_cases

CASES = [(cls, name, check) for cls, cases in monitor_attack_cases().items() for name, check in cases.items()]


@pytest.mark.parametrize("cls, name, check", CASES, ids=[f"{c}: {n}" for c, n, _ in CASES])
def test_attack_holds(cls, name, check):
    held, detail = check()
    assert held, f"{cls}: {name}: {detail}"


def test_the_classes_and_their_sizes():
    sizes = {cls: len(cases) for cls, cases in monitor_attack_cases().items()}
    assert sizes == {"label laundering": 10, "the hidden kernel handle": 16, "quota inheritance": 4,
                     "non-finite and huge numbers": 13, "address-list globs": 12, "stuck tools": 1}
