"""The inference engine: paged KV cache, continuous batching, sampling.

Its public objects are the engines (offline `LLM`, streaming `AsyncLLM`, and
the step-level `LLMEngine` both are built on) and the request types; the
rest of engine/ is private to it.
"""

from llmos.engine.async_engine import AsyncLLM, EngineDeadError
from llmos.engine.config import ConfigError, EngineConfig
from llmos.engine.engine import LLMEngine
from llmos.engine.llm import LLM
from llmos.engine.outputs import CompletionOutput, RequestOutput
from llmos.engine.sampling_params import InvalidRequestError, SamplingParams

__all__ = [
    "LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
    "CompletionOutput", "InvalidRequestError", "ConfigError", "EngineDeadError",
]
