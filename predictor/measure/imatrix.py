"""Our own importance matrices: mean squared input activation per column of every weight matrix.

llama-cpp-python does not expose activations, so for llama-architecture models we run the forward
pass ourselves in numpy from the (dequantized) GGUF weights — RMSNorm, RoPE (llama.cpp's "normal"
mode: adjacent pairs, as the GGUF weights are permuted for it), causal grouped-query attention,
SwiGLU — on calibration text tokenized by llama.cpp, and accumulate what llama-imatrix accumulates:
for each matrix W used as `W @ x`, the sum over tokens of x**2 per column, and the token count.
`forward_logits` is the same pass returning logits, so it can be checked against llama.cpp.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from predictor.errors import UnsupportedError, UsageError
from predictor.io.imatrix import write_imatrix_gguf

__all__ = ["LlamaNumpy", "compute_imatrix"]

_SUPPORTED_ARCHS = ("llama",)


class LlamaNumpy:
    """Float32 numpy forward pass of a llama GGUF (weights read lazily, one layer at a time)."""

    def __init__(self, model):
        arch = model.metadata.architecture
        if arch not in _SUPPORTED_ARCHS:
            raise UnsupportedError(
                f"{model.path}: our imatrix forward pass supports {', '.join(_SUPPORTED_ARCHS)}, not {arch} — "
                "pass an imatrix made by llama-imatrix instead"
            )
        kv = model.kv
        self.m = model
        self.n_layers = int(kv["llama.block_count"])
        self.n_head = int(kv["llama.attention.head_count"])
        self.n_kv = int(kv.get("llama.attention.head_count_kv", self.n_head))
        self.hidden = int(kv["llama.embedding_length"])
        self.head_dim = self.hidden // self.n_head
        self.n_rot = int(kv.get("llama.rope.dimension_count", self.head_dim))
        self.eps = float(kv.get("llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.base = float(kv.get("llama.rope.freq_base", 10000.0))
        if any(k.startswith("llama.rope.scaling") and kv[k] not in ("none", 1.0, 0.0) for k in kv):
            raise UnsupportedError(f"{model.path}: RoPE scaling is not implemented in our forward pass")
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        x = self._cache.get(name)
        if x is None:
            x = self.m.read_tensor(name)
            self._cache[name] = x
        return x

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps)).astype(np.float32) * weight

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x (n, heads, head_dim); rotate adjacent pairs (2i, 2i+1) of the first n_rot dims."""
        half = self.n_rot // 2
        inv = self.base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.n_rot)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        out = x.copy()
        a, b = x[..., 0:self.n_rot:2], x[..., 1:self.n_rot:2]
        out[..., 0:self.n_rot:2] = a * cos - b * sin
        out[..., 1:self.n_rot:2] = a * sin + b * cos
        return out

    def forward(self, tokens, *, collect: Callable[[str, np.ndarray], None] | None = None,
                logits: bool = True) -> np.ndarray | None:
        """Logits (n, vocab) of one sequence starting at position 0; `collect(name, x)` sees the
        input rows x (n, cols) of every matrix product W @ x."""
        toks = np.asarray(tokens, dtype=np.int64)
        n = len(toks)
        pos = np.arange(n)
        emb = self.m.read_rows("token_embd.weight", toks)
        x = emb.astype(np.float32)
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = self.n_head // self.n_kv
        for i in range(self.n_layers):
            b = f"blk.{i}."
            h = self._rms(x, self.w(b + "attn_norm.weight"))
            for nm in ("attn_q", "attn_k", "attn_v"):
                if collect:
                    collect(b + nm + ".weight", h)
            q = (h @ self.w(b + "attn_q.weight").T).reshape(n, self.n_head, self.head_dim)
            k = (h @ self.w(b + "attn_k.weight").T).reshape(n, self.n_kv, self.head_dim)
            v = (h @ self.w(b + "attn_v.weight").T).reshape(n, self.n_kv, self.head_dim)
            q, k = self._rope(q, pos), self._rope(k, pos)
            att = np.empty((n, self.n_head, self.head_dim), dtype=np.float32)
            scale = np.float32(1.0 / np.sqrt(self.head_dim))
            for hd in range(self.n_head):
                kh = hd // group
                s = (q[:, hd, :] @ k[:, kh, :].T) * scale + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hd, :] = s @ v[:, kh, :]
            a = att.reshape(n, self.hidden)
            if collect:
                collect(b + "attn_output.weight", a)
            x = x + a @ self.w(b + "attn_output.weight").T
            h = self._rms(x, self.w(b + "ffn_norm.weight"))
            if collect:
                collect(b + "ffn_gate.weight", h)
                collect(b + "ffn_up.weight", h)
            g = h @ self.w(b + "ffn_gate.weight").T
            u = h @ self.w(b + "ffn_up.weight").T
            act = (g / (1.0 + np.exp(-g))) * u
            if collect:
                collect(b + "ffn_down.weight", act)
            x = x + act @ self.w(b + "ffn_down.weight").T
        if not logits:
            return None
        h = self._rms(x, self.w("output_norm.weight"))
        out_name = "output.weight" if "output.weight" in self.m else "token_embd.weight"
        return h @ self.w(out_name).T


def compute_imatrix(
    model,
    token_chunks: list[list[int]],
    out_path: str | os.PathLike,
    *,
    dataset: str,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run each chunk through the forward pass and write a GGUF imatrix (llama-imatrix's layout)."""
    if not token_chunks:
        raise UsageError("compute_imatrix needs at least one chunk of calibration tokens")
    net = LlamaNumpy(model)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def collect(name: str, x: np.ndarray) -> None:
        s = (x.astype(np.float64) ** 2).sum(axis=0)
        sums[name] = sums.get(name, 0.0) + s
        counts[name] = counts.get(name, 0) + x.shape[0]

    for k, chunk in enumerate(token_chunks):
        if progress:
            progress(k, len(token_chunks))
        net.forward(chunk, collect=collect, logits=False)
    write_imatrix_gguf(
        out_path,
        {n: s.astype(np.float32) for n, s in sums.items()},
        {n: np.array([c], dtype=np.float32) for n, c in counts.items()},
        chunk_count=len(token_chunks),
        chunk_size=max(len(c) for c in token_chunks),
        datasets=[dataset],
    )
