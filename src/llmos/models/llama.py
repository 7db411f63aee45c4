"""The Llama-family transformer (Llama, SmolLM2, Qwen2, Qwen3) in plain PyTorch.

The network takes a flat batch of tokens (all sequences of a step concatenated)
with their positions, and leaves attention to a pluggable function, so the same
weights serve a dense reference and the engine's paged KV cache.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmos.models.config import ModelConfig


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
        """(Re)compute the cos/sin tables, e.g. after the module was made on the meta device."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", freqs.cos().float().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().float().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        out = []
        for x in xs:
            x1, x2 = x.float().chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            out.append(rotated.to(x.dtype))
        return out


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

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, attn: Attention
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        q, k, v = qkv.split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(t, self.nq, self.hd)
        k = k.view(t, self.nkv, self.hd)
        v = v.view(t, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        o = attn(self.index, q, k, v).reshape(t, self.nq * self.hd)
        x = x + self.o_proj(o)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings
        )

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention | None = None
    ) -> torch.Tensor:
        """Hidden states [T, H] of a flat token batch; logits come from compute_logits."""
        attn = attn or DenseCausalAttention()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rope, attn)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face parameter names, fusing q/k/v and gate/up projections."""
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        own = dict(self.named_parameters())
        done: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own.get(name)
            if param is None or param.shape != tensor.shape:
                shape = None if param is None else tuple(param.shape)
                raise ValueError(f"weight {name}: expected shape {shape}, got {tuple(tensor.shape)}")
            param.copy_(tensor)
            done.add(name)

        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [weights.get(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"]
                if all(t is not None for t in parts):
                    put(f"{p}qkv_proj.{kind}", torch.cat(parts))
            gate, up = weights[f"{p}mlp.gate_proj.weight"], weights[f"{p}mlp.up_proj.weight"]
            put(f"{p}gate_up_proj.weight", torch.cat([gate, up]))
            put(f"{p}o_proj.weight", weights[f"{p}self_attn.o_proj.weight"])
            put(f"{p}down_proj.weight", weights[f"{p}mlp.down_proj.weight"])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                put(f"{p}{norm}.weight", weights[f"{p}{norm}.weight"])
            if self.config.qk_norm:
                put(f"{p}q_norm.weight", weights[f"{p}self_attn.q_norm.weight"])
                put(f"{p}k_norm.weight", weights[f"{p}self_attn.k_norm.weight"])
        put("embed_tokens.weight", weights["embed_tokens.weight"])
        put("norm.weight", weights["norm.weight"])
        if not self.config.tie_word_embeddings:
            head = weights.get("lm_head.weight", weights["embed_tokens.weight"])
            put("lm_head.weight", head)
        missing = set(own) - done - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks weights for {sorted(missing)[:5]}")
