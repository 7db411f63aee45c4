"""GGUF files: llmos's header reader against the gguf package, and tiny GGUFs of each family
(written the way llama.cpp's converter writes them) against the model they came from and
against transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_models import (
    byte_level_vocab,
    hf_logits,
    mixed_quant,
    our_logits,
    tiny_hf_model,
    write_gguf,
)

from llmos.models.gguf_file import read_gguf_file
from llmos.models.loader import load_model, read_gguf

TINY_ATOL = 1e-4  # as in test_hf_dir: 2-layer fp32 models, logits of magnitude ~8
VOCAB = len(byte_level_vocab()[0])
IDS = [(5 * i + 1) % VOCAB for i in range(120)]
ARCHS = ["llama", "qwen2", "qwen3"]


def test_reader_matches_gguf_package(smollm_path: Path) -> None:
    import gguf

    ours = read_gguf_file(smollm_path)
    ref = gguf.GGUFReader(str(smollm_path))
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == ref_fields
    assert len(ours.tensors) == len(ref.tensors) == 272
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.name, a.type) == (b.name, b.tensor_type)
        assert a.shape == tuple(int(d) for d in reversed(b.shape))
        assert np.array_equal(a.data.reshape(-1), b.data.view(np.uint8).reshape(-1)), a.name


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_gguf_reproduces_the_source_model(tmp_path: Path, arch: str) -> None:
    """llama.cpp permutes q/k rows for the llama architecture; loading must undo it exactly."""
    hf = tiny_hf_model(arch, VOCAB)
    path = write_gguf(hf, tmp_path / f"{arch}.gguf")
    config, weights, _ = read_gguf(path)
    source = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert set(weights) == set(source)
    for name, tensor in source.items():
        assert torch.equal(weights[name], tensor), name
    loaded = load_model(path)
    diff = (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item()
    assert diff < TINY_ATOL, f"max |logit diff| {diff:.2e}"


def test_gguf_without_output_weight_ties_embeddings(tmp_path: Path) -> None:
    hf = tiny_hf_model("llama", VOCAB, tie_word_embeddings=True)
    loaded = load_model(write_gguf(hf, tmp_path / "tied.gguf"))
    assert loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item() < TINY_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_gguf_matches_transformers(tmp_path: Path, arch: str) -> None:
    """Q8_0, Q5_1, Q4_1, Q4_0 and F16 tensors dequantize as transformers dequantizes them."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    # transformers reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128.
    hf = tiny_hf_model(arch, VOCAB, **({"head_dim": 128} if arch == "qwen3" else {}))
    path = write_gguf(hf, tmp_path / f"{arch}-q.gguf", qtype=mixed_quant)
    types = {t.type.name for t in read_gguf_file(path).tensors}
    assert {"Q8_0", "Q5_1", "Q4_1", "Q4_0", "F16", "F32"} <= types
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    loaded = load_model(path)
    diff = (our_logits(loaded, IDS) - hf_logits(theirs.eval(), IDS)).abs().max().item()
    assert diff < TINY_ATOL, f"max |logit diff| {diff:.2e}"
    # Quantization really happened: the source model's logits are far away.
    assert (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item() > 100 * TINY_ATOL


def test_gguf_metadata_becomes_config_and_tokenizer(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2", VOCAB)
    loaded = load_model(write_gguf(hf, tmp_path / "m.gguf"))
    cfg = loaded.config
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("qwen2", VOCAB, 64, 96)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.attention_bias) == (1e6, 256, True)
    assert cfg.rms_norm_eps == pytest.approx(1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (VOCAB - 2, (VOCAB - 1,))
    tok = loaded.tokenizer
    the = byte_level_vocab()[0].index("Ġthe")  # merged through "Ġ t" then "Ġt he"
    assert tok.encode("<|im_start|> the<|im_end|>") == [VOCAB - 2, the, VOCAB - 1]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
