"""Capabilities: what an agent may do, as unforgeable grants checked on every tool syscall.

This is the capability half of llmos' protection (cf. capability systems and
seccomp argument filters). An agent holds a list of grants; each names a tool
(exactly, or by a glob such as `core_memory_*`) and constraints on the call's
arguments: path globs under a root, allowlists of values (recipients, IBANs),
allowlists of hosts for URL arguments, numeric bounds, a call quota and an
expiry time. Guarantees:

- deny by default: a call passes only if one grant for its tool satisfies
  every constraint it carries; otherwise the reason names what failed;
- attenuation only narrows: a child's grant is accepted only if some parent
  grant covers it (same or narrower tool, root and globs, values, hosts,
  bounds, quota, expiry), else `PermissionError`; a child's calls also count
  against the quota of the parent grant it was derived from;
- policy files (TOML or YAML) are validated field by field; a bad field gives
  a `PolicyError` that names it.
"""

from __future__ import annotations

import functools
import math
import posixpath
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

# Memory and messaging syscalls (MemGPT's names) an ordinary agent may always make.
MEMORY_TOOLS = ("send_message", "core_memory_append", "core_memory_replace", "conversation_search",
                "conversation_search_date", "archival_memory_insert", "archival_memory_search")


# The capability to label values finer than the holder's context (the plan interpreter's); never inherited.
DECLASSIFY = "ifc.declassify"

# A grant root of "{workdir}" means the holder's own working directory, whoever holds it.
WORKDIR = "{workdir}"


class PolicyError(ValueError):
    """A policy file or grant is malformed; the message names the bad field."""


# --- globs -----------------------------------------------------------------------------------------------
# Our own glob dialect, so that "is glob A inside glob B" (attenuation) is decidable: `**` matches
# anything, `*` anything but "/" in a path (anything at all in a value), `?` one such character.

_DSTAR, _STAR, _ANY1 = "**", "*", "?"


def _tokens(pattern: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(_DSTAR)
            i += 2
            while pattern.startswith("*", i):
                i += 1
        elif pattern[i] in "*?":
            out.append(pattern[i])
            i += 1
        else:
            out.append("L" + pattern[i])
            i += 1
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _glob_regex(pattern: str, path: bool) -> re.Pattern[str]:
    parts = []
    for t in _tokens(pattern):
        if t == _DSTAR or (t == _STAR and not path):
            parts.append(".*")
        elif t == _STAR:
            parts.append("[^/]*")
        elif t == _ANY1:
            parts.append("[^/]" if path else ".")
        else:
            parts.append(re.escape(t[1]))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, value: str, *, path: bool = False) -> bool:
    """Whether `value` matches `pattern` in llmos' glob dialect (case-sensitive)."""
    return _glob_regex(pattern, path).fullmatch(value) is not None


def glob_covers(parent: str, child: str, *, path: bool = False) -> bool:
    """Whether every string `child` matches is also matched by `parent` (sound, may say no too often)."""
    p, c = _tokens(parent), _tokens(child)
    if not path:  # in values `*` is as strong as `**`
        p = tuple(_DSTAR if t == _STAR else t for t in p)
        c = tuple(_DSTAR if t == _STAR else t for t in c)

    @functools.cache
    def covers(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(c)
        t = p[i]
        if t == _DSTAR:
            return covers(i + 1, j) or (j < len(c) and covers(i, j + 1))
        if t == _STAR:
            return covers(i + 1, j) or (j < len(c) and c[j] not in (_DSTAR, "L/") and covers(i, j + 1))
        if j == len(c):
            return False
        if t == _ANY1:
            return c[j] not in (_DSTAR, _STAR, "L/") and covers(i + 1, j + 1)
        return c[j] == t and covers(i + 1, j + 1)

    return covers(0, 0)


def _finite(v: Any) -> Any:
    """`v` unless it is a number that is not finite (NaN never compares, inf never ends)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 63:
        raise ValueError("must be a number within the signed 64-bit range")
    return v


# Characters that split one string into several values for whatever reads it (lists of addresses,
# shell words, lines); a value glob accepts a value holding one only where the glob spells it out.
_SEPARATORS = frozenset(",;| \t\r\n\x00\x0b\x0c")


def _value_matches(patterns: Iterable[str], value: Any) -> bool:
    """Whether an allowlisted argument value matches one of `patterns`.

    An allowlist of addresses (a pattern with '@') reads the value as an address list: every
    address in it must match, and a display name may not hold an address. Other values must
    match whole, without separators the pattern does not spell out.
    """
    patterns = list(patterns)
    text = str(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text if ch not in "\t"):
        return False
    if any("@" in p for p in patterns):
        found = getaddresses([text])
        return bool(found) and all(addr and "@" not in name and any(glob_match(p, addr) for p in patterns)
                                   for name, addr in found)
    return any(glob_match(p, text) and not (_SEPARATORS & (set(text) - set(p))) for p in patterns)


_HOST = re.compile(r"[a-z0-9._:\-]+")  # a host name or an IP address, nothing else


def _host_of(value: str) -> str:
    """The host a URL (or bare host name) points at, lower-cased."""
    v = value.strip()
    host = urlsplit(v if "//" in v else "//" + v).hostname
    return (host or "").lower()


# --- grants ----------------------------------------------------------------------------------------------


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float | None = None
    max: float | None = None

    @field_validator("min", "max")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        return _finite(v)

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def covers(self, child: Bound) -> bool:
        lo_ok = self.min is None or (child.min is not None and child.min >= self.min)
        hi_ok = self.max is None or (child.max is not None and child.max <= self.max)
        return lo_ok and hi_ok


class Grant(BaseModel):
    """One capability: a tool (name or glob) and constraints on its arguments.

    paths:  argument -> globs its value (a path relative to the agent's workdir, or absolute)
            must match once resolved under `root`;
    allow:  argument -> value globs (every element, for a list argument);
    hosts:  argument -> host globs its URL's host must match;
    bounds: argument -> {min, max};
    quota:  how many calls this grant allows; expires: unix time after which it is void;
    approval: each call waits for a human's approval (kernel/approvals.py).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    tool: str
    root: str | None = None
    paths: dict[str, tuple[str, ...]] = {}
    allow: dict[str, tuple[str, ...]] = {}
    hosts: dict[str, tuple[str, ...]] = {}
    bounds: dict[str, Bound] = {}
    quota: int | None = None
    expires: float | None = None
    approval: bool = False

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a tool (or a glob of tool names)")
        return v

    @field_validator("quota")
    @classmethod
    def _quota(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
        return _finite(v)

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, v: Any) -> Any:
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise ValueError(f"not an ISO 8601 time or unix seconds: {v!r}") from None
        return _finite(v)

    @field_validator("root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(ch in v for ch in "*?") or not (posixpath.isabs(v) or v.split("/")[0] == WORKDIR):
            raise ValueError(f"must be an absolute directory (or {WORKDIR}) without glob characters, "
                             f"got {v!r}")
        return posixpath.normpath(v)

    @model_validator(mode="after")
    def _paths_need_root(self) -> Grant:
        if self.paths and self.root is None:
            raise ValueError("'paths' needs a 'root' directory the globs are relative to")
        for arg, globs in self.paths.items():
            for g in globs:
                if g.startswith("/") or ".." in g.split("/"):
                    raise ValueError(f"paths.{arg}: glob {g!r} must be relative to root, without '..'")
        return self

    # -- matching

    def _abs_globs(self, arg: str, workdir: Path | None = None) -> list[str]:
        root = self.root or "/"
        if workdir is not None and root.split("/")[0] == WORKDIR:
            root = str(Path(workdir).resolve()) + root[len(WORKDIR):]
        return [posixpath.join(root, g) for g in self.paths[arg]]

    def violation(self, tool: str, args: Mapping[str, Any], workdir: Path | None, now: float) -> str | None:
        """Why this grant does not allow the call, or None if it does (quota aside)."""
        if not glob_match(self.tool, tool):
            return f"grant is for {self.tool!r}"
        if self.expires is not None and now >= self.expires:
            return f"grant for {self.tool!r} expired at {datetime.fromtimestamp(self.expires).isoformat()}"
        for arg in self.paths:
            value = args.get(arg, "." if arg == "path" else None)
            if not isinstance(value, str):
                return f"argument {arg!r} must be a path string"
            full = _resolve(value, workdir)
            if full is None:
                return f"argument {arg!r}={value!r} is not a path under a directory"
            if not any(glob_match(g, full, path=True) for g in self._abs_globs(arg, workdir)):
                return (f"path {arg}={value!r} is outside the granted paths {list(self.paths[arg])} "
                        f"under {self.root}")
        for arg, patterns in self.allow.items():
            if arg not in args:
                return f"argument {arg!r} is required by the grant's allowlist"
            values = args[arg] if isinstance(args[arg], list | tuple) else [args[arg]]
            for v in values:
                if not _value_matches(patterns, v):
                    return f"{arg}={v!r} is not in the allowlist {list(patterns)}"
        for arg, patterns in self.hosts.items():
            if arg not in args:
                return f"argument {arg!r} is required by the grant's host allowlist"
            values = args[arg] if isinstance(args[arg], list | tuple) else [args[arg]]
            for v in values:
                host = _host_of(str(v))
                if not _HOST.fullmatch(host) or not any(glob_match(p.lower(), host) for p in patterns):
                    return f"host {host or v!r} of {arg} is not in the allowlist {list(patterns)}"
        for arg, bound in self.bounds.items():
            v = args.get(arg)
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:  # NaN != NaN
                return f"argument {arg!r} must be a number (bounded by the grant), got {_short(v)}"
            if (bound.min is not None and v < bound.min) or (bound.max is not None and v > bound.max):
                return f"{arg}={_short(v)} is outside the granted bounds [{bound.min}, {bound.max}]"
        return None

    def covers(self, child: Grant) -> str | None:
        """Why `child` is not a narrowing of this grant, or None if it is."""
        if not glob_covers(self.tool, child.tool):
            return f"tool {child.tool!r} is not within {self.tool!r}"
        for arg in self.paths:
            if arg not in child.paths:
                return f"{child.tool}: paths.{arg} must be constrained (parent: {list(self.paths[arg])})"
            for cg in child._abs_globs(arg):
                if not any(glob_covers(pg, cg, path=True) for pg in self._abs_globs(arg)):
                    return f"{child.tool}: path glob {cg!r} is not within the parent's {self._abs_globs(arg)}"
        for kind in ("allow", "hosts"):
            mine, theirs = getattr(self, kind), getattr(child, kind)
            for arg, patterns in mine.items():
                if arg not in theirs:
                    return f"{child.tool}: {kind}.{arg} must be constrained (parent: {list(patterns)})"
                for cp in theirs[arg]:
                    if not any(glob_covers(pp.lower() if kind == "hosts" else pp,
                                           cp.lower() if kind == "hosts" else cp) for pp in patterns):
                        return f"{child.tool}: {kind}.{arg} value {cp!r} is not within {list(patterns)}"
        for arg, bound in self.bounds.items():
            if arg not in child.bounds or not bound.covers(child.bounds[arg]):
                return f"{child.tool}: bounds.{arg} must lie within [{bound.min}, {bound.max}]"
        if self.quota is not None and (child.quota is None or child.quota > self.quota):
            return f"{child.tool}: quota must be at most {self.quota}"
        if self.expires is not None and (child.expires is None or child.expires > self.expires):
            return f"{child.tool}: must expire no later than the parent's grant"
        if self.approval and not child.approval:
            return f"{child.tool}: must require approval (the parent's grant does)"
        return None


def _short(v: Any) -> str:
    """A value for a reason text: a huge integer by its size, never its (slow, limited) decimal form."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<an integer of {v.bit_length()} bits>"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(value: str, workdir: Path | None) -> str | None:
    """The absolute, normalized path a path argument names (relative ones are under `workdir`)."""
    if value.startswith("/"):
        full = value
    elif workdir is not None:
        full = posixpath.join(str(Path(workdir).resolve()), value)
    else:
        return None
    return posixpath.normpath(full)


# --- what an agent holds --------------------------------------------------------------------------------


@dataclass
class _Held:
    """A grant as held by one agent: its own use count, linked to the grant it was derived from."""

    grant: Grant
    parent: _Held | None = None
    used: int = 0

    def remaining(self) -> int | None:
        own = None if self.grant.quota is None else self.grant.quota - self.used
        up = self.parent.remaining() if self.parent is not None else None
        if own is None:
            return up
        return own if up is None else min(own, up)

    def consume(self) -> None:
        held: _Held | None = self
        while held is not None:
            held.used += 1
            held = held.parent


@dataclass
class CapabilityCheck:
    allowed: bool
    reason: str
    grant: Grant | None = None


@dataclass
class Capabilities:
    """The grants one agent holds; deny by default."""

    held: list[_Held] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def of(cls, grants: Iterable[Grant | Mapping[str, Any]]) -> Capabilities:
        return cls([_Held(g if isinstance(g, Grant) else parse_grant(g)) for g in grants])

    @property
    def grants(self) -> list[Grant]:
        return [h.grant for h in self.held]

    def tools(self) -> list[str]:
        """The tool names (or globs) this agent holds grants for."""
        return sorted({h.grant.tool for h in self.held})

    def check(self, tool: str, args: Mapping[str, Any], workdir: Path | None = None,
              now: float | None = None, consume: bool = True) -> CapabilityCheck:
        """Whether a grant allows the call; an allowed call uses one unit of that grant's quota."""
        now = time.time() if now is None else now
        reasons = []
        with self._lock:
            for held in self.held:
                if not glob_match(held.grant.tool, tool):
                    continue
                why = held.grant.violation(tool, args, workdir, now)
                if why is None and (left := held.remaining()) is not None and left <= 0:
                    why = f"quota of {held.grant.quota} calls to {held.grant.tool!r} is used up"
                if why is None:
                    if consume:
                        held.consume()
                    return CapabilityCheck(True, f"granted by {held.grant.tool!r}", held.grant)
                reasons.append(why)
        if not reasons:
            return CapabilityCheck(False, f"no capability for tool {tool!r}")
        return CapabilityCheck(False, "; ".join(dict.fromkeys(reasons)))

    def attenuate(self, requested: Capabilities | Iterable[Grant | Mapping[str, Any] | str] | None
                  ) -> Capabilities:
        """A child's capabilities: each requested grant must be covered by one of ours.

        A tool name (str) asks for our own grants for that tool unchanged; None asks for all of ours but
        DECLASSIFY, which a child gets only by naming it.
        Quotas stay linked: a child's calls count against the grant it came from.
        """
        if requested is None:  # everything but the right to declassify, which is only ever given by name
            return Capabilities([_Held(h.grant, h) for h in self.held if h.grant.tool != DECLASSIFY])
        items = requested.grants if isinstance(requested, Capabilities) else list(requested)
        out: list[_Held] = []
        for item in items:
            if isinstance(item, str):
                mine = [h for h in self.held if glob_covers(h.grant.tool, item)]
                if not mine:
                    raise PermissionError(f"cannot grant {item!r}: the parent holds no capability for it")
                out.extend(_Held(h.grant.model_copy(update={"tool": item}), h) for h in mine)
                continue
            child = item if isinstance(item, Grant) else parse_grant(item)
            reasons = []
            for h in self.held:
                if not glob_covers(h.grant.tool, child.tool):
                    continue
                why = h.grant.covers(child)
                if why is None:
                    out.append(_Held(child, h))
                    break
                reasons.append(why)
            else:
                detail = "; ".join(reasons) if reasons else "the parent holds no capability for it"
                raise PermissionError(f"cannot grant {child.tool!r}: {detail}")
        return Capabilities(out)


# --- policy files ----------------------------------------------------------------------------------------


def _loc(err: dict[str, Any]) -> str:
    parts = []
    for p in err["loc"]:
        parts.append(f"[{p}]" if isinstance(p, int) else ("." if parts else "") + str(p))
    return "".join(parts)


def parse_grant(data: Mapping[str, Any], where: str = "grant") -> Grant:
    """A Grant from a mapping (as in a policy file); PolicyError names the bad field."""
    try:
        return Grant.model_validate(dict(data))
    except ValidationError as e:
        first = e.errors()[0]
        loc = _loc(first)
        raise PolicyError(f"{where}{'.' + loc if loc else ''}: {first['msg']}") from None


def parse_policy(data: Any, source: str = "policy", substitutions: Mapping[str, str] | None = None
                 ) -> Capabilities:
    """Capabilities from a policy document: `{"grant": [ {tool: ..., ...}, ... ]}`.

    String values may use `{workdir}` and `{home}` (given in `substitutions`).
    """
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: the top level must be a table with a 'grant' list")
    unknown = set(data) - {"grant"}
    if unknown:
        raise PolicyError(f"{source}: unknown top-level field(s) {sorted(unknown)} (expected 'grant')")
    grants = data.get("grant", [])
    if not isinstance(grants, list):
        raise PolicyError(f"{source}: 'grant' must be a list of tables")
    subs = dict(substitutions or {})

    subs.setdefault("workdir", WORKDIR)

    def fill(v: Any, where: str) -> Any:
        if isinstance(v, str):
            try:
                return v.format(**subs) if "{" in v else v
            except KeyError as e:
                raise PolicyError(f"{where}: unknown placeholder {{{e.args[0]}}}") from None
        if isinstance(v, list):
            return [fill(x, where) for x in v]
        if isinstance(v, dict):
            return {k: fill(x, f"{where}.{k}") for k, x in v.items()}
        return v

    out = []
    for i, g in enumerate(grants):
        where = f"{source}: grant[{i}]"
        if not isinstance(g, Mapping):
            raise PolicyError(f"{where}: must be a table, got {type(g).__name__}")
        out.append(parse_grant(fill(dict(g), where), where))
    return Capabilities.of(out)


def load_policy(path: str | Path, workdir: Path | None = None, home: Path | None = None) -> Capabilities:
    """Capabilities from a TOML (.toml) or YAML (.yaml/.yml) policy file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file: {e.strerror}") from None
    import tomllib  # Python >= 3.11

    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise PolicyError(f"{path}: policy files must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise PolicyError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
    subs = {}
    if workdir is not None:
        subs["workdir"] = str(Path(workdir).resolve())
    if home is not None:
        subs["home"] = str(Path(home).resolve())
    return parse_policy(data, str(path), subs)


def default_capabilities(workdir: Path | None = None) -> Capabilities:
    """What an ordinary agent gets: its own files, the sandboxed shell and Python, calculator, memory.

    The file grants are rooted at `{workdir}`, the holder's own working directory, so a child that
    inherits them reaches its own directory, not its parent's. `workdir` (the kernel's hook passes
    the new agent's) only has to exist.
    """
    if workdir is not None and not Path(workdir).is_dir():
        raise ValueError(f"working directory {workdir} does not exist")
    anywhere = {"path": ("**",)}
    grants = [Grant(tool=t, root=WORKDIR, paths=anywhere) for t in ("read_file", "write_file", "list_files")]
    grants += [Grant(tool=t) for t in ("run_shell", "run_python", "calculator", *MEMORY_TOOLS)]
    return Capabilities.of(grants)
