"""Simulated quantization error of a model's own tensors, per preset, role and depth.

For every quantizable tensor we take a deterministic sample of rows (or all rows with `exact`), run
each GGML type the presets would give that tensor through our byte-exact quantizers, dequantize, and
keep per-row sums of squared error and squared signal (plain, and weighted by the imatrix column
values when one is given). Presets are then aggregated from those per-row sums without quantizing
anything twice: most presets share most (tensor, type) pairs.

Rows are the sampling unit because ggml quantizes rows independently (the legacy imatrix paths even
use whole-row statistics), so a sampled row's error is exactly the error it has in the full pass.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from predictor import quant
from predictor.errors import InputFileError
from predictor.io.base import ModelReader, TensorInfo
from predictor.quant import recipes

FLOAT_TYPES = {"F32", "F16", "BF16"}
ROLES = [
    "token_embd",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "output",
    "other",
]
DEFAULT_SAMPLE_WEIGHTS = 32_768  # per tensor: rows = ceil(this / cols)
N_DEPTH_BUCKETS = 4


def tensor_role(name: str) -> str:
    """Role of a GGUF tensor name as the recipes see it, but with fused QKV reported on its own."""
    return "attn_qkv" if "attn_qkv." in name else recipes.tensor_role(name)


@dataclass
class RowErrors:
    """Per sampled row sums for one (tensor, GGML type)."""

    err: np.ndarray  # sum_j (xq - x)^2 per row, float64
    weighted_err: np.ndarray | None  # sum_j w_j (xq - x)^2, w = imatrix column values


@dataclass
class TensorSample:
    info: TensorInfo
    role: str
    layer: int | None
    rows_total: int
    rows: np.ndarray  # sampled row indices
    expand: np.ndarray  # per sampled row: how many rows of the tensor it stands for (1 = taken with certainty)
    signal: np.ndarray  # sum_j x^2 per sampled row
    weighted_signal: np.ndarray | None
    stats: dict  # distribution statistics of the sample
    errors: dict[str, RowErrors] = field(default_factory=dict)  # GGML type -> per-row sums


def sample_row_indices(name: str, n_rows: int, n_take: int, seed: int) -> np.ndarray:
    """Deterministic sorted sample of row indices, independent of tensor order (seeded by name)."""
    if n_take >= n_rows:
        return np.arange(n_rows)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n_rows, size=n_take, replace=False))


def compute_distribution_stats(x: np.ndarray, imatrix: np.ndarray | None) -> dict:
    """Statistics that matter for block quantization, on a (rows, cols) float32 sample."""
    x64 = x.astype(np.float64)
    mu = x64.mean()
    var = x64.var()
    std = float(np.sqrt(var))
    kurt = float(((x64 - mu) ** 4).mean() / var**2 - 3.0) if var > 0 else 0.0
    cols = x.shape[1]
    bs = 32 if cols % 32 == 0 else cols
    blocks = np.abs(x64).reshape(-1, bs)
    rms = np.sqrt((blocks**2).mean(axis=1))
    ok = rms > 0
    block_max_over_rms = float((blocks.max(axis=1)[ok] / rms[ok]).mean()) if ok.any() else 0.0
    outlier_share = float((np.abs(x64 - mu) > 6 * std).mean()) if std > 0 else 0.0
    stats = {
        "std": std,
        "kurtosis": kurt,
        "block_max_over_rms": block_max_over_rms,
        "outlier_share": outlier_share,
        "max_abs": float(np.abs(x64).max()),
    }
    if imatrix is not None:
        v = np.sort(imatrix.astype(np.float64))[::-1]
        total = v.sum()
        top = max(1, int(np.ceil(0.01 * len(v))))
        stats["imatrix_top1pct_share"] = float(v[:top].sum() / total) if total > 0 else 0.0
        med = float(np.median(v))
        stats["imatrix_max_over_median"] = float(v[0] / med) if med > 0 else float("inf")
    return stats


def _imatrix_for(imatrix, info: TensorInfo) -> np.ndarray | None:
    """The (n_mat, cols) importance values for a tensor (one row per expert), None without an entry."""
    if imatrix is None or info.name not in imatrix.entries:
        return None
    n_mat = imatrix.entries[info.name].size // info.cols
    return np.stack([imatrix.vector(info.name, e, cols=info.cols) for e in range(n_mat)])


def _stratified_rows(reader, info, imat, rows_per_mat, n_take, seed, chunk_rows):
    """Rows for the imatrix-weighted estimate: the half of the sample with the largest weighted signal
    sum_j w_j x_ij^2 is taken with certainty, the other half at random from the remaining rows.

    Activations concentrate on a few input columns, so a few rows (large weights on those columns)
    carry most of the weighted signal and error; a plain random sample misses them and overstates
    the weighted error several-fold. Finding them costs one streaming read of the tensor."""
    rows_total = info.rows
    ws = np.empty(rows_total)
    for start in range(0, rows_total, chunk_rows):
        part = np.arange(start, min(rows_total, start + chunk_rows))
        x = reader.read_rows(info.name, part).astype(np.float64)
        ws[part] = ((x * x) * imat[part // rows_per_mat]).sum(axis=1)
    n_certain = n_take // 2
    certain = np.sort(np.argsort(-ws, kind="stable")[:n_certain])
    rest = np.setdiff1d(np.arange(rows_total), certain)
    picked = rest[sample_row_indices(info.name, len(rest), n_take - n_certain, seed)]
    idx = np.concatenate([certain, picked])
    expand = np.concatenate([np.ones(n_certain), np.full(len(picked), len(rest) / len(picked))])
    order = np.argsort(idx)
    return idx[order], expand[order]


def sample_tensor(
    reader: ModelReader,
    info: TensorInfo,
    types: Iterable[str],
    *,
    imatrix=None,
    sample_weights: int | None = DEFAULT_SAMPLE_WEIGHTS,
    seed: int = 0,
    chunk_rows: int = 256,
) -> TensorSample:
    """Quantize a sample of one tensor's rows to each of `types` and keep per-row error sums.

    `sample_weights=None` means every row (the exact pass), read and quantized in chunks so memory
    stays bounded by `chunk_rows` rows."""
    rows_total = info.rows
    cols = info.cols
    n_take = rows_total if sample_weights is None else max(1, -(-sample_weights // cols))
    imat = _imatrix_for(imatrix, info)
    rows_per_mat = rows_total // (imat.shape[0] if imat is not None else 1)
    if imat is not None and n_take < rows_total:
        idx, expand = _stratified_rows(reader, info, imat, rows_per_mat, n_take, seed, chunk_rows)
    else:
        idx = sample_row_indices(info.name, rows_total, n_take, seed)
        expand = np.full(len(idx), rows_total / len(idx))
    types = [t for t in dict.fromkeys(types) if t != info.dtype]

    signal, wsignal = [], []
    errs: dict[str, list] = {t: [] for t in types}
    werrs: dict[str, list] = {t: [] for t in types}
    stats_sample = None
    for start in range(0, len(idx), chunk_rows):
        part = idx[start : start + chunk_rows]
        x = reader.read_rows(info.name, part)
        if not np.isfinite(x).all():
            raise InputFileError(
                info.file,
                f"tensor {info.source_name} contains NaN or Inf weights",
                "repair or re-export the checkpoint (llama-quantize rejects such tensors too)",
            )
        if stats_sample is None:
            stats_sample = x[: max(1, -(-DEFAULT_SAMPLE_WEIGHTS // cols))]
        x2 = x.astype(np.float64) ** 2
        signal.append(x2.sum(axis=1))
        # Rows of different experts use that expert's imatrix slice.
        mats = part // rows_per_mat if imat is not None else np.zeros(len(part), dtype=np.int64)
        w = imat[mats] if imat is not None else None
        if w is not None:
            wsignal.append((x2 * w).sum(axis=1))
        for t in types:
            xq = np.empty_like(x)
            for m in np.unique(mats):
                sel = mats == m
                vec = imat[m] if imat is not None else None
                q = quant.quantize(np.ascontiguousarray(x[sel]), t, imatrix=vec)
                xq[sel] = quant.dequantize(q, t, cols=cols)
            e2 = (xq.astype(np.float64) - x) ** 2
            errs[t].append(e2.sum(axis=1))
            if w is not None:
                werrs[t].append((e2 * w).sum(axis=1))

    stats = compute_distribution_stats(stats_sample, None if imat is None else imat.mean(axis=0))
    sample = TensorSample(
        info=info,
        role=tensor_role(info.name),
        layer=recipes.layer_of(info.name),
        rows_total=rows_total,
        rows=idx,
        expand=expand,
        signal=np.concatenate(signal),
        weighted_signal=np.concatenate(wsignal) if imat is not None else None,
        stats=stats,
    )
    for t in types:
        sample.errors[t] = RowErrors(
            err=np.concatenate(errs[t]),
            weighted_err=np.concatenate(werrs[t]) if imat is not None else None,
        )
    return sample


@dataclass
class ErrorSummary:
    """Relative RMSE = sqrt(sum err^2 / sum x^2) over a group of tensors, with its sampling error."""

    rel_rmse: float
    rel_rmse_se: float  # standard error from row sampling (0 for an exact pass)
    weighted_rel_rmse: float | None
    n_weights: int

    def as_dict(self) -> dict:
        return {
            "rel_rmse": self.rel_rmse,
            "rel_rmse_se": self.rel_rmse_se,
            "weighted_rel_rmse": self.weighted_rel_rmse,
            "n_weights": self.n_weights,
        }


def summarize(parts: list[tuple[TensorSample, str]]) -> ErrorSummary | None:
    """Aggregate (sample, type) pairs into one ratio estimate, scaling each sample to its tensor.

    The ratio R = sum(err)/sum(signal) is estimated from sampled rows, each expanded by the number of
    rows it stands for; its variance comes from the per-row residuals err - R*signal of the randomly
    drawn rows (the ratio-estimator formula with the finite-population correction), so rows taken
    with certainty, and an exact pass, add none."""
    if not parts:
        return None
    tot_e = tot_s = tot_we = tot_ws = 0.0
    n_weights = 0
    for s, t in parts:
        f = s.expand
        tot_s += f @ s.signal
        n_weights += s.rows_total * s.info.cols
        # The weighted error covers only tensors the imatrix has entries for (not token_embd).
        if s.weighted_signal is not None:
            tot_ws += f @ s.weighted_signal
        if t is None:  # kept at source precision: no error
            continue
        e = s.errors[t]
        tot_e += f @ e.err
        if e.weighted_err is not None:
            tot_we += f @ e.weighted_err
    if tot_s <= 0:
        return ErrorSummary(0.0, 0.0, None, n_weights)
    ratio = tot_e / tot_s
    var_total = 0.0
    for s, t in parts:
        rand = s.expand > 1  # rows taken with certainty add no sampling variance
        n = int(rand.sum())
        if n < 2:
            continue
        n_pop = s.expand[rand].sum()
        err = s.errors[t].err[rand] if t is not None else np.zeros(n)
        d = err - ratio * s.signal[rand]
        var_total += n_pop**2 * (1 - n / n_pop) * d.var(ddof=1) / n
    se_ratio = np.sqrt(var_total) / tot_s
    rel = float(np.sqrt(ratio))
    rel_se = float(se_ratio / (2 * rel)) if rel > 0 else 0.0
    wrel = float(np.sqrt(tot_we / tot_ws)) if tot_ws > 0 else None
    return ErrorSummary(rel, rel_se, wrel, n_weights)


def depth_bucket(layer: int | None, n_layers: int | None) -> str | None:
    """Which quarter of the network a layer is in, as 'first..last' layer range."""
    if layer is None or not n_layers:
        return None
    k = min(N_DEPTH_BUCKETS - 1, layer * N_DEPTH_BUCKETS // n_layers)
    lo = -(-k * n_layers // N_DEPTH_BUCKETS)
    hi = -(-(k + 1) * n_layers // N_DEPTH_BUCKETS) - 1
    return f"layers {lo}-{hi}"


def summarize_preset(
    samples: list[TensorSample], tensor_types: dict[str, str], n_layers: int | None
) -> dict:
    """Overall, per-role and per-depth error of one preset (its per-tensor GGML types given)."""
    parts, by_role, by_depth = [], {}, {}
    for s in samples:
        t = tensor_types.get(s.info.name)
        t = None if t is None or t == s.info.dtype else t
        pair = (s, t)
        parts.append(pair)
        by_role.setdefault(s.role, []).append(pair)
        bucket = depth_bucket(s.layer, n_layers)
        if bucket is not None:
            by_depth.setdefault(bucket, []).append(pair)
    overall = summarize(parts)
    return {
        "overall": overall,
        "by_role": {r: summarize(p) for r, p in sorted(by_role.items(), key=lambda kv: ROLES.index(kv[0]))},
        "by_depth": {d: summarize(p) for d, p in by_depth.items()},
    }


def sample_model(
    reader: ModelReader,
    tensors: list[TensorInfo],
    types_per_tensor: dict[str, set[str]],
    *,
    imatrix=None,
    sample_weights: int | None = DEFAULT_SAMPLE_WEIGHTS,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[TensorSample]:
    """Sample every tensor once for all the GGML types any preset gives it. Streams tensor by tensor."""
    out = []
    for i, info in enumerate(tensors):
        if progress:
            progress(i, len(tensors), info.name)
        out.append(
            sample_tensor(
                reader,
                info,
                sorted(types_per_tensor.get(info.name, ())),
                imatrix=imatrix,
                sample_weights=sample_weights,
                seed=seed,
            )
        )
    if progress:
        progress(len(tensors), len(tensors), "")
    return out
