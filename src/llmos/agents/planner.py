"""The planner agent (CaMeL): a privileged LLM plans from the user's request alone; llmos runs the plan.

The privileged LLM sees the request and the tools' signatures, never a tool's
output: it writes a plan in the interpreter's Python subset. The interpreter
runs the plan, labelling every value; tool calls go out as syscalls with
their arguments' labels, so the kernel's reference monitor applies the flow
policy; untrusted text reaches a model only through `query_ai_assistant`, the
quarantined LLM, whose typed answer keeps the text's label. A plan that does
not run is shown its error (which quotes no data) and rewritten, at most
`retries` times; a call the monitor denies ends the run with the reason.

Any backend the kernel has can be the planner: the embedded model, or a
capable model behind an OpenAI-compatible server.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmos.security.interpreter import PlanError, PlanInterpreter, PolicyDenied, syscall_tool_caller
from llmos.security.quarantine import QuarantineError, quarantined_llm

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

    for attempt in range(retries + 1):
        reply = await sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0)
        code = extract_code(reply.text)
        interp = PlanInterpreter(names, syscall_tool_caller(sys), qllm)
        try:
            output = await interp.run(code)
        except PolicyDenied as e:
            sys.print(f"plan stopped: {e}")
            return f"Stopped by the security policy: {e}"
        except PlanError as e:
            if attempt == retries:
                sys.print(f"plan failed: {e}")
                return f"The plan failed: {e}"
            messages += [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": f"The plan failed: {e}. Write a corrected plan."}]
            continue
        printed = [o.value for o in output]
        sys.print(json.dumps({"plan": code, "calls": len(interp.trace)}))
        answer = "\n".join(printed) if printed else "Done."
        sys.print(answer)
        return answer
    return "The plan failed."
