"""`llmos bench security`'s table of adversarial classes: every case of the IFC classes holds."""

from __future__ import annotations


def test_adversarial_classes_all_hold():
    from llmos.bench.security import run_adversarial

    escapes = [{"name": "fork_bomb", "contained": True, "detail": "ok"},
               {"name": "symlink_race", "contained": False, "detail": "read /etc/shadow"}]
    ifc = {"container mutation and aliasing", "early-exit implicit flows", "side effects repeated on retry",
           "allocation before limits"}
    rows = {r["class"]: r for r in run_adversarial(escapes, only=ifc)}
    assert set(rows) == ifc | {"sandbox: fork_bomb", "sandbox: symlink_race"}
    for cls in ifc:
        assert rows[cls]["tried"] >= 5 and rows[cls]["held"] == rows[cls]["tried"], rows[cls]["failed"]
    assert rows["sandbox: fork_bomb"] == {"class": "sandbox: fork_bomb", "tried": 1, "held": 1, "failed": []}
    assert rows["sandbox: symlink_race"]["held"] == 0
    assert rows["sandbox: symlink_race"]["failed"] == ["read /etc/shadow"]
