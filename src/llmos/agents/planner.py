"""The planner agent (CaMeL): a privileged LLM plans from the user's request alone; llmos runs the plan.

The privileged LLM sees the request and the tools' signatures, never a tool's
output: it writes a plan in the interpreter's Python subset. The interpreter
runs the plan, labelling every value; tool calls go out as syscalls with
their arguments' labels, so the kernel's reference monitor applies the flow
policy; untrusted text reaches a model only through `query_ai_assistant`, the
quarantined LLM, whose typed answer keeps the text's label. A plan that does
not run is shown its error (which quotes no data) and rewritten, at most
`retries` times; a call the monitor denies ends the run with the reason.

Retries never repeat a side effect and never launder a failure: every tool
call that completed is kept in a journal, and a rewritten plan that makes
the same call again gets the recorded result instead of running it (it
resumes after it); a rewritten plan runs under the label of what made the
previous one fail, so a failure caused by untrusted data cannot decide,
under a trusted control label, what happens next.

The agent holds `ifc.declassify`: the monitor takes the interpreter's
per-value labels as given instead of joining them with everything the
agent's context has read.

Any backend the kernel has can be the planner: the embedded model, or a
capable model behind an OpenAI-compatible server.

A small model cannot be trusted to write valid Python, so `structured=True`
asks for the plan as JSON under a schema built from the tools' signatures
(`plan_schema`): constrained decoding (the engine's grammar, or a server's
`response_format`) makes every reply a plan that names only real tools with
their real arguments; `compile_plan` turns it into the interpreter's subset,
so it runs on the same path, labels and monitor as a written plan. A reply
that is still not a plan (cut off, a step that refers forward) is a typed
`PlanFormatError`, retried like any failed plan.

Each run ends with one status line (JSON): the outcome (`done`, `denied`,
`failed`), whether the last plan parsed, the plan and how many calls it made.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmos.kernel.syscall import SyscallError
from llmos.security.ifc import Label
from llmos.security.interpreter import (
    PlanError,
    PlanInterpreter,
    PolicyDenied,
    ToolCaller,
    ToolOutcome,
    parse_plan,
    syscall_tool_caller,
)
from llmos.security.monitor import DECLASSIFY
from llmos.security.quarantine import QuarantineError, quarantined_llm

CAPABILITIES = [{"tool": DECLASSIFY}]  # granted by `llmos run`: the interpreter labels values itself

SYSTEM = """You write a plan, as Python code, that does the user's task with these functions:
{tools}
query_ai_assistant(query: str, output_schema: dict) -> value  # ask a model with no tools to read text \
and return a value of that JSON schema (use it to extract data from emails, files, web pages)
print(*values)  # tell the user something

Rules: call tools with keyword arguments only; tool results are JSON-like values (str, list, dict).
Allowed: assignments, if/elif/else, for loops, f-strings, arithmetic, comparisons, indexing,
len/str/int/float/sorted/min/max/sum/range/enumerate/zip, and str/list/dict methods.
Not allowed: import, def, class, while, lambda, comprehensions, try, with.
Reply with one ```python code block and nothing else."""


def describe_tools(specs: list[dict[str, Any]]) -> str:
    """One signature line per tool, from the OpenAI-style specs."""
    lines = []
    for spec in specs:
        fn = spec.get("function", spec)
        props = fn.get("parameters", {}).get("properties", {})
        params = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
        lines.append(f"{fn['name']}({params})  # {fn.get('description', '')}")
    return "\n".join(lines)


class CallJournal:
    """The tool calls that completed, across a request's attempts; a completed call never runs again.

    `caller(call)` wraps a tool caller: a call with the same tool and arguments as a recorded one
    that this attempt has not yet replayed returns the recorded outcome without running.
    """

    def __init__(self) -> None:
        self.done: list[tuple[str, str, ToolOutcome]] = []

    def caller(self, call: ToolCaller) -> ToolCaller:
        replayed: set[int] = set()

        async def journaled(name: str, args: dict[str, Any], labels: dict[str, Label]) -> ToolOutcome:
            key = _call_key(args)
            for i, (tool, recorded, outcome) in enumerate(self.done):
                if i not in replayed and tool == name and recorded == key:
                    replayed.add(i)
                    return outcome
            outcome = await call(name, args, labels)
            if outcome.ok:
                replayed.add(len(self.done))
                self.done.append((name, key, outcome))
            return outcome

        return journaled


    def report(self) -> str:
        """For the user: the calls that completed (each ran exactly once), or nothing."""
        if not self.done:
            return ""
        calls = "; ".join(f"{tool}({key[:200]})" for tool, key, _ in self.done)
        return f". Completed before that, each exactly once: {calls}"


def _call_key(args: dict[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, default=repr)


def extract_code(text: str) -> str:
    """The code of the reply's first ```python block (or the whole reply)."""
    m = re.search(r"```(?:python)?\s*\n(.*?)```", text, re.DOTALL)
    return m.group(1) if m else text


# --- structured plans: JSON under a schema, compiled to the interpreter's subset ---------------------------

MAX_PLAN_STEPS = 5
MAX_ANSWER_ITEMS = 3
MAX_LITERAL_CHARS = 160  # a small model pads a free string to its limit
ASK_READS_CHARS = 6_000  # how much of a step's result the quarantined LLM is shown

STRUCTURED_SYSTEM = """You plan the tool calls that do the user's task. Tools:
{tools}

Reply with JSON: {{"steps": [{{"tool": NAME, "args": {{...}}}}, ...], "answer": [...]}}.
Steps are numbered from 1 and run in order; "answer" is what to tell the user.
Each argument and answer item is either a literal value, or {{"result_of_step": N}} (the result of
step N), or {{"ask": QUESTION, "about_step": N}} (a model with no tools reads the result of step N
and answers QUESTION with a value of the argument's type). You never see any result: plan it all now.
Example, for "Email bob@example.com the total of invoice.txt":
{{"steps": [{{"tool": "read_file", "args": {{"path": "invoice.txt"}}}}, {{"tool": "send_email", "args": \
{{"to": "bob@example.com", "body": {{"ask": "What is the invoice's total?", "about_step": 1}}}}}}], \
"answer": ["I sent Bob the total."]}}"""


class PlanFormatError(PlanError):
    """The privileged LLM's reply is not a plan (not JSON of the plan schema, or a step refers to a
    step that has not run); quotes nothing but the plan's own structure."""


def _param_type(prop: dict[str, Any]) -> str:
    """A parameter's JSON type (the first non-null one of an `anyOf`); `string` when it says none."""
    kinds = [prop.get("type")] + [p.get("type") for p in prop.get("anyOf", []) if isinstance(p, dict)]
    return next((k for k in kinds if isinstance(k, str) and k != "null"), "string")


def _literal_schema(prop: dict[str, Any]) -> dict[str, Any]:
    kind = _param_type(prop)
    if kind in ("integer", "number", "boolean"):
        return {"type": kind}
    if kind == "array":
        items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
        return {"type": "array", "items": _literal_schema(items), "maxItems": 10}
    return {"type": "string", "maxLength": MAX_LITERAL_CHARS}


_STEP_NO = {"type": "integer", "minimum": 1, "maximum": MAX_PLAN_STEPS}
_RESULT = {"type": "object", "properties": {"result_of_step": _STEP_NO}, "required": ["result_of_step"],
           "additionalProperties": False}
_ASK = {"type": "object", "properties": {"ask": {"type": "string", "maxLength": MAX_LITERAL_CHARS},
                                         "about_step": _STEP_NO},
        "required": ["ask", "about_step"], "additionalProperties": False}


def _signature(spec: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    fn = spec.get("function", spec)
    params = fn.get("parameters", {}) or {}
    return fn["name"], params.get("properties", {}) or {}, list(params.get("required", []) or [])


def plan_schema(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a plan over these tools: each step names a real tool with its own arguments
    (the required ones always present), each value a literal of the argument's type, a step's result,
    or a question about a step's result for the quarantined LLM."""
    steps = []
    for spec in specs:
        name, props, required = _signature(spec)
        args = {"type": "object", "additionalProperties": False,
                "required": [r for r in required if r in props],
                "properties": {k: {"anyOf": [_literal_schema(p), _RESULT, _ASK]} for k, p in props.items()}}
        steps.append({"type": "object", "properties": {"tool": {"const": name}, "args": args},
                      "required": ["tool", "args"], "additionalProperties": False})
    answer = {"anyOf": [{"type": "string", "maxLength": MAX_LITERAL_CHARS}, _RESULT, _ASK]}
    return {"type": "object", "additionalProperties": False, "required": ["steps", "answer"],
            "properties": {"steps": {"type": "array", "items": {"anyOf": steps}, "maxItems": MAX_PLAN_STEPS},
                           "answer": {"type": "array", "items": answer, "maxItems": MAX_ANSWER_ITEMS}}}


def compile_plan(reply: str, specs: list[dict[str, Any]]) -> str:
    """The plan in the interpreter's subset, from a reply under `plan_schema(specs)`; PlanFormatError if
    the reply is not such a plan. Literals become Python literals (`repr`), a step's result its variable,
    a question a `query_ai_assistant` call over (the start of) that result."""
    signatures = {name: props for name, props, _ in map(_signature, specs)}
    try:
        plan = json.loads(reply)
    except ValueError:
        raise PlanFormatError("the reply is not JSON (cut off, or not a plan)") from None
    steps, answer = (plan.get("steps"), plan.get("answer")) if isinstance(plan, dict) else (None, None)
    if not isinstance(steps, list) or not isinstance(answer, list):
        raise PlanFormatError('a plan is {"steps": [...], "answer": [...]}')

    def value(v: Any, step: int, kind: str, where: str) -> str:
        if isinstance(v, dict) and ("result_of_step" in v or "about_step" in v):
            n = v.get("result_of_step", v.get("about_step"))
            if not isinstance(n, int) or not 1 <= n < step:
                raise PlanFormatError(f"{where} refers to step {n!r}, which has not run before it")
            if "result_of_step" in v:
                return f"step_{n}"
            ask = v.get("ask")
            if not isinstance(ask, str):
                raise PlanFormatError(f"{where}: a question is a string")
            wanted = {"type": kind, **({"maxLength": MAX_LITERAL_CHARS} if kind == "string" else {})}
            return f"query_ai_assistant({ask!r} + '\\n\\n' + str(step_{n})[:{ASK_READS_CHARS}], {wanted!r})"
        return repr(v)

    lines = []
    for i, step in enumerate(steps, 1):
        tool = step.get("tool") if isinstance(step, dict) else None
        args = step.get("args", {}) if isinstance(step, dict) else None
        if tool not in signatures or not isinstance(args, dict):
            raise PlanFormatError(f"step {i} does not name a tool with an object of arguments")
        props = signatures[tool]
        if unknown := sorted(set(args) - set(props)):
            raise PlanFormatError(f"step {i}: {tool} has no argument {unknown[0]!r}")
        call = ", ".join(f"{k}={value(v, i, _param_type(props[k]), f'step {i}')}" for k, v in args.items())
        lines.append(f"step_{i} = {tool}({call})")
    for v in answer:
        lines.append(f"print({value(v, len(steps) + 1, 'string', 'the answer')})")
    return "\n".join(lines) + "\n"


async def main(sys: Any, request: str = "", retries: int = 2, max_tokens: int = 1024,
               structured: bool = False, named_readers: dict[str, str] | None = None,
               qllm_max_tokens: int = 256, **_: Any) -> str:
    """Plan from `request` alone and run the plan. `structured`: the plan is JSON under `plan_schema`
    (constrained decoding), compiled to the subset. `named_readers`: tool -> the argument naming what it
    reads (content the user pointed at by name is endorsed, see the interpreter). `qllm_max_tokens`: the
    longest answer of the quarantined LLM (its JSON is closed within it)."""
    if not request.strip():
        return "Nothing to do: give the planner a request."
    specs = sys.tools()
    names = {s.get("function", s)["name"] for s in specs}
    system = (STRUCTURED_SYSTEM if structured else SYSTEM).format(tools=describe_tools(specs))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": request}]
    schema = plan_schema(specs) if structured else None

    async def qllm(query: str, schema: Any) -> Any:
        try:
            return await quarantined_llm(sys, query, schema, max_tokens=qllm_max_tokens)
        except QuarantineError as e:
            raise PlanError(str(e)) from None
        except SyscallError:  # the model refused the request (too long for its window): no data quoted
            raise PlanError("the quarantined LLM could not read the text") from None

    def status(outcome: str, code: str | None, calls: int, valid: bool,
               error: PlanError | None = None) -> None:
        sys.print(json.dumps({"outcome": outcome, "valid": valid, "plan": code, "calls": calls,
                              "attempts": attempt + 1, "error": str(error or ""),
                              "error_type": type(error).__name__ if error else None}))

    journal, control = CallJournal(), Label()
    for attempt in range(retries + 1):
        reply = await sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0, json_schema=schema)
        interp = PlanInterpreter(names, journal.caller(syscall_tool_caller(sys)), qllm, control=control,
                                 named_readers=dict(named_readers or {}))
        code, valid = None, False
        try:
            code = compile_plan(reply.text, specs) if structured else extract_code(reply.text)
            parse_plan(code)
            valid = True
            output = await interp.run(code)
        except PolicyDenied as e:
            sys.print(f"plan stopped: {e}")
            status("denied", code, len(interp.trace), valid, e)
            return f"Stopped by the security policy: {e}"
        except PlanError as e:
            control = control.join(e.label)  # the next plan runs because this one failed
            if attempt == retries:
                sys.print(f"plan failed: {e}")
                status("failed", code, len(interp.trace), valid, e)
                return f"The plan failed: {e}" + journal.report()
            messages += [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": f"The plan failed: {e}. Write a corrected plan."}]
            continue
        printed = [o.value for o in output]
        status("done", code, len(interp.trace), valid)
        answer = "\n".join(printed) if printed else "Done."
        sys.print(answer)
        return answer
    return "The plan failed."
