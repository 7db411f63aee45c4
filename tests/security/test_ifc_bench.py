"""`llmos bench security`'s table of adversarial classes: every case of every class holds."""

from __future__ import annotations


def test_adversarial_classes_all_hold():
    from llmos.bench.security import run_adversarial

    escapes = [{"name": "fork_bomb", "contained": True, "detail": "ok"},
               {"name": "symlink_race", "contained": False, "detail": "read /etc/shadow"}]
    rows = {r["class"]: r for r in run_adversarial(escapes)}
    for cls in ("container mutation and aliasing", "early-exit implicit flows",
                "side effects repeated on retry", "allocation before limits"):
        assert rows[cls]["tried"] >= 5 and rows[cls]["held"] == rows[cls]["tried"], rows[cls]["failed"]
    assert rows["sandbox: fork_bomb"] == {"class": "sandbox: fork_bomb", "tried": 1, "held": 1, "failed": []}
    assert rows["sandbox: symlink_race"]["held"] == 0
    assert rows["sandbox: symlink_race"]["failed"] == ["read /etc/shadow"]
