"""Weight loaders: a GGUF file (kept quantized, or dequantized and cached) or a Hugging Face directory.

`quantization` chooses how weights are held: "gguf" keeps a GGUF file's Q4_0, Q4_1
and Q8_0 tensors packed (quant.py; other types are dequantized), "int8" quantizes
every linear weight to int8 per output channel, "none" dequantizes to `dtype`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos.models.cache import load_cached_weights, save_cached_weights, weight_cache_path
from llmos.models.config import ModelConfig, ModelError
from llmos.models.gguf_file import GGUFFile, read_gguf_file
from llmos.models.llama import LlamaForCausalLM, fuse_hf_weights
from llmos.models.quant import GGMLWeight, QuantFormat, QuantWeight, cat_weights, quantize_int8_per_channel
from llmos.models.registry import resolve_model
from llmos.models.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    path: Path


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order so weights use the rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(path: Path, gg: GGUFFile) -> ModelConfig:
    fields = gg.fields
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported")

    def meta(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    try:
        heads = int(meta("attention.head_count"))
        hidden = int(meta("embedding_length"))
        tokens = fields.get("tokenizer.ggml.tokens") or []
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eot = fields.get("tokenizer.ggml.eot_token_id")
        return ModelConfig(
            arch=arch,
            vocab_size=int(meta("vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(meta("feed_forward_length")),
            num_layers=int(meta("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta("attention.head_count_kv", heads)),
            head_dim=int(meta("attention.key_length", hidden // heads)),
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(meta("context_length", 2048)),
            tie_word_embeddings=all(t.name != "output.weight" for t in gg.tensors),
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in (eos, eot) if i is not None)),
        )
    except ModelError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelError(f"{path}: GGUF metadata is incomplete or invalid ({e})") from None


def _gguf_weights(path: Path, gg: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face-named fp32 weights, dequantized with gguf.quants."""
    weights: dict[str, torch.Tensor] = {}
    for t in gg.tensors:
        name = _gguf_name(t.name)
        if name is not None:
            weights[name] = _dequantized(path, t, name, config)
    return weights


def _dequantized(path: Path, t, name: str, config: ModelConfig) -> torch.Tensor:
    """One GGUF tensor as a Hugging Face-laid-out fp32 tensor."""
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.type)
    except NotImplementedError:
        raise ModelError(
            f"{path}: tensor {t.name} uses {t.type.name}, which llmos cannot dequantize"
        ) from None
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(t.shape)
    if not arr.flags.writeable:  # F32 tensors come back as views of the memory map
        arr = arr.copy()
    if config.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        n = config.num_heads if "q_proj" in name else config.num_kv_heads
        arr = _unpermute_rope(arr, n)
    return torch.from_numpy(arr)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, Hugging Face-named fp32 weights and tokenizer of a GGUF file."""
    gg = read_gguf_file(path)
    config = _gguf_config(path, gg)
    return config, _gguf_weights(path, gg, config), Tokenizer.from_gguf_fields(gg.fields)


def _numpy_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of CPU fp32 tensors as one plain memcpy each: torch's parallel copy stalls
    at OpenMP barriers when the other core of a small machine is busy (1.7 s instead of 0.1 s)."""
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))


def _gguf_state(path: Path, gg: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's fused fp32 weights, from the dequantized-weight cache when it has them."""
    entry = weight_cache_path(path)
    state = load_cached_weights(entry)
    if state is None:
        state = fuse_hf_weights(config, _gguf_weights(path, gg, config), cat=_numpy_cat)
        save_cached_weights(entry, state)
    return state


QUANTIZATIONS = ("auto", "gguf", "int8", "none")


class _Lazy:
    """A GGUF tensor read only when fusing or loading needs it (then its pages are released)."""

    def __init__(self, read) -> None:
        self.read = read


def _gguf_quantized_state(path: Path, gg: GGUFFile, config: ModelConfig
                          ) -> dict[str, torch.Tensor | QuantWeight]:
    """The model's fused weights with Q4_0/Q4_1/Q8_0 matrices kept packed.

    Each tensor is copied out of the memory map and its pages released as it is
    used, so the file and the copies are never resident together, and no fp32
    copy of a packed weight exists.
    """
    native = {int(f) for f in QuantFormat}

    def reader(t, name: str):
        def read() -> torch.Tensor | GGMLWeight:
            if int(t.type) in native and len(t.shape) == 2:
                arr = np.array(t.data)  # a copy out of the map
                if config.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    n = config.num_heads if "q_proj" in name else config.num_kv_heads
                    arr = np.ascontiguousarray(_unpermute_rope(arr, n))
                value: torch.Tensor | GGMLWeight = GGMLWeight(arr, QuantFormat(int(t.type)), t.shape[-1])
            else:
                value = _dequantized(path, t, name, config)
            gg.release(t)
            return value
        return read

    lazy = {name: _Lazy(reader(t, name)) for t in gg.tensors if (name := _gguf_name(t.name))}

    def materialize(v) -> torch.Tensor | QuantWeight:
        """The tensor, its blocks in the kernel layout (each file-layout copy lives only until packed)."""
        value = v.read() if isinstance(v, _Lazy) else v
        return value.pack() if isinstance(value, GGMLWeight) else value

    state = fuse_hf_weights(config, lazy, cat=lambda parts: materialize(
        cat_weights([p.read() if isinstance(p, _Lazy) else p for p in parts])))
    return {k: materialize(v) for k, v in state.items()}


def _quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantWeight]:
    """Every 2-D linear weight (and the embedding) as int8 per output channel."""
    return {k: quantize_int8_per_channel(v) if v.dim() == 2 and v.shape[1] % 32 == 0 else v
            for k, v in state.items()}


def _resolve_quantization(quantization: str, path: Path, device: torch.device,
                          dtype: torch.dtype) -> str:
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    if quantization == "auto":
        from llmos.models import quant

        native = device.type == "cpu" and dtype == torch.float32 and quant.available()
        return "gguf" if native and not path.is_dir() else "none"
    if quantization == "none":
        return quantization
    if device.type != "cpu" or dtype != torch.float32:
        raise ModelError(f"quantization {quantization!r} runs on the CPU in float32 only "
                         f"(asked for {device.type}, {dtype})")
    from llmos.models import quant

    if not quant.available():
        raise ModelError(f"quantization {quantization!r} needs the C kernel, which could not be built")
    if quantization == "gguf" and path.is_dir():
        raise ModelError(f"{path} is a Hugging Face directory: its weights are not GGUF-quantized "
                         "(use --quantization int8 or none)")
    return quantization


def read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, weights and tokenizer of a Hugging Face model directory."""
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} is not a model directory: it has no config.json")
    try:
        config = ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_file} is invalid: {e}") from None
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            merged = tuple(dict.fromkeys([*config.eos_token_ids, *ids]))
            config = ModelConfig(**{**config.__dict__, "eos_token_ids": merged})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return config, weights, Tokenizer.from_hf_dir(path)


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_positions: int | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load any supported model (registered name, GGUF file or HF directory) ready to run.

    quantization "auto" keeps a GGUF file's own formats where the kernels run (CPU,
    float32) and dequantizes otherwise; "gguf", "int8" and "none" as in the module doc.
    A dequantized GGUF is dequantized once; later loads map the cached fp32 weights
    (see cache.py); the quantized paths never touch that cache.
    """
    path = resolve_model(name_or_path)
    quantization = _resolve_quantization(quantization, path, torch.device(device), dtype)
    if path.is_dir():
        config, hf_weights, tokenizer = read_hf_dir(path)
    else:
        gg = read_gguf_file(path)
        config = _gguf_config(path, gg)
        tokenizer = Tokenizer.from_gguf_fields(gg.fields)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = ModelConfig(**{**config.__dict__, "eos_token_ids": (tokenizer.eos_token_id,)})
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    try:
        if quantization == "gguf":
            state = _gguf_quantized_state(path, gg, config)
        elif path.is_dir():  # cast before fusing, so each weight is copied at most once
            state = fuse_hf_weights(config, {k: v.to(device, dtype) for k, v in hf_weights.items()})
        else:
            state = {k: v.to(device, dtype) for k, v in _gguf_state(path, gg, config).items()}
        if quantization == "int8":
            state = _quantize_int8(state)
        model.load_weights(state)
    except ModelError:
        raise
    except ValueError as e:
        raise ModelError(f"{path}: weights do not match the config: {e}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(config, model, tokenizer, path)
