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

__all__ = ["Gemma3Numpy", "LlamaNumpy", "compute_imatrix", "numpy_model"]

_SUPPORTED_ARCHS = ("llama", "gemma3")


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


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


class Gemma3Numpy(LlamaNumpy):
    """Gemma 3 as llama.cpp runs it: embeddings x sqrt(d); RMSNorm before and after attention and FFN;
    RMSNorm of each q/k head; NEOX RoPE with base 10000 on sliding-window layers (il % 6 < 5) and
    the model's base on the others; attention scale 1/sqrt(head_dim); GELU(tanh)-gated FFN.
    Sequences must be no longer than the sliding window (then every layer attends to all of them)."""

    def __init__(self, model):
        kv = model.kv
        if model.metadata.architecture != "gemma3":
            raise UnsupportedError(f"{model.path}: not a gemma3 model")
        self.m = model
        self.n_layers = int(kv["gemma3.block_count"])
        self.n_head = int(kv["gemma3.attention.head_count"])
        self.n_kv = int(kv.get("gemma3.attention.head_count_kv", self.n_head))
        self.hidden = int(kv["gemma3.embedding_length"])
        self.head_dim = int(kv.get("gemma3.attention.key_length", self.hidden // self.n_head))
        self.n_rot = self.head_dim
        self.eps = float(kv.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6))
        self.base_global = float(kv.get("gemma3.rope.freq_base", 1e6))
        self.base_local = float(kv.get("gemma3.rope.freq_base_swa", 10000.0))
        self.window = int(kv.get("gemma3.attention.sliding_window", 0) or 0)
        if "gemma3.final_logit_softcapping" in kv or "gemma3.attention.sliding_window_pattern" in kv:
            raise UnsupportedError(f"{model.path}: logit soft-capping / custom SWA patterns are not implemented")
        self._cache = {}

    def _rope_neox(self, x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
        half = self.n_rot // 2
        inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.n_rot)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        a, b = x[..., :half], x[..., half:self.n_rot]
        out = x.copy()
        out[..., :half] = a * cos - b * sin
        out[..., half:self.n_rot] = a * sin + b * cos
        return out

    def forward(self, tokens, *, collect=None, logits: bool = True):
        toks = np.asarray(tokens, dtype=np.int64)
        n = len(toks)
        if self.window and n > self.window:
            raise UsageError(f"sequences for the gemma3 forward pass must be at most {self.window} tokens")
        pos = np.arange(n)
        x = self.m.read_rows("token_embd.weight", toks).astype(np.float32) * np.float32(np.sqrt(self.hidden))
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = self.n_head // self.n_kv
        scale = np.float32(1.0 / np.sqrt(self.head_dim))
        for i in range(self.n_layers):
            b = f"blk.{i}."
            base = self.base_local if (self.window and i % 6 < 5) else self.base_global
            h = self._rms(x, self.w(b + "attn_norm.weight"))
            if collect:
                for nm in ("attn_q", "attn_k", "attn_v"):
                    collect(b + nm + ".weight", h)
            q = (h @ self.w(b + "attn_q.weight").T).reshape(n, self.n_head, self.head_dim)
            k = (h @ self.w(b + "attn_k.weight").T).reshape(n, self.n_kv, self.head_dim)
            v = (h @ self.w(b + "attn_v.weight").T).reshape(n, self.n_kv, self.head_dim)
            q = self._rope_neox(self._rms(q, self.w(b + "attn_q_norm.weight")), pos, base) * scale
            k = self._rope_neox(self._rms(k, self.w(b + "attn_k_norm.weight")), pos, base)
            att = np.empty((n, self.n_head, self.head_dim), dtype=np.float32)
            for hd in range(self.n_head):
                kh = hd // group
                s = q[:, hd, :] @ k[:, kh, :].T + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hd, :] = s @ v[:, kh, :]
            a = att.reshape(n, self.n_head * self.head_dim)
            if collect:
                collect(b + "attn_output.weight", a)
            o = a @ self.w(b + "attn_output.weight").T
            x = x + self._rms(o, self.w(b + "post_attention_norm.weight"))
            h = self._rms(x, self.w(b + "ffn_norm.weight"))
            if collect:
                collect(b + "ffn_gate.weight", h)
                collect(b + "ffn_up.weight", h)
            act = _gelu_tanh(h @ self.w(b + "ffn_gate.weight").T) * (h @ self.w(b + "ffn_up.weight").T)
            if collect:
                collect(b + "ffn_down.weight", act)
            f = act @ self.w(b + "ffn_down.weight").T
            x = x + self._rms(f, self.w(b + "post_ffw_norm.weight"))
        if not logits:
            return None
        h = self._rms(x, self.w("output_norm.weight"))
        out_name = "output.weight" if "output.weight" in self.m else "token_embd.weight"
        return h @ self.w(out_name).T


def numpy_model(model) -> LlamaNumpy:
    """The numpy forward pass for this model's architecture (llama or gemma3)."""
    arch = model.metadata.architecture
    if arch == "gemma3":
        return Gemma3Numpy(model)
    return LlamaNumpy(model)


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
    net = numpy_model(model)
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


def default_calibration_text(items_dir=None) -> str:
    """Calibration text kept apart from every suite's evaluation text: the prose and code passages
    12..23 of the item files (suites use the first 12 at most)."""
    from predictor.measure.items import load_items

    parts = [it["text"] for name in ("prose", "code") for it in load_items(name, items_dir)[12:24]]
    return "\n\n".join(parts)


def make_imatrix(
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    text: str | None = None,
    dataset: str = "quantpredict default calibration (eval_items prose/code 12-23)",
    chunk_tokens: int = 512,
    max_chunks: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Tokenize calibration text with llama.cpp, run our forward pass, write the imatrix; returns its path."""
    from predictor.io.gguf import open_gguf
    from predictor.measure.engine import Engine

    text = default_calibration_text() if text is None else text
    with Engine(base_path, n_ctx=64, n_threads=1) as eng:
        toks = eng.tokenize(text)
        bos = [eng.bos] if eng.add_bos else []
    body = chunk_tokens - len(bos)
    chunks = [bos + toks[i:i + body] for i in range(0, len(toks) - body + 1, body)]
    if max_chunks:
        chunks = chunks[:max_chunks]
    if not chunks:
        raise UsageError(f"calibration text is shorter than one chunk of {chunk_tokens} tokens")
    with open_gguf(base_path) as model:
        compute_imatrix(model, chunks, out_path, dataset=dataset, progress=progress)
    return os.fspath(out_path)
