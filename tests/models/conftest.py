"""Shared fixtures for the model tests: an isolated LLMOS_HOME, the embedded model and its
transformers twin (each loaded once per session).

References are always Hugging Face transformers run on the same weights; nothing is mocked.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub; set before transformers is imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llmos.models.loader import LoadedModel, load_model  # noqa: E402
from llmos.models.registry import DEFAULT_MODEL, resolve_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def llmos_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private LLMOS_HOME, so the weight cache starts cold and ~/.llmos is never touched."""
    home = tmp_path_factory.mktemp("llmos_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOS_HOME", str(home))
        yield home


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run these tests on one intra-op thread: on a 2-core machine shared with other work,
    two OpenMP threads stall at every barrier (a 24-token generate goes from 2 s to 30 s).
    Numerics are checked against tolerances that hold for any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm(llmos_home: Path) -> LoadedModel:
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path: Path) -> Any:
    """transformers' own GGUF loader on the same file (dequantizes with gguf.quants, ~20 s)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()
