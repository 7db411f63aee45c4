"""The plan interpreter: a small Python subset, run by our own AST walker, that carries labels.

This is the data-flow half of CaMeL. The privileged LLM (which never sees
untrusted data) writes a plan; this interpreter runs it one node at a time,
never with `exec` or `eval`. Every value is a `Labeled` pair of a Python value
and its `Label`; every operation joins its operands' labels; inside an `if` or
a `for`, the condition's (or the iterable's) label is joined into everything
assigned and into every call made (control dependence). Before each tool call
the interpreter hands the monitor the label of every argument, so the flow
policy decides on provenance, not on what the text says.

The subset: assignments (names, tuple unpacking, `+=`), `if`/`elif`/`else`,
`for` over a finite sequence, `break`/`continue`, expressions (literals, lists,
tuples, dicts, f-strings, arithmetic, comparisons, `and`/`or`/`not`, `x if c
else y`, subscripts, slices), calls of tools, of a fixed set of builtins and of
a fixed set of str/list/dict methods, and `print`. No imports, functions,
classes, attributes other than those methods, `while`, `lambda`,
comprehensions or `with`: what a plan can do is what its tools can do.
Errors never quote a value, so untrusted text cannot reach the planner
through an error message.
"""

from __future__ import annotations

import ast
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmos.security.ifc import CONTROL, PLAN_SOURCE, Label, Source, tool_source

MAX_STEPS = 20_000
MAX_LOOP = 1_000
MAX_VALUE_CHARS = 1_000_000


class PlanError(Exception):
    """The plan is not in the subset, or failed while running (the message quotes no data)."""


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

_BUILTINS: dict[str, Callable[..., Any]] = {
    "len": len, "str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict,
    "sorted": sorted, "min": min, "max": max, "sum": sum, "abs": abs, "round": round, "range": range,
    "enumerate": lambda xs, start=0: list(enumerate(xs, start)),
    "zip": lambda *xs: list(zip(*xs, strict=False)),
    "reversed": lambda xs: list(reversed(xs)), "any": any, "all": all, "set": lambda xs=(): sorted(set(xs)),
}
_METHODS: dict[type, frozenset[str]] = {
    str: frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "split", "splitlines", "join", "replace",
                    "startswith", "endswith", "find", "count", "format", "title", "capitalize", "isdigit"}),
    list: frozenset({"append", "extend", "index", "count", "copy"}),
    dict: frozenset({"get", "keys", "values", "items", "copy"}),
}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b}
_CMPOPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
           ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}


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
        return ast.parse(text, mode="exec")
    except SyntaxError as e:
        raise PlanError(f"syntax error at line {e.lineno}: {e.msg}") from None


def _unwrap(v: Any) -> Any:
    """The plain value inside (containers of) Labeled values."""
    if isinstance(v, Labeled):
        return _unwrap(v.value)
    if isinstance(v, list):
        return [_unwrap(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_unwrap(x) for x in v)
    if isinstance(v, dict):
        return {_unwrap(k): _unwrap(x) for k, x in v.items()}
    return v


@dataclass
class PlanInterpreter:
    """Runs one plan; `call_tool` is the syscall path (the monitor decides there)."""

    tools: set[str]
    call_tool: ToolCaller
    qllm: QLLM | None = None
    named_readers: Mapping[str, str] = field(default_factory=dict)  # tool -> argument naming what it reads
    user_label: Label = Label.of(Source("user", True))
    env: dict[str, Labeled] = field(default_factory=dict)
    output: list[Labeled] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)  # each tool call: tool, args, labels, ok
    steps: int = 0
    _pc: list[Label] = field(default_factory=list)

    @property
    def pc(self) -> Label:
        return Label().join(*self._pc)

    async def run(self, code: str) -> list[Labeled]:
        """Run the plan; returns what it printed (each with its label)."""
        module = parse_plan(code)
        for stmt in module.body:
            await self._stmt(stmt)
        return self.output

    # -- statements

    async def _block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            await self._stmt(stmt)

    async def _stmt(self, node: ast.stmt) -> None:
        self._tick(node)
        if isinstance(node, ast.Expr):
            await self._expr(node.value)
        elif isinstance(node, ast.Assign):
            value = await self._expr(node.value)
            for target in node.targets:
                self._assign(target, value)
        elif isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                raise PlanError(f"line {node.lineno}: only names can be updated with an operator")
            current = self._load(node.target.id, node)
            value = await self._expr(node.value)
            self._assign(node.target, self._binop(node.op, current, value, node))
        elif isinstance(node, ast.If):
            cond = await self._expr(node.test)
            self._pc.append(cond.label)
            try:
                await self._block(node.body if _truth(cond) else node.orelse)
            finally:
                self._pc.pop()
        elif isinstance(node, ast.For):
            seq = await self._expr(node.iter)
            items = seq.value
            if not isinstance(items, list | tuple | str | dict | range):
                raise PlanError(f"line {node.lineno}: a for loop needs a list, tuple, str, dict or range")
            items = list(items)
            if len(items) > MAX_LOOP:
                raise PlanError(f"line {node.lineno}: a loop may run at most {MAX_LOOP} times")
            self._pc.append(seq.label)
            try:
                for item in items:
                    self._assign(node.target, _relabel(item, seq.label))
                    try:
                        await self._block(node.body)
                    except _Break:
                        break
                    except _Continue:
                        continue
                else:
                    await self._block(node.orelse)
            finally:
                self._pc.pop()
        elif isinstance(node, ast.Break):
            raise _Break
        elif isinstance(node, ast.Continue):
            raise _Continue
        elif isinstance(node, ast.Pass):
            pass
        else:
            raise PlanError(f"line {node.lineno}: {type(node).__name__} statements are not allowed in a plan")

    def _assign(self, target: ast.expr, value: Labeled) -> None:
        value = Labeled(value.value, value.label.join(self.pc))
        if isinstance(target, ast.Name):
            if target.id in self.tools or target.id in _BUILTINS or target.id in _SPECIAL:
                raise PlanError(f"line {target.lineno}: {target.id!r} is a function and cannot be assigned")
            self.env[target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            items = value.value
            if not isinstance(items, list | tuple) or len(items) != len(target.elts):
                raise PlanError(f"line {target.lineno}: cannot unpack into {len(target.elts)} names")
            for t, item in zip(target.elts, items, strict=True):
                self._assign(t, _relabel(item, value.label))
        else:
            raise PlanError(f"line {target.lineno}: only names and tuples of names can be assigned")

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
            text = "".join(_text(p) for p in parts)
            return Labeled(text, Label().join(*(p.label for p in parts)))
        if isinstance(node, ast.FormattedValue):
            v = await self._expr(node.value)
            spec = await self._expr(node.format_spec) if node.format_spec else None
            try:
                text = format(_unwrap(v.value), _unwrap(spec.value) if spec else "")
            except (ValueError, TypeError):
                raise PlanError(f"line {node.lineno}: bad format specification") from None
            return Labeled(text, v.label.join(*([spec.label] if spec else [])))
        if isinstance(node, ast.BinOp):
            return self._binop(node.op, await self._expr(node.left), await self._expr(node.right), node)
        if isinstance(node, ast.UnaryOp):
            v = await self._expr(node.operand)
            ops = {ast.Not: lambda x: not x, ast.USub: lambda x: -x, ast.UAdd: lambda x: +x}
            if type(node.op) not in ops:
                raise PlanError(f"line {node.lineno}: operator {type(node.op).__name__} is not allowed")
            return Labeled(self._apply(ops[type(node.op)], [v.value], node), v.label)
        if isinstance(node, ast.BoolOp):
            # the result depends on every operand evaluated so far
            label, result = Label(), None
            for e in node.values:
                result = await self._expr(e)
                label = label.join(result.label)
                if _truth(result) == isinstance(node.op, ast.Or):
                    break
            return Labeled(result.value, label)
        if isinstance(node, ast.Compare):
            left = await self._expr(node.left)
            label, ok = left.label, True
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = await self._expr(right_node)
                label = label.join(right.label)
                fn = _CMPOPS.get(type(op))
                if fn is None:
                    raise PlanError(f"line {node.lineno}: comparison {type(op).__name__} is not allowed")
                ok = ok and bool(self._apply(fn, [left.value, right.value], node))
                left = right
            return Labeled(ok, label)
        if isinstance(node, ast.IfExp):
            cond = await self._expr(node.test)
            chosen = await self._expr(node.body if _truth(cond) else node.orelse)
            return Labeled(chosen.value, chosen.label.join(cond.label))
        if isinstance(node, ast.Subscript):
            base = await self._expr(node.value)
            if isinstance(node.slice, ast.Slice):
                parts = [await self._expr(p) if p is not None else Labeled(None)
                         for p in (node.slice.lower, node.slice.upper, node.slice.step)]
                key = slice(*(_unwrap(p.value) for p in parts))
                label = base.label.join(*(p.label for p in parts))
            else:
                k = await self._expr(node.slice)
                key, label = _unwrap(k.value), base.label.join(k.label)
            try:
                item = base.value[key]
            except (KeyError, IndexError, TypeError):
                raise PlanError(f"line {node.lineno}: subscript failed (missing key or index out of range)") \
                    from None
            return _relabel(item, label)
        if isinstance(node, ast.Call):
            return await self._call(node)
        raise PlanError(f"line {node.lineno}: {type(node).__name__} expressions are not allowed in a plan")

    def _binop(self, op: ast.operator, a: Labeled, b: Labeled, node: ast.AST) -> Labeled:
        fn = _BINOPS.get(type(op))
        if fn is None:
            raise PlanError(f"line {node.lineno}: operator {type(op).__name__} is not allowed")
        if isinstance(op, ast.Pow) and isinstance(b.value, int | float) and abs(b.value) > 64:
            raise PlanError(f"line {node.lineno}: exponent too large")
        value = self._apply(fn, [a.value, b.value], node)
        if isinstance(value, str | list | tuple) and len(value) > MAX_VALUE_CHARS:
            raise PlanError(f"line {node.lineno}: value too large")
        return Labeled(value, a.label.join(b.label))

    def _apply(self, fn: Callable[..., Any], args: list[Any], node: ast.AST,
               kwargs: dict | None = None) -> Any:
        try:
            return fn(*[_unwrap(a) for a in args], **{k: _unwrap(v) for k, v in (kwargs or {}).items()})
        except PlanError:
            raise
        except Exception as e:  # the type only: its message may quote untrusted data
            raise PlanError(f"line {node.lineno}: {type(e).__name__} while evaluating an expression") \
                from None

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
        label = Label().join(*(a.label for a in args), *(v.label for v in kwargs.values()))
        func = node.func
        if isinstance(func, ast.Attribute):  # a method on a value
            obj = await self._expr(func.value)
            allowed = next((m for t, m in _METHODS.items() if isinstance(obj.value, t)), frozenset())
            if func.attr not in allowed:
                raise PlanError(f"line {node.lineno}: method {func.attr!r} is not allowed on "
                                f"{type(obj.value).__name__}")
            if func.attr in ("append", "extend"):  # mutating: the container takes the new labels
                method = getattr(obj.value, func.attr)
                method(*[_relabel(a.value, a.label) if func.attr == "append" else a.value for a in args])
                self._relabel_name(func.value, label.join(self.pc))
                return Labeled(None, label)
            result = self._apply(getattr(obj.value, func.attr), args, node, kwargs)
            return _relabel(result, obj.label.join(label))
        if not isinstance(func, ast.Name):
            raise PlanError(f"line {node.lineno}: only named functions can be called")
        name = func.id
        if name == "print":
            self.output.append(Labeled(" ".join(_text(a) for a in args), label.join(self.pc)))
            return Labeled(None)
        if name == "query_ai_assistant":
            return await self._qllm(node, args, kwargs, label)
        if name in _BUILTINS:
            return Labeled(self._apply(_BUILTINS[name], args, node, kwargs), label)
        if name in self.tools:
            return await self._tool(node, name, args, kwargs)
        raise PlanError(f"line {node.lineno}: unknown function {name!r}")

    def _relabel_name(self, node: ast.expr, label: Label) -> None:
        if isinstance(node, ast.Name) and node.id in self.env:
            v = self.env[node.id]
            self.env[node.id] = Labeled(v.value, v.label.join(label))

    async def _tool(self, node: ast.Call, name: str, args: list[Labeled],
                    kwargs: dict[str, Labeled]) -> Labeled:
        if args:
            raise PlanError(f"line {node.lineno}: call tools with keyword arguments only ({name}(arg=...))")
        plain = {k: _unwrap(v.value) for k, v in kwargs.items()}
        labels = {k: v.label for k, v in kwargs.items()}
        labels[CONTROL] = self.pc
        outcome = await self.call_tool(name, plain, labels)
        self.trace.append({"tool": name, "args": plain, "labels": {k: v.to_json() for k, v in labels.items()},
                           "ok": outcome.ok, "denied": outcome.denied})
        if outcome.denied:
            raise PolicyDenied(name, outcome.error or "denied")
        if not outcome.ok:
            raise PlanError(f"line {node.lineno}: the tool {name} failed")
        source = tool_source(name, outcome.trusted)
        naming = self.named_readers.get(name)
        if not outcome.trusted and naming in labels and labels[naming].trusted and self.pc.trusted:
            source = Source(source.name, False, endorsed=True)  # what the user pointed at by name
        return _relabel(outcome.content, Label.of(source).join(self.pc))

    async def _qllm(self, node: ast.Call, args: list[Labeled], kwargs: dict[str, Labeled],
                    label: Label) -> Labeled:
        if self.qllm is None:
            raise PlanError(f"line {node.lineno}: no quarantined LLM is available to this plan")
        query = args[0] if args else kwargs.get("query")
        schema = args[1] if len(args) > 1 else kwargs.get("output_schema")
        if query is None or schema is None or not isinstance(schema.value, dict):
            raise PlanError(f"line {node.lineno}: call query_ai_assistant(query, output_schema) with a "
                            "JSON schema dict")
        value = await self.qllm(_text(query), _unwrap(schema.value))
        # the quarantined LLM's answer is derived from everything it was shown
        return Labeled(value, label.join(self.pc, Label.of(Source("qllm", True))))


def _relabel(value: Any, label: Label) -> Labeled:
    if isinstance(value, Labeled):
        return Labeled(value.value, value.label.join(label))
    return Labeled(value, label)


def _truth(v: Labeled) -> bool:
    return bool(_unwrap(v.value))


def _text(v: Labeled) -> str:
    x = _unwrap(v.value)
    return x if isinstance(x, str) else repr(x) if not isinstance(x, int | float | bool) else str(x)


def _hashable(k: Labeled, node: ast.AST) -> Any:
    key = _unwrap(k.value)
    try:
        hash(key)
    except TypeError:
        raise PlanError(f"line {node.lineno}: dict keys must be strings or numbers") from None
    return key


def syscall_tool_caller(sys: Any) -> ToolCaller:
    """Tool calls as kernel syscalls (the planner agent's path): the kernel's monitor decides."""

    async def call(name: str, args: dict[str, Any], labels: dict[str, Label]) -> ToolOutcome:
        r = await sys.tool_call(name, args, labels={k: v.to_json() for k, v in labels.items()})
        denied = not r.ok and (r.error or "").startswith("denied:")
        return ToolOutcome(r.ok, r.content, r.error, r.trusted, denied)

    return call


def monitored_tool_caller(monitor: Any, agent: Any, registry: Any, ctx: Any) -> ToolCaller:
    """Tool calls through `monitor` without a kernel (benchmarks, tests): check, run, record."""
    import inspect

    from llmos.tools.base import ToolError

    async def call(name: str, args: dict[str, Any], labels: dict[str, Label]) -> ToolOutcome:
        try:
            tool = registry.get(name)
        except ToolError as e:
            return ToolOutcome(False, error=str(e))
        decision = monitor.check(agent, name, args, labels)
        if not decision.allowed:
            monitor.record(agent, name, args, decision, "denied")
            return ToolOutcome(False, error=decision.reason, denied=True)
        try:
            content = tool.fn(args, ctx)
            if inspect.isawaitable(content):
                content = await content
        except ToolError as e:
            monitor.record(agent, name, args, decision, "error")
            return ToolOutcome(False, error=str(e), trusted=not tool.untrusted_output)
        monitor.record(agent, name, args, decision, "ok")
        return ToolOutcome(True, content, trusted=not tool.untrusted_output)

    return call
