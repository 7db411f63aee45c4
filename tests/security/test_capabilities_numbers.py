"""Grants hold under hostile numbers and values: non-finite numbers, huge integers, address lists.

Attacks: `expires: NaN` (never compares, so never expires, and looked narrower than a finite expiry
in attenuation), infinite bounds and quotas, a `10**400` argument that made the monitor raise, and
value allowlists (`*@corp.com`) that accepted `"eve@evil.com, bob@corp.com"` as one string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel.process import Quotas
from llmos.security.audit import AuditLog
from llmos.security.capabilities import Capabilities, PolicyError, load_policy, parse_grant, parse_policy
from llmos.security.monitor import ReferenceMonitor

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("grant, field", [
    ({"tool": "t", "expires": NAN}, "expires"),
    ({"tool": "t", "expires": INF}, "expires"),
    ({"tool": "t", "expires": -INF}, "expires"),
    ({"tool": "t", "expires": 10 ** 400}, "expires"),
    ({"tool": "t", "bounds": {"amount": {"max": NAN}}}, "bounds.amount.max"),
    ({"tool": "t", "bounds": {"amount": {"min": -INF, "max": 5}}}, "bounds.amount.min"),
    ({"tool": "t", "bounds": {"amount": {"max": INF}}}, "bounds.amount.max"),
    ({"tool": "t", "bounds": {"amount": {"max": 10 ** 400}}}, "bounds.amount.max"),
    ({"tool": "t", "quota": INF}, "quota"),
    ({"tool": "t", "quota": NAN}, "quota"),
    ({"tool": "t", "quota": 10 ** 400}, "quota"),
])
def test_non_finite_and_huge_numbers_in_grants_are_refused_naming_the_field(grant, field):
    with pytest.raises(PolicyError, match=rf"^grant\.{field}: "):
        parse_grant(grant)


def test_non_finite_numbers_in_policy_files(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text("grant:\n  - tool: send_money\n    expires: .nan\n")
    with pytest.raises(PolicyError, match=r"grant\[0\]\.expires: .*finite"):
        load_policy(p)
    p = tmp_path / "p.toml"
    p.write_text("[[grant]]\ntool = 'send_money'\nbounds = { amount = { max = inf } }\n")
    with pytest.raises(PolicyError, match=r"grant\[0\]\.bounds\.amount\.max: .*finite"):
        load_policy(p)


def test_a_nan_expiry_can_no_longer_widen_an_attenuated_grant():
    parent = parse_policy({"grant": [{"tool": "send_money", "expires": 2_000_000_000}]})
    with pytest.raises(PolicyError, match="expires"):
        parent.attenuate([{"tool": "send_money", "expires": NAN}])
    with pytest.raises(PermissionError, match="must expire no later"):
        parent.attenuate([{"tool": "send_money", "expires": 2_000_000_001}])
    expired = parse_policy({"grant": [{"tool": "send_money", "expires": 1}]})
    assert "expired" in expired.check("send_money", {}).reason


@pytest.mark.parametrize("quotas", [{"llm_tokens": NAN}, {"tool_calls": INF}, {"wall_time_s": NAN},
                                    {"wall_time_s": INF}, {"llm_tokens": 10 ** 400}, {"tool_calls": "5"}])
def test_non_finite_process_quotas_are_refused(quotas):
    with pytest.raises(ValueError, match="must be a finite number"):
        Quotas(**quotas)


@dataclass
class Proc:
    pid: int
    name: str
    workdir: Path
    capabilities: Any = None


@pytest.mark.parametrize("args, reason", [
    ({"amount": 10 ** 400, "iban": "DE89"}, "argument 'amount' is an integer outside the signed 64-bit"),
    ({"amount": -(10 ** 400), "iban": "DE89"}, "argument 'amount' is an integer outside"),
    ({"amount": 1, "iban": "DE89", "memo": [1, {"x": 10 ** 5000}]}, "argument 'memo[1].x' is an integer"),
    ({"amount": 2 ** 63, "iban": "DE89"}, "outside the signed 64-bit range"),
    ({"amount": NAN, "iban": "DE89"}, "argument 'amount' must be a number (bounded by the grant), got nan"),
    ({"amount": INF, "iban": "DE89"}, "amount=inf is outside the granted bounds [0.0, 100.0]"),
])
def test_hostile_numbers_in_arguments_are_denied_with_a_reason(tmp_path: Path, args, reason):
    mon = ReferenceMonitor(audit=AuditLog(tmp_path / "audit.db"))
    caps = Capabilities.of([{"tool": "send_money", "bounds": {"amount": {"min": 0, "max": 100}}}])
    d = mon.check(Proc(1, "a", tmp_path, caps), "send_money", args)
    assert not d.allowed and reason in d.reason
    assert mon.audit.tail(1)[0]["decision"] == "deny"
    assert mon.audit.verify()[0]


def test_deeply_nested_arguments_are_denied_not_a_recursion_error(tmp_path: Path):
    mon = ReferenceMonitor()
    nested: Any = "x"
    for _ in range(10_000):
        nested = [nested]
    d = mon.check(Proc(1, "a", tmp_path, Capabilities.of([{"tool": "t"}])), "t", {"v": nested})
    assert not d.allowed and "nests deeper than 32 levels" in d.reason
    assert mon.check(Proc(2, "a", tmp_path, Capabilities.of([{"tool": "t"}])), "t", "not a dict").reason == \
        "denied by the monitor: arguments must be a mapping, got str"


CORP = Capabilities.of([{"tool": "send_email", "allow": {"to": ["*@corp.com"]}},
                        {"tool": "send_money", "allow": {"iban": ["DE89*"]}}])


@pytest.mark.parametrize("to, allowed", [
    ("bob@corp.com", True),
    (["bob@corp.com", "ann@corp.com"], True),
    ("bob@corp.com, ann@corp.com", True),  # a list of allowed addresses: each matches
    ("Bob Builder <bob@corp.com>", True),
    ("eve@evil.com, bob@corp.com", False),
    ("bob@corp.com, eve@evil.com", False),
    ("bob@corp.com; eve@evil.com", False),
    ("bob@corp.com\neve@evil.com", False),
    ("bob@corp.com\r\nBcc: eve@evil.com", False),
    ("eve@evil.com <bob@corp.com>", False),  # an address in the display name
    ('"bob@corp.com" <eve@evil.com>', False),
    ("bob@corp.com <eve@evil.com>", False),
    ("eve@evil.com (bob@corp.com)", False),
    (["bob@corp.com", "eve@evil.com,ann@corp.com"], False),
    ("eve@evil.com#@corp.com", False),
    ("", False),
    ("@corp.com", True),  # matches the glob as written ("*" may be empty)
])
def test_address_allowlists_match_each_parsed_address(to, allowed):
    r = CORP.check("send_email", {"to": to}, consume=False)
    assert r.allowed is allowed, r.reason


@pytest.mark.parametrize("iban, allowed", [
    ("DE891234", True), ("DE891,GB12", False), ("DE89 GB12", False), ("DE89;GB12", False),
    ("DE89\nGB12", False), ("DE89|GB12", False), ("DE89\x00GB", False), ("GB12,DE89", False),
])
def test_value_allowlists_refuse_separators_the_glob_does_not_spell(iban, allowed):
    r = CORP.check("send_money", {"iban": iban}, consume=False)
    assert r.allowed is allowed, r.reason


def test_a_glob_that_spells_a_separator_allows_it():
    caps = Capabilities.of([{"tool": "t", "allow": {"name": ["Ann *", "a,b"]}}])
    assert caps.check("t", {"name": "Ann Smith"}).allowed
    assert caps.check("t", {"name": "a,b"}).allowed
    assert not caps.check("t", {"name": "Ann Smith,Eve"}).allowed


@pytest.mark.parametrize("url, allowed", [
    ("https://a.corp.com/x", True), ("a.corp.com", True), ("http://evil.com,x.corp.com", False),
    ("http://evil.com x.corp.com", False), ("https://x.corp.com@evil.com", False),
    ("http://evil.com%2c.x.corp.com", False),
])
def test_host_allowlists_refuse_hosts_with_separators(url, allowed):
    caps = Capabilities.of([{"tool": "fetch", "hosts": {"url": ["*.corp.com"]}}])
    assert caps.check("fetch", {"url": url}, consume=False).allowed is allowed
