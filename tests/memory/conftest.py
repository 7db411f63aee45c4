import pytest

from llmos.memory import MemoryStore, MiniLMEmbedder
from llmos.models.gguf_file import read_gguf_file
from llmos.models.registry import resolve_model
from llmos.models.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The embedded model's real tokenizer and chat template (no weights loaded)."""
    return Tokenizer.from_gguf_fields(read_gguf_file(resolve_model("smollm2-135m-instruct")).fields)


@pytest.fixture(scope="session")
def count_tokens(tokenizer):
    return lambda messages: len(tokenizer.encode_chat(messages))


@pytest.fixture(scope="session")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture
def store(tmp_path) -> MemoryStore:
    s = MemoryStore(tmp_path / "memory.db")
    yield s
    s.close()
