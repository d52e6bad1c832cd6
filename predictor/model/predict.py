"""`predict(path, task=...)`: predicted accuracy drop at every llama.cpp preset, and a recommendation.

Tiers (what the prediction is based on):
- `config`: a config.json only (before any download). The type mix of every preset is exact (the
  recipes run on the tensor shapes the config implies); the weight error is the reference error of
  that mix on a synthetic sample, so the model's own weight statistics are unknown.
- `weights`: safetensors / GGUF weights. The simulated error of the model's own tensors
  (`inspect_model`, seeded row sample) replaces the reference error in Stage A.
- `weights+imatrix`: as `weights`, with the tensors quantized the way llama-quantize does with that
  imatrix (imatrix-aware recipes and quantizers) and the imatrix flag set.

The 80% interval width comes from cross-validation with whole models held out (whole families
held out when the model's family is not in the training data), calibrated on the llama.cpp-preset
rows. Almost all of those rows have no weights we can read, so the `weights` tiers do not get
narrower intervals than `config`: nothing yet shows that they deserve them (on the self-trained
family, weight error alone even ranked the models backwards; training_data/family/ANALYSIS.md).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from predictor.errors import InputFileError, UsageError
from predictor.io import detect_format, open_model
from predictor.io.hf import estimate_n_params
from predictor.model import quantspec as qs
from predictor.model.features import CATEGORY_PROXY, TASK_CATEGORIES
from predictor.quant.recipes import STANDARD_PRESETS, RecipeModel, get_preset

TASKS = TASK_CATEGORIES
DEFAULT_TOLERANCE = 3.0  # % relative drop
NOISE_FLOOR_PCT = 2.0  # |relative drop| a typical benchmark cannot tell apart from 0
COLLAPSE_KLD = 1.0  # mean KLD (nats) above which llama.cpp quants produce gibberish (IQ1_S: ~2.2)
DEFAULT_CONTEXT = 4096
OVERHEAD_BYTES = 512 * 2**20  # llama.cpp compute buffers + runtime at usual batch sizes
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# Presets that need an imatrix (or are only worth making with one): predicted only when one is given.
IMATRIX_PRESETS = ["IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                   "IQ1_M", "IQ1_S"]
_FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass
class PresetPrediction:
    preset: str
    drop_pct: float  # predicted relative drop, percent of the baseline score (positive = worse)
    drop_low: float  # 80% interval
    drop_high: float
    kld: float  # predicted mean KL divergence vs the unquantized model (nats/token)
    tensor_bytes: int
    bits_per_weight: float
    fits: bool | None  # None when no memory budget was given
    verdict: str


@dataclass
class Recommendation:
    preset: str | None
    reason: str


@dataclass
class PredictionResult:
    model: dict
    task: str
    tier: str
    predictions: list[PresetPrediction]
    recommendation: Recommendation

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "task": self.task,
            "tier": self.tier,
            "predictions": [asdict(p) for p in self.predictions],
            "recommendation": asdict(self.recommendation),
        }


def parse_memory(value: str | int | float | None) -> int | None:
    """'8GB', '8 GiB', '512MB', '16g', or a byte count -> bytes. GB and GiB both mean 2^30 bytes
    (memory is sold in binary units: an "8 GB" card holds 8 GiB)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not m:
        raise UsageError(f"cannot read memory size {value!r} — write it like 8GB, 24GiB or 512MB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    if m.group(2) == "" and m.group(3) is None:
        scale = 2**30  # a bare number means GiB
    n = float(m.group(1)) * scale
    if n <= 0:
        raise UsageError(f"memory must be positive, got {value!r}")
    return int(n)


def kv_cache_bytes(meta, context: int, kv_type: str) -> int | None:
    """K and V for every layer: 2 · layers · kv_heads · head_dim · context · bytes per element."""
    if kv_type not in KV_BYTES_PER_ELEMENT:
        raise UsageError(f"unknown KV cache type {kv_type!r}; valid: {', '.join(KV_BYTES_PER_ELEMENT)}")
    hd = meta.head_dim or (meta.hidden_size // meta.n_heads if meta.hidden_size and meta.n_heads else None)
    kv = meta.n_kv_heads or meta.n_heads
    if not (meta.n_layers and kv and hd):
        return None
    return int(2 * meta.n_layers * kv * hd * context * KV_BYTES_PER_ELEMENT[kv_type])


def check_task(task: str) -> list[str]:
    t = (task or "").strip().lower()
    if t == "all":
        return list(TASKS)
    if t not in TASKS:
        raise UsageError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}, all")
    return [t]


def verdict(drop: float, low: float, high: float, kld: float) -> str:
    if kld >= COLLAPSE_KLD:
        return "collapse risk"
    if high <= NOISE_FLOOR_PCT and low >= -NOISE_FLOOR_PCT:
        return "indistinguishable from baseline"
    if drop <= NOISE_FLOOR_PCT:
        return "likely within noise"
    if drop <= 5.0:
        return "minor loss"
    if drop <= 15.0:
        return "noticeable loss"
    return "severe loss"


def recommend(preds: list[PresetPrediction], tolerance: float) -> Recommendation:
    """Smallest file whose *point* prediction is within tolerance and that fits the budget.
    (Cross-validation: the point rule picks the measured best quant far more often than the
    interval's upper bound, which is too cautious at the current interval widths.)"""
    ok = [p for p in preds if p.drop_pct <= tolerance and p.fits is not False and p.verdict != "collapse risk"]
    if not ok:
        fitting = [p for p in preds if p.fits is not False]
        if not fitting:
            return Recommendation(None, "no preset fits the memory budget")
        return Recommendation(None, f"no preset that fits is predicted within {tolerance:g}% of baseline")
    best = min(ok, key=lambda p: (p.tensor_bytes, p.drop_pct))
    fit_note = " and fits the memory budget" if best.fits else ""
    return Recommendation(best.preset, (
        f"smallest preset whose predicted drop ({best.drop_pct:.1f}%, 80% interval {best.drop_low:.1f} to "
        f"{best.drop_high:.1f}) is within the {tolerance:g}% tolerance{fit_note}"))


_MODEL_CACHE: dict = {}


def _load(model_dir):
    from predictor.model.train import default_model_dir, load_model

    key = os.fspath(model_dir) if model_dir is not None else os.fspath(default_model_dir())
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(key)
    return _MODEL_CACHE[key]


def _registry() -> pl.DataFrame | None:
    from predictor.data import default_training_dir
    from predictor.data.store import read_table

    path = default_training_dir() / "registry.csv"
    if not path.is_file():
        return None
    return read_table(path, "registry")


def predict(
    path: str | os.PathLike,
    *,
    task: str = "math",
    imatrix: str | os.PathLike | bool | None = None,
    memory: str | int | None = None,
    context: int | None = None,
    kv_type: str = "f16",
    tolerance: float = DEFAULT_TOLERANCE,
    train_tokens: float | None = None,
    model_dir: str | os.PathLike | None = None,
    presets: list[str] | None = None,
    sample_weights: int = 8192,
    progress: Callable[[int, int, str], None] | None = None,
) -> PredictionResult | list[PredictionResult]:
    """Predicted drop per preset for `task` (a list of results for task='all').

    imatrix: path of an imatrix file (weights tiers), or True to assume one will be used (any tier).
    memory: budget for weights + KV cache at `context` tokens (+512 MiB runtime), e.g. '8GB'.
    train_tokens: pre-training tokens in trillions, when the registry does not know the model."""
    tasks = check_task(task)
    if kv_type not in KV_BYTES_PER_ELEMENT:
        raise UsageError(f"unknown KV cache type {kv_type!r}; valid: {', '.join(KV_BYTES_PER_ELEMENT)}")
    if train_tokens is not None and not (train_tokens > 0 and math.isfinite(train_tokens)):
        raise UsageError(f"train_tokens is in trillions and must be positive, got {train_tokens}")
    if context is not None and context < 1:
        raise UsageError(f"context must be a positive number of tokens, got {context}")
    if not math.isfinite(tolerance):
        raise UsageError(f"tolerance must be a number, got {tolerance}")
    budget = parse_memory(memory)
    pred = _load(model_dir)
    imatrix_file = None if isinstance(imatrix, bool) or imatrix is None else imatrix
    has_imatrix = bool(imatrix) if isinstance(imatrix, bool) else imatrix is not None
    notes: list[str] = []

    with open_model(path) as reader:
        meta = reader.metadata
        tensors = list(reader.tensors)
        fmt = detect_format(path)
        if tensors:
            specs = [(t.name, t.ne) for t in tensors]
            source_types = {t.name: t.dtype for t in tensors}
        else:
            specs = qs.gguf_specs_from_metadata(meta)
            source_types = None
            if not specs:
                raise InputFileError(path, "config.json lacks a size the tensor shapes need (layers, width, "
                                           "FFN, vocabulary or heads)", "pass the model's full config.json")
    tier = "config" if not tensors else ("weights+imatrix" if imatrix_file is not None else "weights")
    if imatrix_file is not None and not tensors:
        raise UsageError("--imatrix FILE needs the model's weights; with a config.json alone use imatrix=True "
                         "(CLI: --imatrix yes) to assume one")
    quantized_source = sorted({t for t in (source_types or {}).values() if t not in _FLOAT_TYPES}
                              - {"I8", "I16", "I32"})
    if quantized_source:
        notes.append(f"the input is already quantized ({', '.join(quantized_source)}): predictions are for "
                     "re-quantizing these weights and measure damage relative to them, not to the original "
                     "16-bit model; a larger preset cannot restore what was already lost")

    names = [get_preset(p).name for p in (presets or (STANDARD_PRESETS + (IMATRIX_PRESETS if has_imatrix else [])))]
    recipe_model = RecipeModel.from_metadata(meta)
    plans = qs.plan_presets(specs, recipe_model, names, pred.type_ref, has_imatrix=has_imatrix,
                            source_types=source_types)
    skipped = [n for n in names if n not in plans]
    if not has_imatrix:
        skipped += [n for n, p in plans.items() if p.needs_imatrix]
        plans = {n: p for n, p in plans.items() if not p.needs_imatrix}
    if skipped:
        notes.append(f"not predicted (llama-quantize refuses them for this model{'' if has_imatrix else ' without an imatrix'}): "
                     f"{', '.join(skipped)}")
    if not plans:
        raise UsageError("no preset can be made for this model")

    # Model facts: registry match, size, training tokens.
    registry = _registry()
    family, reg_model, exact = None, None, False
    if registry is not None:
        from predictor.data.registry import identify_model, registry_row

        from predictor.data.registry import resolve_model

        # The name a config/GGUF carries (e.g. _name_or_path) is the surest key; dimensions next.
        by_name = resolve_model(meta.name, registry) if meta.name else None
        if by_name is not None:
            reg_model, exact = by_name, True
            family = registry_row(by_name, registry)["family"]
        else:
            match = identify_model(meta, registry)
            family, reg_model, exact = match.family, match.model, match.exact
            if family is None and match.candidates:
                # Same dimensions as several registry models (Llama-3 and 3.1 8B): take the first's family.
                family = registry_row(match.candidates[0], registry)["family"]
                notes.append(f"architecture matches {', '.join(match.candidates[:4])}; family taken as {family!r}")
        row = registry_row(reg_model, registry) if reg_model else None
    else:
        row = None
    n_params = meta.n_params or estimate_n_params(meta)
    if not n_params:
        raise InputFileError(path, "the parameter count cannot be determined from this input",
                             "pass the full config.json or the weights")
    params_b = n_params / 1e9
    tokens_t, tokens_from = None, None
    if train_tokens is not None:
        tokens_t, tokens_from = float(train_tokens), "--train-tokens"
    elif row is not None and row.get("train_tokens_t"):
        tokens_t, tokens_from = float(row["train_tokens_t"]), f"registry ({reg_model})"
    if tokens_t is None:
        notes.append("training tokens unknown: pass train_tokens (--train-tokens, in trillions) to sharpen the "
                     "prediction; the model falls back to what it learned without this feature")
    train_families = set(pred.card.get("training_data", {}).get("families", []))
    unseen_family = family is None or (bool(train_families) and family not in train_families)
    if unseen_family:
        notes.append(f"family {'unknown' if family is None else repr(family)} has no measurements in the training "
                     "data: priors from other families, intervals widened to the leave-family-out calibration")

    # Stage A features per preset.
    errors: dict[str, float] = {}
    if tensors:
        from predictor.api import inspect_model

        report = inspect_model(path, imatrix=imatrix_file, presets=list(plans), sample_weights=sample_weights,
                               progress=progress)
        for p in report.presets:
            d = p.as_dict()
            if d.get("rel_rmse"):
                errors[p.preset] = float(d["rel_rmse"])
        missing = [n for n in plans if n not in errors]
        if missing:
            notes.append(f"simulated weight error not available for {', '.join(missing)}: reference error used")
    log_tpp = math.log(1000.0 * tokens_t / params_b) if tokens_t else float("nan")
    rows = []
    for n, plan in plans.items():
        rel = errors.get(n, plan.ref_rmse)
        rows.append({"preset": n, "log_ref_mse": 2 * math.log(max(rel, 1e-6)), "imatrix": float(has_imatrix),
                     "log_params": math.log(params_b), "log_tpp": log_tpp, "is_gguf": 1.0,
                     **{f"method_{m}": 0.0 for m in qs.METHOD_CLASSES if m != "llama.cpp"}})
    feats = pl.DataFrame(rows)
    log_kld = pred.log_kld(feats)
    kld = np.exp(log_kld)

    ctx = context or DEFAULT_CONTEXT
    kv = kv_cache_bytes(meta, ctx, kv_type)
    model_info = {
        "path": os.fspath(path),
        "format": fmt,
        "name": meta.name,
        "architecture": meta.architecture,
        "family": family,
        "family_in_training_data": not unseen_family,
        "registry_model": reg_model,
        "registry_exact_match": exact,
        "n_params": int(n_params),
        "params_b": params_b,
        "train_tokens_t": tokens_t,
        "train_tokens_from": tokens_from,
        "tokens_per_param": 1000.0 * tokens_t / params_b if tokens_t else None,
        "n_layers": meta.n_layers,
        "hidden_size": meta.hidden_size,
        "source_types": sorted(set((source_types or {}).values())),
        "imatrix": os.fspath(imatrix_file) if imatrix_file is not None else bool(has_imatrix),
        "context": ctx,
        "kv_type": kv_type,
        "kv_cache_bytes": kv,
        "memory_budget_bytes": budget,
        "tolerance_pct": tolerance,
        "recommendation_rule": "point prediction within tolerance, smallest file that fits",
        "predictor": pred.card.get("name"),
        "predictor_data_hash": pred.card.get("training_data", {}).get("hash"),
        "notes": notes,
    }

    results = []
    for t in tasks:
        cat = CATEGORY_PROXY.get(t, t)
        tnotes = list(notes)
        if cat != t:
            tnotes.append(f"no '{t}' measurements exist yet: predicted as '{cat}'")
        tf = feats.with_columns(pl.lit(cat).alias("task_category"))
        mid, lo, hi = pred.drop(tf, log_kld, unseen_family=unseen_family)
        out = []
        for i, (n, plan) in enumerate(plans.items()):
            d, l, h = float(mid[i]), float(lo[i]), float(hi[i])
            fits = None
            if budget is not None:
                fits = plan.tensor_bytes + (kv or 0) + OVERHEAD_BYTES <= budget
            out.append(PresetPrediction(
                preset=n, drop_pct=round(d, 3), drop_low=round(l, 3), drop_high=round(h, 3),
                kld=float(f"{kld[i]:.5g}"), tensor_bytes=int(plan.tensor_bytes),
                bits_per_weight=round(plan.bits_per_weight, 4), fits=fits, verdict=verdict(d, l, h, kld[i])))
        out.sort(key=lambda p: -p.tensor_bytes)
        info = dict(model_info, notes=tnotes)
        results.append(PredictionResult(info, t, tier, out, recommend(out, tolerance)))
    return results if task.strip().lower() == "all" else results[0]


def plot_predictions(results: list[PredictionResult], path: str | os.PathLike) -> Path:
    """PNG: predicted drop (80% interval) against file size, one line per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'quantpredict[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, r in enumerate(results):
        ps = sorted(r.predictions, key=lambda p: p.tensor_bytes)
        x = np.array([p.tensor_bytes / 2**30 for p in ps])
        y = np.array([p.drop_pct for p in ps])
        err = np.array([[p.drop_pct - p.drop_low for p in ps], [p.drop_high - p.drop_pct for p in ps]])
        ax.errorbar(x * (1 + 0.004 * k), y, yerr=err, fmt="o-", ms=3, capsize=2, lw=1, label=r.task)
        if len(results) == 1:
            for p, xi, yi in zip(ps, x, y):
                ax.annotate(p.preset, (xi, yi), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("tensor data (GiB)")
    ax.set_ylabel("predicted relative drop (%)")
    name = results[0].model.get("name") or results[0].model.get("path")
    ax.set_title(f"{name}: predicted drop per preset ({results[0].tier} tier, 80% intervals)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out
