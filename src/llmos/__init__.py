"""llmos: an operating system for LLM agents.

The engine and the kernel are importable from the package top:
`from llmos import LLM, SamplingParams, Kernel`. Names load on first use, so
commands that only read the process table never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "llmos.engine": ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
                     "CompletionOutput", "InvalidRequestError"],
    "llmos.models.config": ["ModelError"],
    "llmos.kernel": ["Kernel", "Syscalls", "Quotas", "EngineBackend", "OpenAIBackend", "ProcessState"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'llmos' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
