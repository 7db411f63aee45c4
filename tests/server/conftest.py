import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from llmos.engine import AsyncLLM, LLMEngine
from llmos.models.loader import load_model
from llmos.server import create_app

MODEL = "smollm2-135m-instruct"


@dataclass
class Server:
    url: str
    llm: AsyncLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llm() -> Iterator[AsyncLLM]:
    engine = AsyncLLM(LLMEngine(load_model(MODEL), kv_budget="128MiB"))
    yield engine
    engine.shutdown()


def start_server(llm: AsyncLLM, api_key: str | None = None) -> tuple[uvicorn.Server, threading.Thread, str]:
    """The real server on a free port of 127.0.0.1, in a thread."""
    port = _free_port()
    config = uvicorn.Config(create_app(llm, MODEL, api_key), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def server(llm: AsyncLLM) -> Iterator[Server]:
    srv, thread, url = start_server(llm)
    yield Server(url, llm)
    srv.should_exit = True
    thread.join(timeout=10)
