"""A calculator tool: arithmetic from an AST walk, never `eval`, with bounded exponents so
that no expression can hang the tool."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from llmos.tools.base import Tool, ToolContext, ToolError

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "exp": math.exp, "sin": math.sin, "cos": math.cos}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1000


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError names what is not allowed."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError) as e:
        raise ToolError(f"cannot compute {expression!r}: {e}") from None


def _eval(node: ast.AST) -> Any:
    number = isinstance(node, ast.Constant) and type(node.value) in (int, float)
    if number:
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {_MAX_EXPONENT})")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        return _FUNCTIONS[node.func.id](*(_eval(a) for a in node.args))
    raise ToolError(f"not allowed in an arithmetic expression: {ast.unparse(node)!r}")


def _calculator(args: dict[str, Any], ctx: ToolContext) -> str:
    expression = args.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("calculator needs an 'expression' string, e.g. {\"expression\": \"17 * 23\"}")
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(value)


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and sqrt, log, ...).",
                {"type": "object", "properties": {"expression": {
                    "type": "string", "pattern": r"^[0-9a-z+\-*/%(). ]{1,80}$"}},
                 "required": ["expression"], "additionalProperties": False}, _calculator)
