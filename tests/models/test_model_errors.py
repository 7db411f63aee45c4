"""Models that cannot be found or read fail with a ModelError naming what is wrong, never a
raw exception from deep inside a library (and never a hang on a hostile header)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from reference_models import byte_level_vocab, tiny_hf_model, tiny_tokenizer, write_gguf

from llmos.models.config import ModelConfig, ModelError
from llmos.models.loader import load_model

VOCAB = len(byte_level_vocab()[0])


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    return write_gguf(tiny_hf_model("qwen2", VOCAB), path).read_bytes()


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="'no-such-model' not found.*smollm2-135m-instruct"):
        load_model("no-such-model")
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ModelError, match=str(missing)):
        load_model(missing)


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(4096), b"GGUF" + os.urandom(4096), b"GGUF" + struct.pack("<IQQ", 3, 1, 10**12)],
    ids=["empty", "random", "magic-then-random", "absurd-counts"],
)
def test_corrupt_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=f"{path}.*GGUF"):
        load_model(path)


def test_truncated_gguf(tmp_path: Path, good_gguf: bytes) -> None:
    """Cut anywhere (header, metadata, tensor table, tensor data): always a ModelError."""
    path = tmp_path / "cut.gguf"
    for cut in [8, 30, 200, 2000, len(good_gguf) // 2, len(good_gguf) - 1]:
        path.write_bytes(good_gguf[:cut])
        with pytest.raises(ModelError, match=str(path)):
            load_model(path)


def test_gguf_with_foreign_architecture(tmp_path: Path, good_gguf: bytes) -> None:
    path = tmp_path / "gpt2.gguf"
    key = b"general.architecture"
    value = struct.pack("<IQ", 8, 5)  # a string of 5 bytes
    path.write_bytes(good_gguf.replace(key + value + b"qwen2", key + value + b"bloom"))
    with pytest.raises(ModelError, match="architecture 'bloom' is not supported"):
        load_model(path)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=f"{tmp_path}.*config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path: Path) -> None:
    tiny_hf_model("llama", VOCAB).config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no .safetensors weights"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    tiny_hf_model("llama", VOCAB).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=f"{tmp_path}: weights do not match the config.*gate_up_proj"):
        load_model(tmp_path)


def test_invalid_tokenizer_json(tmp_path: Path) -> None:
    tiny_hf_model("llama", VOCAB).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="tokenizer.json is not a valid"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"use_sliding_window": True}, "sliding-window"),
    ],
)
def test_unsupported_configs(change: dict, message: str) -> None:
    cfg = {**tiny_hf_model("qwen2", VOCAB).config.to_dict(), **change}
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf(cfg)


def test_chat_template_errors_are_model_errors(tmp_path: Path) -> None:
    from llmos.models.tokenizer import Tokenizer

    tokens, types, merges = byte_level_vocab()
    tok = Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.chat_template": "{{ raise_exception('only user turns') }}",
    })
    with pytest.raises(ModelError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ModelError, match="not supported"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama"})
