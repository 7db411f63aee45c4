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
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmos.security.ifc import Label
from llmos.security.interpreter import (
    PlanError,
    PlanInterpreter,
    PolicyDenied,
    ToolCaller,
    ToolOutcome,
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


async def main(sys: Any, request: str = "", retries: int = 2, max_tokens: int = 1024, **_: Any) -> str:
    if not request.strip():
        return "Nothing to do: give the planner a request."
    specs = sys.tools()
    names = {s.get("function", s)["name"] for s in specs}
    messages = [{"role": "system", "content": SYSTEM.format(tools=describe_tools(specs))},
                {"role": "user", "content": request}]

    async def qllm(query: str, schema: Any) -> Any:
        try:
            return await quarantined_llm(sys, query, schema)
        except QuarantineError as e:
            raise PlanError(str(e)) from None

    journal, control = CallJournal(), Label()
    for attempt in range(retries + 1):
        reply = await sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0)
        code = extract_code(reply.text)
        interp = PlanInterpreter(names, journal.caller(syscall_tool_caller(sys)), qllm, control=control)
        try:
            output = await interp.run(code)
        except PolicyDenied as e:
            sys.print(f"plan stopped: {e}")
            return f"Stopped by the security policy: {e}"
        except PlanError as e:
            control = control.join(e.label)  # the next plan runs because this one failed
            if attempt == retries:
                sys.print(f"plan failed: {e}")
                return f"The plan failed: {e}" + journal.report()
            messages += [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": f"The plan failed: {e}. Write a corrected plan."}]
            continue
        printed = [o.value for o in output]
        sys.print(json.dumps({"plan": code, "calls": len(interp.trace)}))
        answer = "\n".join(printed) if printed else "Done."
        sys.print(answer)
        return answer
    return "The plan failed."
