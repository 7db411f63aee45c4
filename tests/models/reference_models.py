"""Reference-model helpers: tiny random transformers models and a GGUF writer that lays
tensors out as llama.cpp's convert_hf_to_gguf.py does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos.models.loader import LoadedModel
from llmos.models.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A small GPT-2 style vocabulary: 256 byte symbols, a few merges, ChatML specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ o"]
    tokens += ["".join(m.split()) for m in merges] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types, merges


def tiny_tokenizer() -> Tokenizer:
    """The byte-level vocabulary as a llmos tokenizer (save_pretrained makes a tokenizer.json)."""
    tokens, types, merges = byte_level_vocab()
    return Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": len(tokens) - 2, "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    })


def tiny_hf_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer transformers config of the given family, with grouped-query attention."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=1e4 if arch == "llama" else 1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        initializer_range=0.2,  # large enough that logits span several units
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_hf_model(arch: str, vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised transformers causal LM; norms and biases are randomised too,
    so a weight loaded into the wrong slot changes the output."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, vocab_size, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.float().eval()


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's row order for q/k of the llama architecture (interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Any, path: Path, qtype: Callable[[str, np.ndarray], Any] | None = None) -> Path:
    """Write a transformers model as llama.cpp's converter would (names, q/k permutation, metadata).

    qtype(gguf_name, array) picks each tensor's GGML type (default F32).
    """
    import gguf

    cfg = model.config
    arch = cfg.model_type
    tokens, types, merges = byte_level_vocab()
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.vocab_size - 2)
    w.add_eos_token_id(cfg.vocab_size - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    names = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name in top:
            name = top[hf_name]
        else:
            _, _, i, rest = hf_name.split(".", 3)
            name = f"blk.{i}.{names[rest]}"
        arr = tensor.detach().float().numpy().copy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            arr = _llama_cpp_permute(arr, heads)
        kind = qtype(name, arr) if qtype else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mixed_quant(name: str, arr: np.ndarray) -> Any:
    """Norms and biases F32 (as llama.cpp keeps them), the rest spread over common types."""
    from gguf import GGMLQuantizationType as Q

    if arr.ndim == 1:
        return Q.F32
    kind = name.split(".")[-2]  # blk.0.attn_q.weight -> attn_q; token_embd.weight -> token_embd
    return {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.F16, "ffn_down": Q.Q5_1}.get(kind, Q.Q8_0)


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def our_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = loaded.model(torch.tensor(ids), torch.arange(len(ids)))
        return loaded.model.compute_logits(hidden)
