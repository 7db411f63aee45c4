from collections.abc import Iterator

import pytest

from llmos.engine import AsyncLLM, LLMEngine
from llmos.kernel import EngineBackend, Kernel
from llmos.models.loader import load_model
from llmos.tools import ToolRegistry


@pytest.fixture(scope="session")
def llm() -> Iterator[AsyncLLM]:
    engine = AsyncLLM(LLMEngine(load_model("smollm2-135m-instruct"), kv_budget="64MiB"))
    yield engine
    engine.shutdown()


@pytest.fixture
def make_kernel(llm, tmp_path):
    """Kernels on the shared engine, each with its own home (process table, scratch); these tests are
    about processes and scheduling, not protection, so the monitor is allow-all unless a test names one."""

    def make(tools: ToolRegistry | None = None, **kwargs) -> Kernel:
        kwargs.setdefault("monitor", "allow-all")
        return Kernel(EngineBackend(llm), home=tmp_path, tools=tools, **kwargs)

    return make
