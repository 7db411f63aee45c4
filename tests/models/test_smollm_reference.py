"""The embedded SmolLM2 GGUF, run by llmos, against transformers' own GGUF loader on the same file.

Both sides dequantize with gguf.quants, so the weights are identical and any difference
comes from the forward pass (fp32 matmul order, attention kernel).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference_models import hf_logits, our_logits

from llmos.models.loader import LoadedModel, load_model
from llmos.models.registry import DEFAULT_MODEL

# Largest |ours - transformers| over every position and vocabulary entry of a prompt, in fp32.
# Measured: <= 1e-4 on logits of magnitude ~40 (a relative error near 3e-6).
LOGIT_ATOL = 5e-4
GREEDY_TOKENS = 24
PROMPTS = [
    [{"role": "user", "content": "What is an operating system?"}],
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Numbers 3.14159 and 2718, ünïcödé 日本語 🤖!",
]


def _ids(loaded: LoadedModel, prompt: str | list[dict[str, str]]) -> list[int]:
    if isinstance(prompt, list):
        return loaded.tokenizer.encode_chat(prompt)
    return loaded.tokenizer.encode(prompt)


def test_config_matches_transformers(smollm: LoadedModel, hf_smollm: Any) -> None:
    ours, theirs = smollm.config, hf_smollm.config
    assert (ours.arch, ours.vocab_size, ours.hidden_size) == ("llama", theirs.vocab_size, theirs.hidden_size)
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_layers == theirs.num_hidden_layers
    assert (ours.num_heads, ours.num_kv_heads) == (theirs.num_attention_heads, theirs.num_key_value_heads)
    assert ours.head_dim == theirs.head_dim
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert ours.tie_word_embeddings and theirs.tie_word_embeddings
    assert ours.eos_token_ids == (2,)  # <|im_end|> ends a chat turn


@pytest.mark.parametrize("prompt", PROMPTS, ids=["chat", "plain", "code", "digits-unicode"])
def test_logits_match_transformers(smollm: LoadedModel, hf_smollm: Any, prompt: Any) -> None:
    ids = _ids(smollm, prompt)
    ours, theirs = our_logits(smollm, ids), hf_logits(hf_smollm, ids)
    assert ours.shape == theirs.shape == (len(ids), smollm.config.vocab_size)
    diff = (ours - theirs).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit diff| {diff:.2e} over {len(ids)} positions"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["chat", "plain", "code", "digits-unicode"])
def test_greedy_continuation_matches_transformers(smollm: LoadedModel, hf_smollm: Any, prompt: Any) -> None:
    """transformers generates greedily; llmos must pick the same token at every step.

    One causal forward over prompt + continuation gives llmos's logits for every prefix,
    so its argmax at step i is exactly what its own greedy decoding would pick after the
    first i tokens: equal at every step means the greedy sequences are equal token for token.
    """
    ids = _ids(smollm, prompt)
    with torch.no_grad():
        theirs = hf_smollm.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY_TOKENS,
            eos_token_id=list(smollm.config.eos_token_ids), pad_token_id=smollm.tokenizer.eos_token_id,
        )[0, len(ids):].tolist()
    assert len(theirs) >= 8  # a real continuation, not an immediate stop
    logits = our_logits(smollm, ids + theirs[:-1])
    ours = logits[len(ids) - 1 :].argmax(-1).tolist()
    assert ours == theirs, (smollm.tokenizer.decode(ours), smollm.tokenizer.decode(theirs))


def test_bfloat16_load_tracks_fp32(smollm: LoadedModel) -> None:
    """Loading in bf16 casts the cached fp32 weights; the model still predicts like fp32."""
    bf16 = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    ids = smollm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    ours, ref = our_logits(bf16, ids), our_logits(smollm, ids)
    assert ours.dtype == torch.float32  # compute_logits always hands back fp32
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8, f"bf16 top-1 agrees with fp32 at only {agree:.0%} of positions"
    assert ours[-1].argmax() == ref[-1].argmax()
