"""A small Llama-architecture language model in torch, in llama.cpp's native weight layout.

RMSNorm, rotary embeddings, SwiGLU feed-forward, grouped-query attention, untied output matrix.
RoPE rotates adjacent pairs (x[2i], x[2i+1]) — llama.cpp's "normal" rope for arch "llama" — so the
Q/K weights export as they are: no row permutation (convert_hf_to_gguf permutes only because HF
checkpoints rotate the two halves of each head instead).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from predictor.errors import UsageError
from predictor.family.tokenizer import N_VOCAB

__all__ = ["ModelConfig", "FamilyLM", "count_params"]


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 768
    n_vocab: int = N_VOCAB
    n_ctx: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, *, kquant_sizes: bool = True) -> "ModelConfig":
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise UsageError(f"d_model {self.d_model}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "heads must divide d_model (even head size) and kv heads must divide heads")
        if kquant_sizes and (self.d_model % 256 or self.d_ff % 256):
            raise UsageError(f"d_model {self.d_model} and d_ff {self.d_ff} must be multiples of 256 "
                             "so every K-quant applies")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown model setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_ctx: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); rotates pairs (x[2i], x[2i+1]) by position * base^(-2i/hd)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate = nn.Linear(d, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(d, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv  # query head j reads kv head j // rep, as llama.cpp does
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class FamilyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embd = nn.Embedding(cfg.n_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.out_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.n_vocab, bias=False)
        cos, sin = rope_tables(cfg.n_ctx, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init(cfg.init_std)

    def _init(self, std: float) -> None:
        # GPT-2 style: residual-output projections scaled down by depth
        for name, p in self.named_parameters():
            if p.ndim == 2:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)

    def forward(self, idx):
        x = self.tok_embd(idx)
        for b in self.blocks:
            x = b(x, self.rope_cos, self.rope_sin)
        return self.output(self.out_norm(x))

    def gguf_tensors(self) -> dict[str, "torch.Tensor"]:
        """Parameters under llama.cpp's tensor names, in llama.cpp's order, as float32 CPU tensors."""
        sd = {"token_embd.weight": self.tok_embd.weight}
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}."
            sd |= {p + "attn_norm.weight": b.attn_norm.weight, p + "attn_q.weight": b.wq.weight,
                   p + "attn_k.weight": b.wk.weight, p + "attn_v.weight": b.wv.weight,
                   p + "attn_output.weight": b.wo.weight, p + "ffn_norm.weight": b.ffn_norm.weight,
                   p + "ffn_gate.weight": b.w_gate.weight, p + "ffn_up.weight": b.w_up.weight,
                   p + "ffn_down.weight": b.w_down.weight}
        sd |= {"output_norm.weight": self.out_norm.weight, "output.weight": self.output.weight}
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def count_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * (cfg.n_heads * hd * 2 + cfg.n_kv_heads * hd * 2) + 3 * d * cfg.d_ff + 2 * d
    return 2 * cfg.n_vocab * d + cfg.n_layers * per_layer + d
