"""llmos: an operating system for LLM agents.

The engine layer is importable from the package top:
`from llmos import LLM, SamplingParams`.
"""

from llmos.engine import (
    LLM,
    AsyncLLM,
    CompletionOutput,
    EngineConfig,
    InvalidRequestError,
    LLMEngine,
    RequestOutput,
    SamplingParams,
)
from llmos.models.config import ModelError

__version__ = "0.1.0"

__all__ = [
    "LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
    "CompletionOutput", "InvalidRequestError", "ModelError", "__version__",
]
