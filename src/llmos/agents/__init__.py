"""Agent programs: plain async functions that reach the world only through syscalls.

`load_program` finds one by name (a module of this package with a `main`) or
by the path of a Python file that defines `main`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Program = Callable[..., Awaitable[Any]]


class TaskFailed(Exception):
    """An agent program could not do its task; the message says why (`llmos run` shows it in one line
    and exits 1)."""


class AgentNotFound(LookupError):
    """No agent program by that name or path; the message says where it looked."""


def load_program(spec: str) -> tuple[str, Program]:
    """(name, main) of a built-in agent (`chat`, `react`, `memgpt`, ...) or of a .py file."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise AgentNotFound(f"no agent file {spec}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise AgentNotFound(f"{spec} failed to load: {type(e).__name__}: {e}") from None
        name = path.stem
    else:
        if not spec.isidentifier():
            raise AgentNotFound(f"{spec!r} is neither an agent name nor a .py file")
        try:
            module = importlib.import_module(f"llmos.agents.{spec}")
        except ModuleNotFoundError:
            raise AgentNotFound(f"no built-in agent {spec!r}; built-in: {', '.join(builtin_agents())}, "
                                "or give a .py file that defines `async def main(sys, ...)`") from None
        name = spec
    main = getattr(module, "main", None)
    if main is None:
        raise AgentNotFound(f"{spec} defines no `main(sys, ...)` agent program")
    return name, main


def builtin_agents() -> list[str]:
    """Modules of this package that define an agent program."""
    here = Path(__file__).parent
    names = [p.stem for p in here.glob("*.py") if not p.stem.startswith("_")]
    names += [p.name for p in here.iterdir() if (p / "__init__.py").is_file()]
    return sorted(n for n in names if n.isidentifier())
