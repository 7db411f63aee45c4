"""The plan interpreter: a small Python subset, run by our own AST walker, that carries labels.

This is the data-flow half of CaMeL. The privileged LLM (which never sees
untrusted data) writes a plan; this interpreter runs it one node at a time,
never with `exec` or `eval`. Every value is a `Labeled` pair of a Python value
and its `Label`; every operation joins its operands' labels.

What it guarantees, and how:

- Containers. A list or dict holds `Labeled` elements, and the interpreter
  keeps a label per container object (by identity) that rises whenever the
  container is changed (`append`, `extend`, `insert`, `pop`, `remove`,
  `setdefault`, `update`, item assignment, `+=`), through whatever alias the
  change was made. The label of a value consumed whole (a tool argument, a
  condition, `len`, `str`, a comparison) is the join of every label reachable
  from it: the walk follows every element, is cycle-safe and bounded.
- Implicit flows (CaMeL's strict mode). The control label `pc` only rises:
  once a plan branches or loops on data, every later statement, call and
  assignment depends on that data, so a data-dependent `break`, `continue`,
  loop `else`, or a skipped assignment cannot make later code look trusted.
  A failure carries the label of what it depended on (`PlanError.label`), so
  a planner that retries after it can start the next plan under that label.
- Bounds before allocation. Sizes a plan asks for (`range`, `*` on strings and
  lists, `**`, format widths, `join`, `replace`, `split`, `round`, the syntax
  tree's depth) are checked before anything is built; a value is measured
  (with aliasing expanded, so a cycle or a list shared a million times is
  refused) before it is copied, printed or passed to a tool; what a whole plan
  builds and visits is charged to two budgets. Breaking a bound raises
  `LimitExceeded`, a `PlanError`.

The subset: assignments (names, tuple unpacking, items, `+=`), `if`/`elif`/
`else`, `for` over a finite sequence, `break`/`continue`, expressions
(literals, lists, tuples, dicts, f-strings, arithmetic, comparisons, `and`/
`or`/`not`, `x if c else y`, subscripts, slices), calls of tools, of a fixed
set of builtins and of a fixed set of str/list/dict methods, and `print`. No
imports, functions, classes, attributes other than those methods, `while`,
`lambda`, comprehensions or `with`: what a plan can do is what its tools can
do. Errors never quote a value, so untrusted text cannot reach the planner
through an error message.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import re
import string
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llmos.security.ifc import CONTROL, PLAN_SOURCE, Label, Source, tool_source

MAX_STEPS = 20_000
MAX_LOOP = 1_000
MAX_VALUE_CHARS = 1_000_000  # the longest string a plan may build
MAX_ITEMS = 100_000  # the longest list, dict or range a plan may build
MAX_INT_BITS = 8_192  # the largest integer a plan may compute (about 2,466 digits)
MAX_FORMAT_WIDTH = 10_000  # the widest width or precision in a format specification
MAX_ROUND_DIGITS = 1_000
MAX_DEPTH = 64  # the deepest nesting of containers a plan may copy or pass on
MAX_AST_DEPTH = 200  # the deepest nesting of a plan's syntax tree
MAX_MEASURE = 4_000_000  # the most a value may weigh (characters + elements) once aliasing is expanded
MAX_WORK = 5_000_000  # values visited, over the whole plan, to label, measure and copy values
MAX_ALLOCATED = 50_000_000  # characters and elements of the values a plan builds, over the whole plan


class PlanError(Exception):
    """The plan is not in the subset, or failed while running (the message quotes no data).

    `label`: what the failure depended on (the control label where it happened and the labels
    of the values the failing operation read): code that runs because this plan failed (a
    retried plan) depends on it too.
    """

    def __init__(self, message: str, label: Label | None = None):
        super().__init__(message)
        self.label = label if label is not None else Label()


class LimitExceeded(PlanError):
    """The plan asked for more than a bound allows; refused before anything was allocated."""


class PolicyDenied(PlanError):
    """A tool call the plan made was denied by the reference monitor; the plan stops there."""

    def __init__(self, tool: str, reason: str):
        super().__init__(f"the call to {tool} was denied: {reason}")
        self.tool, self.reason = tool, reason


@dataclass(frozen=True)
class Labeled:
    value: Any
    label: Label = Label()


@dataclass
class ToolOutcome:
    ok: bool
    content: Any = None
    error: str | None = None
    trusted: bool = True
    denied: bool = False


ToolCaller = Callable[[str, dict[str, Any], dict[str, Label]], Awaitable[ToolOutcome]]
QLLM = Callable[[str, Mapping[str, Any]], Awaitable[Any]]


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_ITEMS:
        raise LimitExceeded(f"a range may hold at most {MAX_ITEMS} numbers")
    return r


def _sum(xs: Any, start: int | float = 0) -> Any:
    if not isinstance(start, int | float):  # adding up lists or strings is quadratic: not here
        raise TypeError("sum() adds numbers only")
    return sum(xs, start)


def _round(x: Any, ndigits: int | None = None) -> Any:
    if ndigits is not None and isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise LimitExceeded(f"round() takes at most {MAX_ROUND_DIGITS} digits")
    return round(x, ndigits)


_BUILTINS: dict[str, Callable[..., Any]] = {
    "len": len, "str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict,
    "sorted": sorted, "min": min, "max": max, "sum": _sum, "abs": abs, "round": _round, "range": _range,
    "enumerate": lambda xs, start=0: list(enumerate(xs, start)),
    "zip": lambda *xs: list(zip(*xs, strict=False)),
    "reversed": lambda xs: list(reversed(xs)), "any": any, "all": all, "set": lambda xs=(): sorted(set(xs)),
}
_PURE_METHODS: dict[type, frozenset[str]] = {
    str: frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "split", "splitlines", "join", "replace",
                    "startswith", "endswith", "find", "count", "format", "title", "capitalize", "isdigit"}),
    list: frozenset({"index", "count", "copy"}),
    dict: frozenset({"get", "keys", "values", "items", "copy"}),
}
_MUTATORS: dict[type, frozenset[str]] = {
    list: frozenset({"append", "extend", "insert", "pop", "remove"}),
    dict: frozenset({"setdefault", "update", "pop"}),
}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b}
_CMPOPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
           ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}
_CONTAINERS = (list, tuple, dict)
_SIZED = (str, list, tuple, dict)


_SPECIAL = ("print", "query_ai_assistant")


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def parse_plan(code: str) -> ast.Module:
    """Parse a plan (a ```python fence around it is dropped); PlanError if it is not valid Python."""
    text = code.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        module = ast.parse(text, mode="exec")
    except SyntaxError as e:
        raise PlanError(f"syntax error at line {e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise LimitExceeded("the plan nests too deeply or is too large to parse") from None
    stack: list[tuple[ast.AST, int]] = [(module, 0)]
    while stack:  # the interpreter recurses along the tree: bound its depth before running anything
        node, depth = stack.pop()
        if depth > MAX_AST_DEPTH:
            raise LimitExceeded(f"line {getattr(node, 'lineno', '?')}: the plan nests more than "
                                f"{MAX_AST_DEPTH} deep")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return module


def _measure(value: Any) -> tuple[int, int]:
    """What `value` weighs once every alias is expanded (characters and elements); LimitExceeded if too much.

    A value that contains itself, or shares one list many times over, weighs what copying or
    printing it would build, so it is refused before anything is built. Returns the number of
    values visited and the weight.
    """
    total, visited, stack = 0, 0, [(value, 0)]
    while stack:
        visited += 1
        x, depth = stack.pop()
        while isinstance(x, Labeled):
            x = x.value
        if isinstance(x, str):
            total += len(x) + 1
        elif isinstance(x, int) and not isinstance(x, bool):
            if x.bit_length() > MAX_INT_BITS:
                raise LimitExceeded(f"an integer may have at most {MAX_INT_BITS} bits")
            total += x.bit_length() // 3 + 1
        elif isinstance(x, _CONTAINERS):
            if depth >= MAX_DEPTH:
                raise LimitExceeded(f"values may nest at most {MAX_DEPTH} containers deep")
            total += len(x) + 1
            items = [*x.keys(), *x.values()] if isinstance(x, dict) else x
            stack.extend((item, depth + 1) for item in items)
        else:
            total += 1
        if total > MAX_MEASURE:
            raise LimitExceeded("a value is too large to copy, print or pass on")
    return visited, total


def _plain(v: Any) -> Any:
    while isinstance(v, Labeled):
        v = v.value
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    return v


_DIGITS = re.compile(r"\d+")
_WORDS = re.compile(r"\s+")  # whitespace runs: one more part than runs, at most
_LINES = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_ITERATING = frozenset({"list", "sorted", "set", "enumerate", "reversed", "zip", "dict", "sum", "min", "max",
                        "any", "all"})


def _check_spec(spec: str) -> None:
    """A format specification's widths and precisions, bounded before anything is formatted."""
    if "{" in spec or "}" in spec:
        raise PlanError("nested fields in a format specification are not allowed")
    if any(len(d) > 6 or int(d) > MAX_FORMAT_WIDTH for d in _DIGITS.findall(spec)):
        raise LimitExceeded(f"a format width or precision may be at most {MAX_FORMAT_WIDTH}")


def _check_template(template: str) -> None:
    """`str.format` templates: plain fields only (no attribute or item access), bounded specs."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        raise PlanError("bad format string") from None
    for _, name, spec, _ in fields:
        if name is not None and not re.fullmatch(r"\d*|[A-Za-z_]\w*", name):
            raise PlanError("format fields may only be {}, {N} or {name}")
        if spec:
            _check_spec(spec)


def _check_binop(op: ast.operator, a: Any, b: Any) -> None:
    """Refuse, before computing it, a result larger than the bounds."""
    if isinstance(op, ast.Mult):
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int):
                limit = MAX_VALUE_CHARS if isinstance(seq, str) else MAX_ITEMS
                if len(seq) * max(n, 0) > limit:
                    raise LimitExceeded("value too large")
        if _ints(a, b) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise LimitExceeded("value too large")
    elif isinstance(op, ast.Pow):
        if isinstance(b, int | float) and abs(b) > 64:
            raise LimitExceeded("exponent too large")
        if _ints(a, b) and b > 0 and a.bit_length() * b > MAX_INT_BITS:
            raise LimitExceeded("value too large")
    elif isinstance(op, ast.Add):
        if isinstance(a, str) and isinstance(b, str) and len(a) + len(b) > MAX_VALUE_CHARS:
            raise LimitExceeded("value too large")
        if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) + len(b) > MAX_ITEMS:
            raise LimitExceeded("value too large")
    elif isinstance(op, ast.Mod) and isinstance(a, str | bytes):
        raise PlanError("%-formatting is not allowed: use an f-string")


def _ints(a: Any, b: Any) -> bool:
    return isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool)


def _check_method(obj: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Bounds for the str methods whose result can be far larger than their inputs."""
    if not isinstance(obj, str):
        return
    if name in ("split", "splitlines"):
        sep = args[0] if args and name == "split" else kwargs.get("sep")
        if isinstance(sep, str) and sep:
            parts = obj.count(sep) + 1
        else:
            parts = len((_WORDS if name == "split" else _LINES).findall(obj)) + 1
        if parts > MAX_ITEMS:
            raise LimitExceeded(f"a split may give at most {MAX_ITEMS} parts")
    elif name == "format":
        _check_template(obj)
    elif name == "join" and args and isinstance(args[0], list | tuple):
        parts = [_plain_top(p) for p in args[0]]
        size = sum(len(p) if isinstance(p, str) else 0 for p in parts) + len(obj) * max(len(parts) - 1, 0)
        if size > MAX_VALUE_CHARS:
            raise LimitExceeded("value too large")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        n = obj.count(old) if old else len(obj) + 1
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        if len(obj) + n * (len(new) - len(old)) > MAX_VALUE_CHARS:
            raise LimitExceeded("value too large")


def _check_result(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise LimitExceeded("value too large")
    if isinstance(value, _CONTAINERS) and len(value) > MAX_ITEMS:
        raise LimitExceeded("value too large")
    if _ints(value, 0) and value.bit_length() > MAX_INT_BITS:
        raise LimitExceeded("value too large")
    return value


@contextmanager
def _at(node: ast.AST, label: Label) -> Iterator[None]:
    """A bound or check failing inside: the error names the plan's line and what it depended on."""
    try:
        yield
    except PlanError as e:
        raise type(e)(f"line {getattr(node, 'lineno', '?')}: {e}", e.label.join(label)) from None


@contextmanager
def _depending_on(label: Label) -> Iterator[None]:
    """Code run only because of `label`: if it fails, the failure depends on `label` too."""
    try:
        yield
    except PlanError as e:
        e.label = e.label.join(label)
        raise


def _has_call(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) for n in ast.walk(node))


@dataclass
class PlanInterpreter:
    """Runs one plan; `call_tool` is the syscall path (the monitor decides there).

    `control`: the label the plan starts under (a retried plan runs because an earlier one failed).
    """

    tools: set[str]
    call_tool: ToolCaller
    qllm: QLLM | None = None
    named_readers: Mapping[str, str] = field(default_factory=dict)  # tool -> argument naming what it reads
    control: Label = field(default_factory=Label)
    env: dict[str, Labeled] = field(default_factory=dict)
    output: list[Labeled] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)  # each tool call: tool, args, labels, ok
    steps: int = 0
    work: int = 0  # values visited to label, measure and copy values
    allocated: int = 0  # characters and elements of the values built
    read: Label = field(default_factory=Label)  # the join of all that tools and the quarantined LLM returned
    _heap: dict[int, tuple[Any, Label]] = field(default_factory=dict)  # id(container) -> (it, its label)

    @property
    def pc(self) -> Label:
        """The control label: joined with every condition and loop so far (it never drops)."""
        return self.control

    def _raise_pc(self, label: Label) -> None:
        self.control = self.control.join(label)

    async def run(self, code: str) -> list[Labeled]:
        """Run the plan; returns what it printed (each with its label)."""
        module = parse_plan(code)
        try:
            await self._block(module.body)
        except (_Break, _Continue):
            raise PlanError("break or continue outside a loop", self.pc) from None
        except PlanError as e:
            e.label = e.label.join(self.pc)  # reaching the failing statement depended on the control label
            raise
        return self.output

    # -- labels of containers

    def _container_label(self, obj: Any) -> Label:
        entry = self._heap.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else Label()

    def _taint(self, obj: Any, label: Label) -> None:
        """The container `obj` was changed in a way that depends on `label`."""
        self._heap[id(obj)] = (obj, self._container_label(obj).join(label))

    def deep_label(self, v: Labeled) -> Label:
        """The join of `v`'s label, the labels of every value reachable from it and of every container."""
        labels, seen, stack = [v.label], set(), [v.value]
        while stack:
            x = stack.pop()
            self._charge(1)
            if isinstance(x, Labeled):
                labels.append(x.label)
                stack.append(x.value)
            elif isinstance(x, _CONTAINERS) and id(x) not in seen:
                seen.add(id(x))
                if not isinstance(x, tuple):
                    labels.append(self._container_label(x))
                stack.extend([*x.keys(), *x.values()] if isinstance(x, dict) else x)
        return Label().join(*labels)

    def _deep_all(self, *values: Labeled) -> Label:
        return Label().join(*(self.deep_label(v) for v in values))

    def _charge(self, n: int) -> None:
        self.work += n
        if self.work > MAX_WORK:  # when depends on the sizes of everything read
            raise LimitExceeded("the plan's values are too large to track", self.read)

    def _built(self, value: Any) -> Any:
        """A value the plan just built: within the bounds, and charged to the plan's allocation budget.

        Each value is bounded on its own; the budget bounds what a loop of them can keep alive.
        """
        _check_result(value)
        if isinstance(value, str):
            size = len(value)
        elif isinstance(value, _CONTAINERS):
            items = value.values() if isinstance(value, dict) else value
            size = len(value) + sum(len(x) for x in items if isinstance(x, str))
        else:
            size = 1
        self._spend(size)
        return value

    def _spend(self, size: int) -> None:
        self.allocated += size
        if self.allocated > MAX_ALLOCATED:  # when depends on the sizes of everything read
            raise LimitExceeded(f"the plan built more than {MAX_ALLOCATED} characters and elements",
                                self.read)

    def _unwrap(self, v: Any, kept: bool = False) -> Any:
        """The plain value inside (containers of) Labeled values; measured first, so it is bounded.

        `kept`: the copy outlives the operation (printed, sent, traced), so its weight is spent from
        the plan's allocation budget.
        """
        visited, weight = _measure(v)
        self._charge(visited)
        if kept:
            self._spend(weight)
        return _plain(v)

    def _text(self, v: Labeled, kept: bool = False) -> str:
        return _show(self._unwrap(v.value, kept))

    def _store(self, v: Labeled) -> Labeled:
        """What a container holds for `v`: the same object, labelled by the control label too."""
        return Labeled(v.value, v.label.join(self.pc))

    # -- statements

    async def _block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            await self._stmt(stmt)

    async def _stmt(self, node: ast.stmt) -> None:
        self._tick(node)
        if self.steps % 64 == 0:
            await asyncio.sleep(0)  # the plan runs in the kernel's event loop: let other agents run
        if isinstance(node, ast.Expr):
            await self._expr(node.value)
        elif isinstance(node, ast.Assign):
            value = await self._expr(node.value)
            for target in node.targets:
                await self._assign(target, value)
        elif isinstance(node, ast.AugAssign):
            await self._augassign(node)
        elif isinstance(node, ast.If):
            cond = await self._expr(node.test)
            self._raise_pc(self.deep_label(cond))  # strict: what follows depends on which way it went
            await self._block(node.body if _truth(cond) else node.orelse)
        elif isinstance(node, ast.For):
            await self._for(node)
        elif isinstance(node, ast.Break):
            raise _Break
        elif isinstance(node, ast.Continue):
            raise _Continue
        elif isinstance(node, ast.Pass):
            pass
        else:
            raise PlanError(f"line {node.lineno}: {type(node).__name__} statements are not allowed in a plan")

    async def _for(self, node: ast.For) -> None:
        seq = await self._expr(node.iter)
        items = seq.value
        if not isinstance(items, list | tuple | str | dict | range):
            raise PlanError(f"line {node.lineno}: a for loop needs a list, tuple, str, dict or range")
        # how often the body runs, and whether `else` runs, depend on the sequence: strict from here on
        self._raise_pc(seq.label.join(self._container_label(items)))
        if len(items) > MAX_LOOP:  # measured before anything is materialised
            raise PlanError(f"line {node.lineno}: a loop may run at most {MAX_LOOP} times")
        label = self.pc
        for item in list(items):
            await self._assign(node.target, _relabel(item, label))
            try:
                await self._block(node.body)
            except _Break:
                break
            except _Continue:
                continue
        else:
            await self._block(node.orelse)

    async def _augassign(self, node: ast.AugAssign) -> None:
        target = node.target
        if isinstance(target, ast.Name):
            current = self._load(target.id, target)
            value = await self._expr(node.value)
            if isinstance(current.value, list) and isinstance(node.op, ast.Add):
                self._extend(current, value, node)  # `+=` on a list changes it in place, as in Python
                self.env[target.id] = Labeled(current.value, current.label.join(self.pc))
                return
            await self._assign(target, self._binop(node.op, current, value, node))
        elif isinstance(target, ast.Subscript):
            base, key = await self._expr(target.value), await self._key(target)
            current = self._subscript(base, key, target)
            value = await self._expr(node.value)
            if isinstance(current.value, list) and isinstance(node.op, ast.Add):
                self._extend(current, value, node)
                return
            self._setitem(base, key, self._binop(node.op, current, value, node), target)
        else:
            raise PlanError(f"line {node.lineno}: only names and items can be updated with an operator")

    async def _assign(self, target: ast.expr, value: Labeled) -> None:
        value = Labeled(value.value, value.label.join(self.pc))
        if isinstance(target, ast.Name):
            if target.id in self.tools or target.id in _BUILTINS or target.id in _SPECIAL:
                raise PlanError(f"line {target.lineno}: {target.id!r} is a function and cannot be assigned")
            self.env[target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            items = value.value
            if not isinstance(items, list | tuple) or len(items) != len(target.elts):
                raise PlanError(f"line {target.lineno}: cannot unpack into {len(target.elts)} names",
                                self.deep_label(value))
            label = value.label.join(self._container_label(items))
            for t, item in zip(target.elts, list(items), strict=True):
                await self._assign(t, _relabel(item, label))
        elif isinstance(target, ast.Subscript):
            base, key = await self._expr(target.value), await self._key(target)
            self._setitem(base, key, value, target)
        else:
            raise PlanError(f"line {target.lineno}: only names, items and tuples of names can be assigned")

    async def _key(self, target: ast.Subscript) -> Labeled:
        if isinstance(target.slice, ast.Slice):
            raise PlanError(f"line {target.lineno}: slices cannot be assigned")
        return await self._expr(target.slice)

    def _setitem(self, base: Labeled, key: Labeled, value: Labeled, node: ast.AST) -> None:
        container = base.value
        if not isinstance(container, list | dict):
            raise PlanError(f"line {node.lineno}: only list and dict items can be assigned")
        k = _hashable(key, node)
        try:
            if isinstance(container, list) and not _ints(k, 0):
                raise TypeError
            container[k] = self._store(value)
        except (IndexError, TypeError):
            raise PlanError(f"line {node.lineno}: item assignment failed (index out of range or bad key)",
                            base.label.join(key.label)) from None
        _check_result(container)
        self._taint(container, base.label.join(key.label, self.pc))

    def _load(self, name: str, node: ast.AST) -> Labeled:
        if name not in self.env:
            raise PlanError(f"line {node.lineno}: name {name!r} is not defined")
        return self.env[name]

    def _tick(self, node: ast.AST) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise PlanError(f"the plan ran more than {MAX_STEPS} steps")

    # -- expressions

    async def _expr(self, node: ast.expr) -> Labeled:
        self._tick(node)
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, str | int | float | bool | None):
                raise PlanError(f"line {node.lineno}: {type(node.value).__name__} constants are not allowed")
            with _at(node, Label()):
                _check_result(node.value)
            return Labeled(node.value, Label.of(PLAN_SOURCE))
        if isinstance(node, ast.Name):
            if node.id in ("True", "False", "None"):
                return Labeled({"True": True, "False": False, "None": None}[node.id])
            return self._load(node.id, node)
        if isinstance(node, ast.List | ast.Tuple):
            items = [await self._expr(e) for e in node.elts]
            value = [i for i in items] if isinstance(node, ast.List) else tuple(items)
            return Labeled(value, Label().join(*(i.label for i in items)))
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise PlanError(f"line {node.lineno}: ** in a dict is not allowed")
            keys = [await self._expr(k) for k in node.keys]
            vals = [await self._expr(v) for v in node.values]
            label = Label().join(*(x.label for x in keys + vals))
            return Labeled({_hashable(k, node): v for k, v in zip(keys, vals, strict=True)}, label)
        if isinstance(node, ast.JoinedStr):
            parts = [await self._expr(v) for v in node.values]
            if sum(len(p.value) for p in parts if isinstance(p.value, str)) > MAX_VALUE_CHARS:
                raise LimitExceeded(f"line {node.lineno}: value too large")
            label = self._deep_all(*parts)
            with _at(node, label):
                text = self._built("".join(self._text(p) for p in parts))
            return Labeled(text, label)
        if isinstance(node, ast.FormattedValue):
            v = await self._expr(node.value)
            spec = await self._expr(node.format_spec) if node.format_spec else None
            label = self._deep_all(v, *([spec] if spec else []))
            with _at(node, label):
                spec_text = self._unwrap(spec.value) if spec else ""
            if not isinstance(spec_text, str):
                raise PlanError(f"line {node.lineno}: bad format specification", label)
            try:
                _check_spec(spec_text)
                value = self._unwrap(v.value)
                if node.conversion in (ord("r"), ord("a")):
                    value = repr(value)
                text = format(value, spec_text)
            except PlanError as e:
                raise type(e)(f"line {node.lineno}: {e}", e.label.join(label)) from None
            except (ValueError, TypeError):
                raise PlanError(f"line {node.lineno}: bad format specification", label) from None
            with _at(node, label):
                return Labeled(self._built(text), label)
        if isinstance(node, ast.BinOp):
            return self._binop(node.op, await self._expr(node.left), await self._expr(node.right), node)
        if isinstance(node, ast.UnaryOp):
            v = await self._expr(node.operand)
            ops = {ast.Not: lambda x: not x, ast.USub: lambda x: -x, ast.UAdd: lambda x: +x}
            if type(node.op) not in ops:
                raise PlanError(f"line {node.lineno}: operator {type(node.op).__name__} is not allowed")
            return self._apply(ops[type(node.op)], [v], node)
        if isinstance(node, ast.BoolOp):
            # the result depends on every operand evaluated so far; an operand that may not be
            # evaluated and calls something makes what follows depend on them too
            label, result = Label(), None
            for i, e in enumerate(node.values):
                if i and _has_call(e):
                    self._raise_pc(label)
                with _depending_on(label):
                    result = await self._expr(e)
                label = label.join(self.deep_label(result))
                if _truth(result) == isinstance(node.op, ast.Or):
                    break
            return Labeled(result.value, label)
        if isinstance(node, ast.Compare):
            left = await self._expr(node.left)
            label, ok = Label(), True
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = await self._expr(right_node)
                fn = _CMPOPS.get(type(op))
                if fn is None:
                    raise PlanError(f"line {node.lineno}: comparison {type(op).__name__} is not allowed")
                r = self._apply(fn, [left, right], node)
                label = label.join(r.label)
                ok = ok and bool(r.value)
                left = right
            return Labeled(ok, label)
        if isinstance(node, ast.IfExp):
            cond = await self._expr(node.test)
            cond_label = self.deep_label(cond)
            if _has_call(node.body) or _has_call(node.orelse):
                self._raise_pc(cond_label)  # a call that may or may not happen: strict from here on
            with _depending_on(cond_label):
                chosen = await self._expr(node.body if _truth(cond) else node.orelse)
            return Labeled(chosen.value, chosen.label.join(cond_label))
        if isinstance(node, ast.Subscript):
            base = await self._expr(node.value)
            if isinstance(node.slice, ast.Slice):
                parts = [await self._expr(p) if p is not None else Labeled(None)
                         for p in (node.slice.lower, node.slice.upper, node.slice.step)]
                label = base.label.join(self._container_label(base.value), *(p.label for p in parts))
                try:
                    with _at(node, label):
                        bounds = slice(*(self._unwrap(p.value) for p in parts))
                    return Labeled(base.value[bounds], label)
                except (KeyError, IndexError, TypeError, ValueError):
                    raise PlanError(f"line {node.lineno}: slice failed", label) from None
            return self._subscript(base, await self._expr(node.slice), node)
        if isinstance(node, ast.Call):
            return await self._call(node)
        raise PlanError(f"line {node.lineno}: {type(node).__name__} expressions are not allowed in a plan")

    def _subscript(self, base: Labeled, key: Labeled, node: ast.AST) -> Labeled:
        """`base[key]`: the element keeps its own label, joined with what chose it."""
        label = base.label.join(self._container_label(base.value), key.label)
        item = _MISSING
        if isinstance(base.value, _SIZED):
            try:
                item = base.value[_hashable(key, node)]
            except (KeyError, IndexError, TypeError):
                pass
        if item is _MISSING:
            raise PlanError(f"line {node.lineno}: subscript failed (missing key or index out of range)",
                            self._deep_all(base, key))
        return _relabel(item, label)

    def _binop(self, op: ast.operator, a: Labeled, b: Labeled, node: ast.AST) -> Labeled:
        fn = _BINOPS.get(type(op))
        if fn is None:
            raise PlanError(f"line {node.lineno}: operator {type(op).__name__} is not allowed")
        label = self._deep_all(a, b)
        with _at(node, label):
            _check_binop(op, _plain_top(a.value), _plain_top(b.value))
        return self._apply(fn, [a, b], node)

    def _apply(self, fn: Callable[..., Any], args: list[Labeled], node: ast.AST,
               kwargs: dict[str, Labeled] | None = None, label: Label | None = None) -> Labeled:
        """`fn` on the plain values of `args`; its result is labelled by everything they reach."""
        kwargs = kwargs or {}
        if label is None:
            label = self._deep_all(*args, *kwargs.values())
        try:
            plain_kwargs = {k: self._unwrap(v.value) for k, v in kwargs.items()}
            value = fn(*[self._unwrap(a.value) for a in args], **plain_kwargs)
            return Labeled(self._built(value), label)
        except PlanError as e:
            raise type(e)(f"line {node.lineno}: {e}", e.label.join(label)) from None
        except Exception as e:  # the type only: its message may quote untrusted data
            raise PlanError(f"line {node.lineno}: {type(e).__name__} while evaluating an expression",
                            label) from None

    async def _call(self, node: ast.Call) -> Labeled:
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise PlanError(f"line {node.lineno}: *args is not allowed")
            args.append(await self._expr(a))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise PlanError(f"line {node.lineno}: **kwargs is not allowed")
            kwargs[kw.arg] = await self._expr(kw.value)
        func = node.func
        if isinstance(func, ast.Attribute):  # a method on a value
            return self._method(node, func.attr, await self._expr(func.value), args, kwargs)
        if not isinstance(func, ast.Name):
            raise PlanError(f"line {node.lineno}: only named functions can be called")
        name = func.id
        if name == "print":
            label = self._deep_all(*args).join(self.pc)
            with _at(node, label):
                self.output.append(Labeled(" ".join(self._text(a, kept=True) for a in args), label))
            return Labeled(None, self.pc)
        if name == "query_ai_assistant":
            return await self._qllm(node, args, kwargs)
        if name in _BUILTINS:
            if name == "len" and len(args) == 1 and not kwargs and isinstance(args[0].value, _SIZED):
                return Labeled(len(args[0].value), self.deep_label(args[0]))  # counted without a copy
            if name in _ITERATING and any(isinstance(a.value, _SIZED) and len(a.value) > MAX_ITEMS
                                          for a in args):
                raise LimitExceeded(f"line {node.lineno}: {name}() takes at most {MAX_ITEMS} items",
                                    self._deep_all(*args))
            return self._apply(_BUILTINS[name], args, node, kwargs)
        if name in self.tools:
            return await self._tool(node, name, args, kwargs)
        raise PlanError(f"line {node.lineno}: unknown function {name!r}")

    def _method(self, node: ast.Call, name: str, obj: Labeled, args: list[Labeled],
                kwargs: dict[str, Labeled]) -> Labeled:
        kind = next((t for t in (str, list, dict) if isinstance(obj.value, t)), None)
        if kind is not None and name in _MUTATORS.get(kind, ()):
            if kwargs:
                raise PlanError(f"line {node.lineno}: {name}() takes no keyword arguments here")
            return self._mutate(node, name, obj, args)
        if kind is None or name not in _PURE_METHODS[kind]:
            raise PlanError(f"line {node.lineno}: method {name!r} is not allowed on "
                            f"{type(obj.value).__name__}")
        if kind is dict and name == "get" and args and not kwargs and len(args) <= 2:
            if _hashable(args[0], node) in obj.value:
                return self._subscript(obj, args[0], node)
            default = args[1] if len(args) > 1 else Labeled(None)
            label = obj.label.join(self._container_label(obj.value), args[0].label)
            return _relabel(default.value, default.label.join(label))
        label = self._deep_all(obj, *args, *kwargs.values())
        with _at(node, label):
            _check_method(obj.value, name, [_plain_top(a.value) for a in args],
                          {k: _plain_top(v.value) for k, v in kwargs.items()})

        def call(target: Any, *a: Any, **kw: Any) -> Any:
            result = getattr(target, name)(*a, **kw)
            return list(result) if kind is dict and name in ("keys", "values", "items") else result

        return self._apply(call, [obj, *args], node, kwargs, label=label)

    def _mutate(self, node: ast.Call, name: str, obj: Labeled, args: list[Labeled]) -> Labeled:
        """A change to a list or dict: the elements keep their labels, the container's label rises.

        The container is changed through `obj` (a path whose label says what chose it), under the
        control label, so whoever reads it later (through any alias) sees both.
        """
        c, path = obj.value, obj.label
        arity = {"append": (1, 1), "extend": (1, 1), "insert": (2, 2), "remove": (1, 1),
                 "setdefault": (1, 2), "update": (1, 1), "pop": (0, 2) if isinstance(c, dict) else (0, 1)}
        low, high = arity[name]
        if not low <= len(args) <= high or (isinstance(c, dict) and name == "pop" and not args):
            raise PlanError(f"line {node.lineno}: wrong number of arguments to {name}()")
        fail_label = self._deep_all(obj, *args).join(self.pc)

        def fail(what: str) -> PlanError:
            return PlanError(f"line {node.lineno}: {name}() failed ({what})", fail_label)

        if name == "append":
            if len(c) + 1 > MAX_ITEMS:
                raise LimitExceeded(f"line {node.lineno}: value too large", fail_label)
            c.append(self._store(args[0]))
            self._taint(c, path.join(self.pc))
            return Labeled(None, self.pc)
        if name == "extend":
            self._extend(obj, args[0], node)
            return Labeled(None, self.pc)
        if name == "insert":
            if not _ints(args[0].value, 0):
                raise fail("the index must be an integer")
            if len(c) + 1 > MAX_ITEMS:
                raise LimitExceeded(f"line {node.lineno}: value too large", fail_label)
            c.insert(args[0].value, self._store(args[1]))
            self._taint(c, path.join(args[0].label, self.pc))
            return Labeled(None, self.pc)
        if name == "remove":
            with _at(node, fail_label):
                wanted = self._unwrap(args[0].value)
            index = next((i for i, x in enumerate(c) if self._unwrap(x) == wanted), None)
            if index is None:
                raise fail("no such element")
            del c[index]
            self._taint(c, fail_label.join(self.deep_label(obj)))  # which one went depends on them all
            return Labeled(None, self.pc)
        if name == "update":
            other = args[0]
            if not isinstance(other.value, dict):
                raise fail("update() takes a dict")
            if len(c) + len(other.value) > MAX_ITEMS:
                raise LimitExceeded(f"line {node.lineno}: value too large", fail_label)
            whole = other.label.join(self._container_label(other.value))
            for k, v in list(other.value.items()):
                c[k] = self._store(_relabel(v, whole))
            self._taint(c, path.join(whole, self.pc))
            return Labeled(None, self.pc)
        # pop and setdefault: the result is an element; what happened depends on the key
        key_label = args[0].label if args else Label()
        if isinstance(c, list):
            index = args[0].value if args else -1
            if not _ints(index, 0) or not -len(c) <= index < len(c):
                raise fail("index out of range")
            item = c.pop(index)
        else:
            k = _hashable(args[0], node)
            if name == "setdefault":
                if k not in c:
                    if len(c) + 1 > MAX_ITEMS:
                        raise LimitExceeded(f"line {node.lineno}: value too large", fail_label)
                    c[k] = self._store(args[1] if len(args) > 1 else Labeled(None))
                item = c[k]
            elif k in c:
                item = c.pop(k)
            elif len(args) > 1:
                item = args[1]
            else:
                raise fail("missing key")
        result = _relabel(item, path.join(self._container_label(c), key_label, self.pc))
        self._taint(c, path.join(key_label, self.pc))
        return result

    def _extend(self, target: Labeled, other: Labeled, node: ast.AST) -> None:
        """`target.value.extend(other)` (and list `+=`): each new element keeps what chose it."""
        c = target.value
        items = other.value
        if not isinstance(items, list | tuple | str | dict):
            raise PlanError(f"line {node.lineno}: extend() takes a list, tuple, str or dict",
                            self._deep_all(target, other))
        if len(c) + len(items) > MAX_ITEMS:
            raise LimitExceeded(f"line {node.lineno}: value too large", self._deep_all(target, other))
        whole = other.label.join(self._container_label(items))
        c.extend([self._store(_relabel(x, whole)) for x in list(items)])
        self._taint(c, target.label.join(whole, self.pc))

    async def _tool(self, node: ast.Call, name: str, args: list[Labeled],
                    kwargs: dict[str, Labeled]) -> Labeled:
        if args:
            raise PlanError(f"line {node.lineno}: call tools with keyword arguments only ({name}(arg=...))")
        labels = {k: self.deep_label(v) for k, v in kwargs.items()}  # everything reachable from each
        with _at(node, Label().join(*labels.values())):
            plain = {k: self._unwrap(v.value, kept=True) for k, v in kwargs.items()}
        labels[CONTROL] = self.pc
        outcome = await self.call_tool(name, plain, labels)
        self.trace.append({"tool": name, "args": plain, "labels": {k: v.to_json() for k, v in labels.items()},
                           "ok": outcome.ok, "denied": outcome.denied})
        if outcome.denied:
            raise PolicyDenied(name, outcome.error or "denied")
        source = tool_source(name, outcome.trusted)
        if not outcome.ok:  # whether it failed may depend on its arguments and on what it read
            raise PlanError(f"line {node.lineno}: the tool {name} failed",
                            Label.of(source).join(*labels.values()))
        naming = self.named_readers.get(name)
        if not outcome.trusted and naming in labels and labels[naming].trusted and self.pc.trusted:
            source = Source(source.name, False, endorsed=True)  # what the user pointed at by name
        try:  # what the plan keeps of the tool's output counts against its allocation budget
            weight = _measure(outcome.content)[1]
        except LimitExceeded:
            weight = MAX_MEASURE
        with _at(node, Label.of(source).join(self.pc)):
            self._spend(weight)
        # a copy: the plan may change what it got without changing the tool's own state
        self.read = self.read.join(Label.of(source))
        return _relabel(copy.deepcopy(outcome.content), Label.of(source).join(self.pc))

    async def _qllm(self, node: ast.Call, args: list[Labeled], kwargs: dict[str, Labeled]) -> Labeled:
        if self.qllm is None:
            raise PlanError(f"line {node.lineno}: no quarantined LLM is available to this plan")
        query = args[0] if args else kwargs.get("query")
        schema = args[1] if len(args) > 1 else kwargs.get("output_schema")
        if query is None or schema is None or not isinstance(schema.value, dict):
            raise PlanError(f"line {node.lineno}: call query_ai_assistant(query, output_schema) with a "
                            "JSON schema dict")
        # the quarantined LLM's answer (or failure) is derived from everything it was shown
        label = self._deep_all(query, schema).join(self.pc, Label.of(Source("qllm", True)))
        with _at(node, label):
            text, wanted = self._text(query, kept=True), self._unwrap(schema.value, kept=True)
        try:
            value = await self.qllm(text, wanted)
        except PlanError as e:
            raise type(e)(str(e), e.label.join(label)) from None
        self.read = self.read.join(label)
        return Labeled(value, label)


_MISSING = object()


def _plain_top(v: Any) -> Any:
    while isinstance(v, Labeled):
        v = v.value
    return v


def _relabel(value: Any, label: Label) -> Labeled:
    if isinstance(value, Labeled):
        return Labeled(value.value, value.label.join(label))
    return Labeled(value, label)


def _truth(v: Labeled) -> bool:
    x = _plain_top(v.value)
    return bool(len(x)) if isinstance(x, _CONTAINERS) else bool(x)


def _show(x: Any) -> str:
    return x if isinstance(x, str) else repr(x) if not isinstance(x, int | float | bool) else str(x)


def _is_hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _hashable(k: Labeled, node: ast.AST) -> Any:
    with _at(node, k.label):
        _measure(k.value)
    key = _plain(k.value)
    if not _is_hashable(key):
        raise PlanError(f"line {node.lineno}: dict keys must be strings or numbers", k.label)
    return key


def syscall_tool_caller(sys: Any) -> ToolCaller:
    """Tool calls as kernel syscalls (the planner agent's path): the kernel's monitor decides."""

    async def call(name: str, args: dict[str, Any], labels: dict[str, Label]) -> ToolOutcome:
        r = await sys.tool_call(name, args, labels={k: v.to_json() for k, v in labels.items()})
        return ToolOutcome(r.ok, r.content, r.error, r.trusted, r.status == "denied")

    return call


def monitored_tool_caller(monitor: Any, agent: Any, registry: Any, ctx: Any) -> ToolCaller:
    """Tool calls through `monitor` without a kernel (benchmarks, tests), on the kernel's one tool
    path (kernel/syscall.py: check, run bounded, record)."""
    from llmos.kernel.syscall import ToolExecutor, call_tool

    executor = ToolExecutor()

    async def call(name: str, args: dict[str, Any], labels: dict[str, Label]) -> ToolOutcome:
        r = await call_tool(monitor, registry, agent, name, args, labels, ctx, executor=executor)
        return ToolOutcome(r.ok, r.content, r.error, r.trusted, r.status == "denied")

    return call
