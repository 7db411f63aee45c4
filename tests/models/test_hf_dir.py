"""Hugging Face model directories (config.json + safetensors + tokenizer.json) of each family,
built by transformers with random weights, against transformers' forward pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from reference_models import byte_level_vocab, hf_logits, our_logits, tiny_hf_model, tiny_tokenizer

from llmos.models.config import ModelConfig
from llmos.models.loader import load_model

# Largest |ours - transformers| over all logits of a 2-layer fp32 model whose logits span ~±8.
# Measured: <= 1e-5.
TINY_ATOL = 1e-4
VOCAB = len(byte_level_vocab()[0])
# Long enough that RoPE frequencies matter: a wrong rope_theta moves logits by >0.1 here.
IDS = [(7 * i + 3) % VOCAB for i in range(200)]
CASES = {
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
}


def save_dir(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_hf_dir_matches_transformers(tmp_path: Path, case: str) -> None:
    arch, overrides = CASES[case]
    hf = tiny_hf_model(arch, VOCAB, **overrides)
    loaded = load_model(save_dir(hf, tmp_path))
    cfg = loaded.config
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (arch, 2, 4, 16)
    assert cfg.num_kv_heads == overrides.get("num_key_value_heads", 2)
    assert cfg.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.eos_token_ids == (VOCAB - 1,)
    if cfg.tie_word_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    ours, theirs = our_logits(loaded, IDS), hf_logits(hf, IDS)
    assert theirs.abs().max() > 2  # logits that can show a misplaced weight
    diff = (ours - theirs).abs().max().item()
    assert diff < TINY_ATOL, f"max |logit diff| {diff:.2e}"


def test_rope_theta_read_from_rope_parameters(tmp_path: Path) -> None:
    """transformers 5 writes rope_theta inside rope_parameters; a reader that looks only at
    the top level silently runs Qwen at theta 1e4 instead of 1e6."""
    hf = tiny_hf_model("qwen3", VOCAB)
    save_dir(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 1e6
    assert load_model(tmp_path).config.rope_theta == 1e6


def test_bf16_checkpoint_loads_as_fp32(tmp_path: Path) -> None:
    """A bf16 checkpoint is upcast once; transformers loading the same file in fp32 agrees."""
    from transformers import AutoModelForCausalLM

    save_dir(tiny_hf_model("qwen2", VOCAB).to(torch.bfloat16), tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    diff = (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item()
    assert diff < TINY_ATOL


def test_bf16_load_of_fp32_checkpoint(tmp_path: Path) -> None:
    hf = tiny_hf_model("llama", VOCAB)
    loaded = load_model(save_dir(hf, tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    ref = hf.to(torch.bfloat16)
    ours, theirs = our_logits(loaded, IDS[:32]), hf_logits(ref, IDS[:32])
    assert (ours - theirs).abs().max().item() < 0.25  # bf16 has 8 bits of mantissa


def test_generation_config_eos_is_merged(tmp_path: Path) -> None:
    save_dir(tiny_hf_model("llama", VOCAB), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 1, VOCAB - 3]}))
    assert load_model(tmp_path).config.eos_token_ids == (VOCAB - 1, VOCAB - 3)


def test_tokenizer_comes_from_the_directory(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_dir(tiny_hf_model("qwen3", VOCAB), tmp_path)
    ours, theirs = load_model(tmp_path).tokenizer, AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("the other one", "<|im_start|>user\nhi<|im_end|>", "ünï 42"):
        assert ours.encode(text) == theirs.encode(text)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_config_round_trips_through_transformers(arch: str) -> None:
    """to_hf gives a config transformers accepts, and from_hf reads it back unchanged."""
    from transformers import AutoConfig

    hf_cfg = tiny_hf_model(arch, VOCAB).config
    ours = ModelConfig.from_hf(hf_cfg.to_dict())
    again = AutoConfig.for_model(**ours.to_hf())
    assert ModelConfig.from_hf(again.to_dict()) == ours
    assert again.rope_parameters["rope_theta"] == hf_cfg.rope_parameters["rope_theta"]
