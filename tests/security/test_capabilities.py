"""Capabilities: deny by default, argument constraints, quotas, expiry, attenuation, policy files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.security.capabilities import (
    Capabilities,
    Grant,
    PolicyError,
    default_capabilities,
    glob_covers,
    glob_match,
    load_policy,
    parse_policy,
)


def test_glob_dialect():
    assert glob_match("/w/*.txt", "/w/a.txt", path=True)
    assert not glob_match("/w/*.txt", "/w/d/a.txt", path=True)
    assert glob_match("/w/**", "/w/d/e/a.txt", path=True)
    assert glob_match("*@example.com", "a.b/c@example.com")  # values: * spans everything
    assert not glob_match("*@example.com", "a@example.com.evil.org")
    assert glob_match("core_memory_*", "core_memory_append")


@pytest.mark.parametrize("parent, child, path, expected", [
    ("/w/**", "/w/docs/*.txt", True, True),
    ("/w/*", "/w/**", True, False),
    ("/w/*.txt", "/w/*", True, False),
    ("/w/*", "/w/?", True, True),
    ("/w/?", "/w/*", True, False),
    ("/w/a*", "/w/*a", True, False),
    ("/w/**", "/other/x", True, False),
    ("*@example.com", "bob@example.com", False, True),
    ("*@example.com", "*", False, False),
    ("*", "anything*", False, True),
])
def test_glob_covers(parent, child, path, expected):
    assert glob_covers(parent, child, path=path) is expected


def test_deny_by_default_and_reasons(tmp_path: Path):
    caps = Capabilities.of([{"tool": "read_file", "root": str(tmp_path), "paths": {"path": ["docs/**"]}}])
    r = caps.check("write_file", {"path": "docs/a"}, tmp_path)
    assert not r.allowed and r.reason == "no capability for tool 'write_file'"
    assert caps.check("read_file", {"path": "docs/a/b.txt"}, tmp_path).allowed
    assert caps.check("read_file", {"path": str(tmp_path / "docs/x")}, tmp_path).allowed
    r = caps.check("read_file", {"path": "secret.txt"}, tmp_path)
    assert not r.allowed and "outside the granted paths" in r.reason and "secret.txt" in r.reason
    assert not caps.check("read_file", {"path": "docs/../secret.txt"}, tmp_path).allowed
    assert not caps.check("read_file", {"path": "/etc/passwd"}, tmp_path).allowed
    assert not caps.check("read_file", {"path": 3}, tmp_path).allowed
    assert not Capabilities().check("read_file", {"path": "x"}, tmp_path).allowed


def test_allowlists_hosts_bounds():
    caps = Capabilities.of([
        {"tool": "send_email", "allow": {"recipients": ["*@example.com", "boss@corp.org"]}},
        {"tool": "fetch", "hosts": {"url": ["*.wikipedia.org", "example.com"]}},
        {"tool": "send_money", "bounds": {"amount": {"min": 0, "max": 100}},
         "allow": {"recipient": ["DE89*"]}},
    ])
    assert caps.check("send_email", {"recipients": ["a@example.com", "boss@corp.org"]}).allowed
    r = caps.check("send_email", {"recipients": ["a@example.com", "eve@evil.com"]})
    assert not r.allowed and "'eve@evil.com' is not in the allowlist" in r.reason
    assert not caps.check("send_email", {}).allowed
    assert caps.check("fetch", {"url": "https://en.wikipedia.org/wiki/OS"}).allowed
    assert caps.check("fetch", {"url": "http://EXAMPLE.com:8080/x"}).allowed
    r = caps.check("fetch", {"url": "https://wikipedia.org.evil.com/"})
    assert not r.allowed and "host 'wikipedia.org.evil.com' of url" in r.reason
    assert caps.check("send_money", {"recipient": "DE8912", "amount": 100}).allowed
    r = caps.check("send_money", {"recipient": "DE8912", "amount": 100.5})
    assert not r.allowed and "outside the granted bounds [0.0, 100.0]" in r.reason
    assert not caps.check("send_money", {"recipient": "DE8912", "amount": "5"}).allowed
    assert not caps.check("send_money", {"recipient": "GB11", "amount": 5}).allowed


def test_quota_and_expiry():
    caps = Capabilities.of([{"tool": "calculator", "quota": 2}, {"tool": "clock", "expires": 1000.0}])
    assert caps.check("calculator", {}).allowed
    assert caps.check("calculator", {}, consume=False).allowed
    assert caps.check("calculator", {}).allowed
    r = caps.check("calculator", {})
    assert not r.allowed and r.reason == "quota of 2 calls to 'calculator' is used up"
    assert caps.check("clock", {}, now=999.0).allowed
    r = caps.check("clock", {}, now=1000.0)
    assert not r.allowed and "expired" in r.reason


def test_attenuation(tmp_path: Path):
    parent = Capabilities.of([
        Grant(tool="read_file", root=str(tmp_path), paths={"path": ("docs/**",)}),
        Grant(tool="send_email", allow={"to": ("*@example.com",)}, quota=3),
        Grant(tool="send_money", bounds={"amount": {"min": 0, "max": 50}}),
        Grant(tool="core_memory_*"),
    ])
    child = parent.attenuate([
        {"tool": "read_file", "root": str(tmp_path / "docs"), "paths": {"path": ["*.md"]}},
        {"tool": "send_email", "allow": {"to": ["bob@example.com"]}, "quota": 2},
        "core_memory_append",
    ])
    assert child.tools() == ["core_memory_append", "read_file", "send_email"]
    assert child.check("read_file", {"path": "docs/a.md"}, tmp_path).allowed
    assert not child.check("read_file", {"path": "docs/sub/a.md"}, tmp_path).allowed
    assert not child.check("send_email", {"to": "alice@example.com"}).allowed
    # a child's calls use up the parent grant's quota too
    assert child.check("send_email", {"to": "bob@example.com"}).allowed
    assert child.check("send_email", {"to": "bob@example.com"}).allowed
    assert not child.check("send_email", {"to": "bob@example.com"}).allowed
    assert parent.check("send_email", {"to": "x@example.com"}).allowed
    assert not parent.check("send_email", {"to": "x@example.com"}).allowed
    bad = [
        ({"tool": "write_file"}, "parent holds no capability"),
        ({"tool": "read_file", "root": str(tmp_path), "paths": {"path": ["**"]}}, "is not within"),
        ({"tool": "read_file"}, "paths.path must be constrained"),
        ({"tool": "send_email", "allow": {"to": ["*"]}, "quota": 1}, "is not within"),
        ({"tool": "send_email", "allow": {"to": ["a@example.com"]}}, "quota must be at most 3"),
        ({"tool": "send_money", "bounds": {"amount": {"min": 0, "max": 51}}}, r"within \[0.0, 50.0\]"),
        ({"tool": "core_memory_*", "quota": 1}, None),
        ({"tool": "core_*"}, "parent holds no capability"),
        ("run_shell", "parent holds no capability"),
    ]
    for req, message in bad:
        if message is None:
            parent.attenuate([req])
            continue
        with pytest.raises(PermissionError, match=message):
            parent.attenuate([req])
    assert parent.attenuate(None).tools() == parent.tools()


def test_workdir_root_is_the_holders_own(tmp_path: Path):
    caps = parse_policy({"grant": [{"tool": "read_file", "root": "{workdir}", "paths": {"path": ["**"]}}]})
    a, b = tmp_path / "a", tmp_path / "b"
    assert caps.check("read_file", {"path": "x.txt"}, a).allowed
    assert not caps.check("read_file", {"path": str(b / "x.txt")}, a).allowed
    assert caps.check("read_file", {"path": str(b / "x.txt")}, b).allowed


def test_default_capabilities(tmp_path: Path):
    caps = default_capabilities(tmp_path)
    assert caps.check("write_file", {"path": "out/x.txt"}, tmp_path).allowed
    assert not caps.check("write_file", {"path": "/etc/x"}, tmp_path).allowed
    for tool in ("run_shell", "run_python", "calculator", "archival_memory_search", "send_message"):
        assert caps.check(tool, {}, tmp_path).allowed, tool
    assert not caps.check("send_email", {}, tmp_path).allowed


def test_policy_files(tmp_path: Path):
    toml = tmp_path / "p.toml"
    toml.write_text('''
[[grant]]
tool = "read_file"
root = "{workdir}"
paths = { path = ["docs/**"] }
quota = 5
expires = "2999-01-01T00:00:00Z"

[[grant]]
tool = "send_money"
allow = { recipient = ["DE89*"] }
bounds = { amount = { min = 0, max = 10 } }
''')
    caps = load_policy(toml, workdir=tmp_path)
    assert caps.check("read_file", {"path": "docs/a"}, tmp_path).allowed
    assert caps.check("send_money", {"recipient": "DE891", "amount": 3}).allowed
    yml = tmp_path / "p.yaml"
    yml.write_text("grant:\n  - tool: calculator\n    quota: 1\n")
    assert load_policy(yml).tools() == ["calculator"]


@pytest.mark.parametrize("text, message", [
    ("[[grant]]\ntool = 'x'\nquota = -1\n", r"grant\[0\]\.quota: Value error, must be >= 0"),
    ("[[grant]]\ntool = 'x'\nbounds = { n = { min = 5, max = 1 } }\n",
     r"grant\[0\]\.bounds\.n: .*greater than max"),
    ("[[grant]]\ntool = 'x'\ncolour = 'red'\n", r"grant\[0\]\.colour: Extra inputs are not permitted"),
    ("[[grant]]\ntool = 'x'\npaths = { path = ['a'] }\n", r"grant\[0\]: .*needs a 'root'"),
    ("[[grant]]\ntool = 'x'\nexpires = 'soon'\n", r"grant\[0\]\.expires: .*not an ISO 8601 time"),
    ("[[grant]]\nquota = 1\n", r"grant\[0\]\.tool: Field required"),
    ("[[grants]]\ntool = 'x'\n", r"unknown top-level field\(s\) \['grants'\]"),
    ("[[grant]]\ntool = 'x'\nroot = 'rel/dir'\n", r"grant\[0\]\.root: .*must be an absolute directory"),
    ("grant = [", r"not valid TOML"),
])
def test_policy_errors_name_the_field(tmp_path: Path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(p)
