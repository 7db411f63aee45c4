"""The Llama-family transformer (Llama, SmolLM2, Qwen2, Qwen3) in plain PyTorch.

The network takes a flat batch of tokens (all sequences of a step concatenated)
with their positions, and leaves attention to a pluggable function, so the same
weights serve a dense reference and the engine's paged KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmos.models import quant
from llmos.models.config import ModelConfig
from llmos.models.quant import QuantizedEmbedding, QuantizedLinear, QuantWeight


class Attention(Protocol):
    """Attention over a flat batch: q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class DenseCausalAttention:
    """Attention for one sequence with no cache: the reference the paged path must equal."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        group = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1),
            is_causal=True,
        )
        return out.transpose(0, 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout of Hugging Face checkpoints."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.build()

    def build(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables on a device (default: the ambient one).

        The tables are computed on the CPU and then moved, even for a meta-device
        build: meta arange imports torch._dynamo (~1.5 s of every load).
        """
        device = torch.empty(()).device if device is None else device
        d, cpu = self.head_dim, torch.device("cpu")
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=cpu) / d))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float64, device=cpu), inv_freq)
        self.register_buffer("cos", freqs.cos().float().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().float().to(device), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rotation, gathered once for every layer: cos and signed sin, [T, 1, D].

        With them a rotation is x * cos + roll(x, D/2) * sin, four ops on the whole of x.
        """
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)

    def forward(self, tables: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, D] (any number of heads) by the positions `tables` came from."""
        cos, sin = tables
        xf = x if x.dtype == torch.float32 else x.float()
        rotated = xf * cos + xf.roll(self.head_dim // 2, -1) * sin
        return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.nq, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.nq + 2 * self.nkv) * self.hd
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nq * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False  # set by LlamaForCausalLM.load_weights: see fusable()

    def fusable(self) -> bool:
        """Whether the quantized kernels can run this layer's work around attention in two calls.

        They can when every product is a QuantizedLinear (a bias only on q/k/v) and there is
        no q/k norm; they then compute what forward's operations do, row by row.
        """
        products = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        return (self.q_norm is None and all(isinstance(p, QuantizedLinear) for p in products)
                and all(p.bias is None for p in products[1:]) and quant.available())

    def forward(
        self, x: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor], rope: RotaryEmbedding,
        attn: Attention,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._fused_forward(x.contiguous(), rope_tables, attn)
        qkv = self.qkv_proj(self.input_layernorm(x)).view(t, self.nq + 2 * self.nkv, self.hd)
        if self.q_norm is None:  # q and k rotate together: one set of ops for both
            qk = rope(rope_tables, qkv[:, : self.nq + self.nkv])
            q, k = qk[:, : self.nq], qk[:, self.nq :]
        else:
            q = rope(rope_tables, self.q_norm(qkv[:, : self.nq]))
            k = rope(rope_tables, self.k_norm(qkv[:, self.nq : self.nq + self.nkv]))
        o = attn(self.index, q, k, qkv[:, self.nq + self.nkv :]).reshape(t, self.nq * self.hd)
        x = x + self.o_proj(o)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def _fused_forward(self, x: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor],
                       attn: Attention) -> torch.Tensor:
        """forward's operations in two kernel calls around attention."""
        t, nq, nkv = x.shape[0], self.nq, self.nkv
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv = quant.fused_norm_qkv(x, norm1.weight, norm1.eps, self.qkv_proj, rope_tables, nq + nkv,
                                   self.hd).view(t, nq + 2 * nkv, self.hd)
        o = attn(self.index, qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :])
        return quant.fused_out_mlp(x, o.reshape(t, nq * self.hd).contiguous(), self.o_proj, norm2.weight,
                                   norm2.eps, self.gate_up_proj, self.down_proj)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        # Passing the weight in keeps a meta-device build from calling normal_, whose meta
        # kernel imports torch._dynamo (~1.5 s of every load_model).
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size)  # on the ambient device
        if not embedding.is_meta:
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings
        )

    def tie_weights(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            self.lm_head = QuantizedLinear(self.embed_tokens.qweight)
        else:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention | None = None
    ) -> torch.Tensor:
        """Hidden states [T, H] of a flat token batch; logits come from compute_logits."""
        attn = attn or DenseCausalAttention()
        x = self.embed_tokens(input_ids)
        tables = self.rope.tables(positions)
        for layer in self.layers:
            x = layer(x, tables, self.rope, attn)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face parameter names, fusing q/k/v and gate/up projections."""
        self.load_weights(fuse_hf_weights(self.config, weights))

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load this model's own parameter names (as fuse_hf_weights returns them).

        A model built on the meta device adopts the tensors as they are (same dtype,
        device and memory, e.g. a safetensors memory map), so loading never holds two
        copies; a materialized model copies them into its parameters. A QuantWeight
        replaces its Linear or Embedding by the quantized module over the same blocks.
        """
        own = dict(self.named_parameters())  # a tied lm_head is listed once, as embed_tokens
        missing = sorted(set(own) - set(state))
        unknown = sorted(set(state) - set(own) - {"lm_head.weight"})
        if missing or unknown:
            raise ValueError(f"checkpoint lacks weights {missing[:5]} or has unknown ones {unknown[:5]}")
        for name, param in own.items():
            tensor = state[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                )
            module_name, _, attr = name.rpartition(".")
            if isinstance(tensor, QuantWeight):
                self._quantize_module(module_name, tensor)
            elif param.is_meta:
                setattr(self.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
            else:
                param.copy_(tensor)
        self.tie_weights()
        for layer in self.layers:
            layer.fused = layer.fusable()
        device = self.norm.weight.device
        if self.rope.cos.device != device:
            self.rope.build(device)


    def _quantize_module(self, name: str, weight: QuantWeight) -> None:
        module = self.get_submodule(name)
        if isinstance(module, nn.Embedding):
            quantized: nn.Module = QuantizedEmbedding(weight)
        elif isinstance(module, nn.Linear):
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            quantized = QuantizedLinear(weight, bias)
        else:
            raise ValueError(f"weight {name} cannot be quantized ({type(module).__name__})")
        parent, _, attr = name.rpartition(".")
        setattr(self.get_submodule(parent), attr, quantized)


def fuse_hf_weights(
    cfg: ModelConfig,
    weights: dict[str, torch.Tensor],
    cat: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat,
) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names -> this model's, concatenating q/k/v and gate/up with `cat`.

    Unfused tensors are passed through untouched (no copy). A tied lm_head is left out.
    """
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    out: dict[str, torch.Tensor] = {}

    def need(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"checkpoint lacks weight {name}")
        return weights[name]

    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [weights.get(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"]
            if kind == "weight" or cfg.attention_bias:
                out[f"{p}qkv_proj.{kind}"] = cat([need(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"])
            elif any(t is not None for t in parts):
                raise ValueError(f"checkpoint has q/k/v biases in layer {i} but the config has none")
        gate, up = need(f"{p}mlp.gate_proj.weight"), need(f"{p}mlp.up_proj.weight")
        out[f"{p}gate_up_proj.weight"] = cat([gate, up])
        out[f"{p}o_proj.weight"] = need(f"{p}self_attn.o_proj.weight")
        out[f"{p}down_proj.weight"] = need(f"{p}mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = need(f"{p}{norm}.weight")
        if cfg.qk_norm:
            out[f"{p}q_norm.weight"] = need(f"{p}self_attn.q_norm.weight")
            out[f"{p}k_norm.weight"] = need(f"{p}self_attn.k_norm.weight")
    out["embed_tokens.weight"] = need("embed_tokens.weight")
    out["norm.weight"] = need("norm.weight")
    if not cfg.tie_word_embeddings:
        # A checkpoint without lm_head shares the embedding (some Qwen2 exports do).
        out["lm_head.weight"] = weights.get("lm_head.weight", out["embed_tokens.weight"])
    return out
