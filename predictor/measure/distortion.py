"""KL divergence, top-1 agreement and perplexity of a quantized model against its base.

All statistics are per token: for each scored position we keep four numbers (KLD, same top-1,
base NLL, quant NLL), never the logits, so memory is bounded by one window of logits.

    KLD_t = sum_v p_base(v) * (log p_base(v) - log p_quant(v))      (natural log, like llama-perplexity)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from predictor.errors import MismatchError

__all__ = ["log_softmax", "kl_divergence", "token_stats", "DistortionAccumulator", "summarize_tokens"]


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Row-wise log-softmax in float64 accumulation, returned as `dtype` (n, vocab): float32 keeps
    a window of a large vocabulary small; float64 keeps KLDs of ~1e-5 exact."""
    x = np.asarray(logits, dtype=np.float32 if dtype == np.float32 else np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    lse = np.log(np.exp(z.astype(np.float64)).sum(axis=-1, keepdims=True))
    return (z - lse).astype(dtype)


def kl_divergence(base_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-row KL(base || quantized) from log-probs, in float64; rounding's -1e-9 clipped to 0."""
    b = base_logp.astype(np.float64)
    return np.maximum((np.exp(b) * (b - logp)).sum(axis=-1), 0.0)


def token_stats(base_logp: np.ndarray, quant_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token KLD, same-top-1, NLLs from base log-probs (n, V) and quantized logits (n, V)."""
    if base_logp.shape != quant_logits.shape:
        raise MismatchError(
            f"base and quantized logits differ in shape {base_logp.shape} vs {quant_logits.shape} — "
            "the two models must share the vocabulary and the scored tokens"
        )
    q = log_softmax(quant_logits)
    kld = kl_divergence(base_logp, q)
    idx = np.arange(len(targets))
    return {
        "kld": kld,
        "same_top1": base_logp.argmax(axis=-1) == q.argmax(axis=-1),
        "nll_base": -base_logp[idx, targets].astype(np.float64),
        "nll_quant": -q[idx, targets].astype(np.float64),
        "top1_quant_correct": q.argmax(axis=-1) == targets,
    }


@dataclass
class DistortionAccumulator:
    """Collects per-token statistics across windows of one data set."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, stats: dict[str, np.ndarray]) -> None:
        for k, v in stats.items():
            self.parts.setdefault(k, []).append(np.asarray(v))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


def summarize_tokens(a: dict[str, np.ndarray]) -> dict[str, float]:
    """Summary statistics (the distortion table's metrics) of per-token arrays."""
    kld = np.asarray(a.get("kld", ()), dtype=np.float64)
    n = int(kld.size)
    if n == 0:
        return {"n_tokens": 0}
    nb = np.asarray(a["nll_base"], dtype=np.float64)
    nq = np.asarray(a["nll_quant"], dtype=np.float64)
    same = np.asarray(a["same_top1"], dtype=np.float64)
    ppl_b = math.exp(nb.mean())
    ppl_q = math.exp(nq.mean())
    sd = lambda x: float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    # ln(PPL_q / PPL_b) = mean(nq - nb): its paired standard error is that of the mean difference
    d = nq - nb
    return {
        "n_tokens": n,
        "kld_mean": float(kld.mean()),
        "kld_mean_stderr": sd(kld),
        "kld_median": float(np.median(kld)),
        "kld_p90": float(np.quantile(kld, 0.90)),
        "kld_p99": float(np.quantile(kld, 0.99)),
        "kld_max": float(kld.max()),
        "same_top_p_pct": 100.0 * float(same.mean()),
        "same_top_p_pct_stderr": 100.0 * sd(same),
        "ppl_base": ppl_b,
        "ppl_base_stderr": ppl_b * sd(nb),
        "ppl": ppl_q,
        "ppl_stderr": ppl_q * sd(nq),
        "delta_ppl": ppl_q - ppl_b,
        "ln_ppl_ratio": float(d.mean()),
        "ln_ppl_ratio_stderr": sd(d),
    }
