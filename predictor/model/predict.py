"""`predict(path, task=...)`: predicted accuracy drop at every llama.cpp preset, and a recommendation.

Tiers (what the prediction is based on):
- `config`: a config.json only (before any download). The type mix of every preset is exact (the
  recipes run on the tensor shapes the config implies); the weight error is the reference error of
  that mix on a synthetic sample, so the model's own weight statistics are unknown.
- `weights`: safetensors / GGUF weights. The simulated error of the model's own tensors
  (`inspect_model`, seeded row sample) replaces the reference error in Stage A.
- `weights+imatrix`: as `weights`, with the tensors quantized the way llama-quantize does with that
  imatrix (imatrix-aware recipes and quantizers) and the imatrix flag set.

Two 80% intervals per preset: where the *true* drop lies, and what *your* benchmark of n items
would measure (the true interval widened by that benchmark's sampling noise). Both come from
cross-validated residuals with whole models held out (whole families when the model's family is not
in the training data), calibrated on the llama.cpp-preset rows. Almost all of those rows have no
weights we can read, so the `weights` tiers do not get narrower intervals than `config`.

The pipeline: read the input -> plan every preset (exact type mix and size) -> identify the model
(registry, family, size) -> distortion (Stage A per preset) -> drop per task (Stage B, intervals,
verdicts) -> assemble the result and the recommendation.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from predictor.errors import InputFileError, UsageError
from predictor.io import detect_format, open_model
from predictor.io.hf import estimate_n_params
from predictor.model import quantspec as qs
from predictor.data.tasks import TASKS as BENCHMARKS
from predictor.data.tasks import Task, task_by_lm_eval_id, task_by_name
from predictor.model.features import (
    CATEGORY_PROXY,
    DEFAULT_N_ITEMS,
    TASK_CATEGORIES,
    imputed_noise_pp,
    method_features,
    model_log_tpp,
)
from predictor.quant.recipes import STANDARD_PRESETS, RecipeModel, get_preset

TASKS = TASK_CATEGORIES
DEFAULT_TOLERANCE = 3.0  # % relative drop
SCHEMA_VERSION = 2  # of the JSON result (as_dict); 2 added the two intervals, benchmark and notes
OUT_OF_RANGE_WIDEN = 2.0  # interval scale factor for a model outside Stage A's calibration range
WEIGHT_RATIO_RANGE = (0.5, 2.0)  # own / reference weight error² that the weights tier may apply
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
    drop_low: float  # 80% interval of what the user's benchmark would measure (= drop_bench_low)
    drop_high: float
    kld: float  # predicted mean KL divergence vs the unquantized model (nats/token)
    tensor_bytes: int
    bits_per_weight: float
    fits: bool | None  # None when no memory budget was given
    verdict: str
    drop_true_low: float | None = None  # 80% interval of the true drop
    drop_true_high: float | None = None
    drop_bench_low: float | None = None  # 80% interval of the benchmark's measurement (= drop_low)
    drop_bench_high: float | None = None
    memory_bytes: int | None = None  # weights + KV cache + runtime overhead


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
    notes: list[str] = field(default_factory=list)
    benchmark: dict = field(default_factory=dict)  # name, n items, noise (pp) the bench interval uses

    def as_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "task": self.task,
            "tier": self.tier,
            "benchmark": self.benchmark,
            "predictions": [asdict(p) for p in self.predictions],
            "recommendation": asdict(self.recommendation),
            "notes": self.notes,
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


@dataclass(frozen=True)
class TaskSpec:
    """What a `--task` value asks for: a category, and a benchmark when one was named."""

    label: str  # as reported (the category, or the benchmark's name)
    category: str  # a measured category (creative -> chat)
    benchmark: Task | None


def check_task(task: str) -> list[TaskSpec]:
    """'math' / 'all' / a benchmark name (gsm8k, MMLU, humaneval, an lm-eval task id) -> TaskSpecs."""
    if not isinstance(task, str):
        raise UsageError(f"task must be a string, got {type(task).__name__}")
    t = task.strip().lower()
    if t == "all":
        return [TaskSpec(c, CATEGORY_PROXY.get(c, c), None) for c in TASKS]
    if t in TASKS:
        return [TaskSpec(t, CATEGORY_PROXY.get(t, t), None)]
    bench = task_by_name(t) or task_by_lm_eval_id(t)
    if bench is not None and bench.category in TASKS:
        return [TaskSpec(bench.name, CATEGORY_PROXY.get(bench.category, bench.category), bench)]
    examples = ", ".join(b.name for b in BENCHMARKS.values() if b.category in TASKS and b.n_items)[:200]
    raise UsageError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}, all, or a benchmark name "
                     f"({examples}, ...)")


def verdict(drop: float, low: float, high: float, kld: float, noise_halfwidth: float = 2.0) -> str:
    """`low`/`high`: the true-drop interval; `noise_halfwidth`: what the benchmark cannot resolve."""
    if kld >= COLLAPSE_KLD:
        return "collapse risk"
    if high <= noise_halfwidth and low >= -noise_halfwidth:
        return "indistinguishable from baseline"
    if drop <= noise_halfwidth:
        return "likely within noise"
    if drop <= 5.0:
        return "minor loss"
    if drop <= 15.0:
        return "noticeable loss"
    return "severe loss"


def recommend(preds: list[PresetPrediction], tolerance: float) -> Recommendation:
    """Smallest file whose *point* prediction is within tolerance and that fits the budget."""
    ok = [p for p in preds if p.drop_pct <= tolerance and p.fits is not False and p.verdict != "collapse risk"]
    if not ok:
        fitting = [p for p in preds if p.fits is not False]
        if not fitting:
            return Recommendation(None, "no preset fits the memory budget")
        return Recommendation(None, f"no preset that fits is predicted within {tolerance:g}% of baseline")
    best = min(ok, key=lambda p: (p.tensor_bytes, p.drop_pct))
    fit_note = " and fits the memory budget" if best.fits else ""
    return Recommendation(best.preset, (
        f"smallest preset whose predicted drop ({best.drop_pct:.1f}%, 80% interval of the true drop "
        f"{best.drop_true_low if best.drop_true_low is not None else best.drop_low:.1f} to "
        f"{best.drop_true_high if best.drop_true_high is not None else best.drop_high:.1f}) is within the "
        f"{tolerance:g}% tolerance{fit_note}"))


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


# ---------------------------------------------------------------------------------------------
# The pipeline: read -> plan -> identify -> distortion -> drop -> assemble


@dataclass
class _Input:
    meta: object
    fmt: str
    specs: list
    source_types: dict | None
    has_weights: bool


def _read(path) -> _Input:
    with open_model(path) as reader:
        meta = reader.metadata
        tensors = list(reader.tensors)
        fmt = detect_format(path)
    if tensors:
        return _Input(meta, fmt, [(t.name, t.ne) for t in tensors], {t.name: t.dtype for t in tensors}, True)
    specs = qs.gguf_specs_from_metadata(meta)
    if not specs:
        raise InputFileError(path, "config.json lacks a size the tensor shapes need (layers, width, "
                                   "FFN, vocabulary or heads)", "pass the model's full config.json")
    return _Input(meta, fmt, specs, None, False)


def _plan(inp: _Input, presets, type_ref, has_imatrix: bool, notes: list[str]) -> dict:
    names = [get_preset(p).name for p in (presets or (STANDARD_PRESETS + (IMATRIX_PRESETS if has_imatrix else [])))]
    plans = qs.plan_presets(inp.specs, RecipeModel.from_metadata(inp.meta), names, type_ref,
                            has_imatrix=has_imatrix, source_types=inp.source_types)
    skipped = [n for n in names if n not in plans]
    if not has_imatrix:
        skipped += [n for n, p in plans.items() if p.needs_imatrix]
        plans = {n: p for n, p in plans.items() if not p.needs_imatrix}
    if skipped:
        notes.append(f"not predicted (llama-quantize refuses them for this model{'' if has_imatrix else ' without an imatrix'}): "
                     f"{', '.join(skipped)}")
    if not plans:
        raise UsageError("no preset can be made for this model")
    return plans


@dataclass
class _Identity:
    family: str | None
    registry_model: str | None
    exact: bool
    params_b: float
    n_params: int
    tokens_t: float | None
    tokens_from: str | None
    unseen_family: bool


def _identify(path, meta, pred, train_tokens, notes: list[str]) -> _Identity:
    """Registry match (name, then dimensions, then architecture name), size and training tokens."""
    registry = _registry()
    family, reg_model, exact, row = None, None, False, None
    if registry is not None:
        from predictor.data.registry import identify_model, registry_row, resolve_model

        # The name a config/GGUF carries (e.g. _name_or_path) is the surest key; dimensions next; the
        # architecture name (a Gemma-3 config is family gemma3) last.
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
            elif family is not None and not exact:
                notes.append(f"no registry model has these dimensions; family {family!r} from the architecture name")
        row = registry_row(reg_model, registry) if reg_model else None
    n_params = meta.n_params or estimate_n_params(meta)
    if not n_params:
        raise InputFileError(path, "the parameter count cannot be determined from this input",
                             "pass the full config.json or the weights")
    tokens_t, tokens_from = None, None
    if train_tokens is not None:
        tokens_t, tokens_from = float(train_tokens), "--train-tokens"
    elif row is not None and row.get("train_tokens_t"):
        tokens_t, tokens_from = float(row["train_tokens_t"]), f"registry ({reg_model})"
    if tokens_t is None:
        notes.append("training tokens unknown: pass train_tokens (--train-tokens, in trillions) to sharpen the "
                     "prediction; Stage A uses the training data's typical tokens per parameter")
    train_families = set(pred.card.get("training_data", {}).get("families", []))
    unseen = family is None or (bool(train_families) and family not in train_families)
    if unseen:
        notes.append(f"family {'unknown' if family is None else repr(family)} has no measurements in the training "
                     "data: intervals widened to the leave-family-out calibration")
    return _Identity(family, reg_model, exact, n_params / 1e9, int(n_params), tokens_t, tokens_from, unseen)


def _weight_error_ratio(path, imatrix_file, plans, sample_weights, progress, notes: list[str]) -> dict[str, float]:
    """Weights tier: own simulated error² / the reference error² of the same type mix, per preset,
    clipped to WEIGHT_RATIO_RANGE (Stage A was calibrated on reference errors)."""
    from predictor.api import inspect_model

    report = inspect_model(path, imatrix=imatrix_file, presets=list(plans), sample_weights=sample_weights,
                           progress=progress)
    ratios, clipped = {}, []
    for p in report.presets:
        rel = p.as_dict().get("rel_rmse")
        if rel is not None and plans[p.preset].ref_rmse > 0:
            r = (float(rel) / plans[p.preset].ref_rmse) ** 2
            ratios[p.preset] = float(np.clip(r, *WEIGHT_RATIO_RANGE))
            if ratios[p.preset] != r:
                clipped.append(f"{p.preset} {r:.2f}")
    missing = [n for n in plans if n not in ratios]
    if missing:
        notes.append(f"simulated weight error not available for {', '.join(missing)}: reference error used")
    if clipped:
        notes.append("the model's own weight error is far from the reference error Stage A was calibrated on "
                     f"(error² ratio {', '.join(clipped)}); clipped to {WEIGHT_RATIO_RANGE[0]:g}-{WEIGHT_RATIO_RANGE[1]:g}")
    return ratios


def _distortion(pred, plans, ident: _Identity, vocab, has_imatrix, ratios, notes: list[str]):
    """(ln KLD per preset, in calibration range?) from Stage A."""
    rows = []
    for n, plan in plans.items():
        r = ratios.get(n, 1.0)
        rows.append({**{f"e_{g}": v * r for g, v in plan.role_mse.items()}, "imatrix": float(has_imatrix),
                     "log_params": math.log(ident.params_b), "log_tpp": model_log_tpp(ident.params_b, ident.tokens_t),
                     "log_vocab": math.log(vocab) if vocab else float("nan"), **method_features("llama.cpp")})
    feats = pl.DataFrame(rows)
    from predictor.model.train import as_kld_rows, stage_a_matrix

    X = stage_a_matrix(as_kld_rows(feats))
    in_range = bool(pred.stage_a.in_range(X).all())
    if not in_range:
        rng = pred.stage_a.params()["size_range"]
        lp = rng["log_params"]
        notes.append(f"outside the calibration range of the distortion model (sizes {math.exp(lp[0]) * 1e3:.1f}M-"
                     f"{math.exp(lp[1]):.0f}B parameters, training tokens per parameter "
                     f"{math.exp(rng['log_tpp'][0]):.0f}-{math.exp(rng['log_tpp'][1]):.0f}, vocabularies "
                     f"{math.exp(rng['log_vocab'][0]):.0f}-{math.exp(rng['log_vocab'][1]):.0f}): features clipped "
                     f"to it and intervals widened {OUT_OF_RANGE_WIDEN:g}x — treat the numbers as rough")
    return pred.stage_a.predict(X), in_range


def benchmark_noise(pred, spec: TaskSpec, bench_n: int | None) -> dict:
    """Items and sampling noise (pp of relative drop) of the user's benchmark for `spec`."""
    medians = pred.card.get("training_data", {}).get("task_baseline_median", {})
    name = spec.benchmark.name if spec.benchmark else None
    n = bench_n or (spec.benchmark.n_items if spec.benchmark and spec.benchmark.n_items else None)
    if n is None:  # the category's most measured benchmark with a standard size
        n = {"math": 1319, "code": 164, "knowledge": 14042, "chat": 541, "reasoning": 1172}.get(spec.category,
                                                                                               DEFAULT_N_ITEMS)
    base = medians.get(name) if name else None
    base = base if base is not None else medians.get(f"category:{spec.category}", 50.0)
    return {"name": name, "n_items": int(n), "baseline_score_assumed": round(float(base), 2),
            "noise_pp": round(imputed_noise_pp(base, int(n)), 4)}


def _drop(pred, spec: TaskSpec, log_kld, ident: _Identity, in_range: bool, bench: dict):
    """Point, true-drop interval and benchmark interval per preset (arrays)."""
    task = [spec.benchmark.name if spec.benchmark else ""] * len(log_kld)
    point = np.clip(pred.curve.predict(log_kld, [spec.category] * len(log_kld), task), 0.0, 100.0)
    im = pred.interval(ident.unseen_family)
    widen = 1.0 if in_range else OUT_OF_RANGE_WIDEN
    hw_true = im.q_ * im.scale(point) * widen
    noise = im.kappa_ * bench["noise_pp"]
    hw_bench = im.q_ * np.hypot(im.scale(point) * widen, noise)
    true = np.clip(point - hw_true, 0.0, 100.0), np.clip(point + hw_true, 0.0, 100.0)
    # A measurement can show an "improvement", but only within the benchmark's noise.
    bench_iv = np.maximum(point - hw_bench, -im.q_ * noise), np.minimum(point + hw_bench, 100.0)
    return point, true, bench_iv, float(im.q_ * noise)


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
    bench_n: int | None = None,
    model_dir: str | os.PathLike | None = None,
    presets: list[str] | None = None,
    sample_weights: int = 8192,
    progress: Callable[[int, int, str], None] | None = None,
) -> PredictionResult | list[PredictionResult]:
    """Predicted drop per preset for `task` (a list of results for task='all').

    task: a category (math, code, knowledge, chat, reasoning, creative), 'all', or a benchmark name
        (gsm8k, mmlu, humaneval, ifeval, ...).
    imatrix: path of an imatrix file (weights tiers), or True to assume one will be used (any tier).
    memory: budget for weights + KV cache at `context` tokens (+512 MiB runtime), e.g. '8GB'.
    train_tokens: pre-training tokens in trillions, when the registry does not know the model.
    bench_n: items of the benchmark you would measure with (default: the task's standard test size)."""
    specs = check_task(task)
    if kv_type not in KV_BYTES_PER_ELEMENT:
        raise UsageError(f"unknown KV cache type {kv_type!r}; valid: {', '.join(KV_BYTES_PER_ELEMENT)}")
    if train_tokens is not None and not (train_tokens > 0 and math.isfinite(train_tokens)):
        raise UsageError(f"train_tokens is in trillions and must be positive, got {train_tokens}")
    if context is not None and context < 1:
        raise UsageError(f"context must be a positive number of tokens, got {context}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise UsageError(f"tolerance must be a number (percent), got {tolerance!r}")
    if bench_n is not None and (isinstance(bench_n, bool) or not isinstance(bench_n, int) or bench_n < 1):
        raise UsageError(f"bench_n must be a positive number of items, got {bench_n!r}")
    budget = parse_memory(memory)
    pred = _load(model_dir)
    imatrix_file = None if isinstance(imatrix, bool) or imatrix is None else imatrix
    has_imatrix = bool(imatrix) if isinstance(imatrix, bool) else imatrix is not None
    notes: list[str] = []

    inp = _read(path)
    tier = "config" if not inp.has_weights else ("weights+imatrix" if imatrix_file is not None else "weights")
    if imatrix_file is not None and not inp.has_weights:
        raise UsageError("--imatrix FILE needs the model's weights; with a config.json alone use imatrix=True "
                         "(CLI: --imatrix yes) to assume one")
    quantized_source = sorted({t for t in (inp.source_types or {}).values() if t not in _FLOAT_TYPES}
                              - {"I8", "I16", "I32"})
    if quantized_source:
        notes.append(f"the input is already quantized ({', '.join(quantized_source)}): predictions are for "
                     "re-quantizing these weights and measure damage relative to them, not to the original "
                     "16-bit model; a larger preset cannot restore what was already lost")
    plans = _plan(inp, presets, pred.type_ref, has_imatrix, notes)
    ident = _identify(path, inp.meta, pred, train_tokens, notes)
    ratios = (_weight_error_ratio(path, imatrix_file, plans, sample_weights, progress, notes)
              if inp.has_weights else {})
    log_kld, in_range = _distortion(pred, plans, ident, inp.meta.vocab_size, has_imatrix, ratios, notes)
    ctx = context or DEFAULT_CONTEXT
    kv = kv_cache_bytes(inp.meta, ctx, kv_type)
    model_info = _model_info(path, inp, ident, imatrix_file, has_imatrix, ctx, kv_type, kv, budget, tolerance, pred)
    results = [_assemble(pred, spec, plans, log_kld, ident, in_range, tier, model_info, notes, bench_n, budget, kv,
                         tolerance) for spec in specs]
    return results if task.strip().lower() == "all" else results[0]


def _model_info(path, inp, ident, imatrix_file, has_imatrix, ctx, kv_type, kv, budget, tolerance, pred) -> dict:
    meta = inp.meta
    return {
        "path": os.fspath(path),
        "format": inp.fmt,
        "name": meta.name,
        "architecture": meta.architecture,
        "family": ident.family,
        "family_in_training_data": not ident.unseen_family,
        "registry_model": ident.registry_model,
        "registry_exact_match": ident.exact,
        "n_params": ident.n_params,
        "params_b": ident.params_b,
        "train_tokens_t": ident.tokens_t,
        "train_tokens_from": ident.tokens_from,
        "tokens_per_param": 1000.0 * ident.tokens_t / ident.params_b if ident.tokens_t else None,
        "n_layers": meta.n_layers,
        "hidden_size": meta.hidden_size,
        "source_types": sorted(set((inp.source_types or {}).values())),
        "imatrix": os.fspath(imatrix_file) if imatrix_file is not None else bool(has_imatrix),
        "context": ctx,
        "kv_type": kv_type,
        "kv_cache_bytes": kv,
        "memory_budget_bytes": budget,
        "tolerance_pct": tolerance,
        "recommendation_rule": "point prediction within tolerance, smallest file that fits",
        "predictor": pred.card.get("name"),
        "predictor_data_hash": pred.card.get("training_data", {}).get("hash"),
    }


def _assemble(pred, spec, plans, log_kld, ident, in_range, tier, model_info, notes, bench_n, budget, kv,
              tolerance) -> PredictionResult:
    tnotes = list(notes)
    if spec.category != spec.label and spec.benchmark is None:
        tnotes.append(f"no '{spec.label}' measurements exist yet: predicted as '{spec.category}'")
    if spec.benchmark is not None and spec.benchmark.name not in pred.curve.task_offset_:
        tnotes.append(f"{spec.benchmark.name} has too few measurements for its own sensitivity: predicted with the "
                      f"'{spec.category}' curve")
    bench = benchmark_noise(pred, spec, bench_n)
    point, (tlo, thi), (blo, bhi), noise_hw = _drop(pred, spec, log_kld, ident, in_range, bench)
    kld = np.exp(log_kld)
    out = []
    for i, (n, plan) in enumerate(plans.items()):
        need = plan.tensor_bytes + (kv or 0) + OVERHEAD_BYTES
        out.append(PresetPrediction(
            preset=n, drop_pct=round(float(point[i]), 3), drop_low=round(float(blo[i]), 3),
            drop_high=round(float(bhi[i]), 3), kld=float(f"{kld[i]:.5g}"), tensor_bytes=int(plan.tensor_bytes),
            bits_per_weight=round(plan.bits_per_weight, 4), fits=None if budget is None else need <= budget,
            verdict=verdict(float(point[i]), float(tlo[i]), float(thi[i]), float(kld[i]), noise_hw),
            drop_true_low=round(float(tlo[i]), 3), drop_true_high=round(float(thi[i]), 3),
            drop_bench_low=round(float(blo[i]), 3), drop_bench_high=round(float(bhi[i]), 3),
            memory_bytes=int(need)))
    out.sort(key=lambda p: -p.tensor_bytes)
    bench["noise_halfwidth_pp"] = round(noise_hw, 3)
    return PredictionResult(dict(model_info, notes=tnotes), spec.label, tier, out, recommend(out, tolerance),
                            tnotes, bench)


def plot_predictions(results: list[PredictionResult], path: str | os.PathLike) -> Path:
    """PNG: predicted drop (80% interval of the true drop) against file size, one line per task."""
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
        err = np.array([[p.drop_pct - p.drop_true_low for p in ps], [p.drop_true_high - p.drop_pct for p in ps]])
        ax.errorbar(x * (1 + 0.004 * k), y, yerr=err, fmt="o-", ms=3, capsize=2, lw=1, label=r.task)
        if len(results) == 1:
            for p, xi, yi in zip(ps, x, y):
                ax.annotate(p.preset, (xi, yi), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("tensor data (GiB)")
    ax.set_ylabel("predicted relative drop (%)")
    name = results[0].model.get("name") or results[0].model.get("path")
    ax.set_title(f"{name}: predicted drop per preset ({results[0].tier} tier, 80% intervals of the true drop)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out
