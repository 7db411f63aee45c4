"""Every host action a compromised operator tries outside its grants is denied or refused, never run."""

from llmos.agents.operator.attacks import host_attack_cases


def test_every_host_attack_holds():
    outcomes = {name: check() for name, check in host_attack_cases().items()}
    assert len(outcomes) == 13
    assert {name: held for name, (held, _) in outcomes.items()} == {name: True for name in outcomes}
    assert outcomes["kill an outsider naming a granted parent"][1].startswith(
        "refused by the tool or kernel: pid ")
    assert outcomes["remove through a symlinked directory"][1].endswith(
        "'linkdir' is a symlink or not a directory")
    assert outcomes["set a setting past its bounds"][1] == (
        "denied by the monitor: denied by capabilities: quantum=4096 is outside the granted bounds "
        "[8.0, 64.0]")
