"""Feature tables for the predictor, built from training_data/ (published + our measured rows).

Two tables, one row per training example:

- Stage A (distortion): one row per (model, quant, method, imatrix, kind, data set); target
  `y = ln(KLD)` for KL-divergence rows and `ln(ln(PPL_q / PPL_base))` for perplexity rows (the
  `is_ppl` feature absorbs the offset between the two, learned where a model has both).
- Stage B (accuracy): one row per measurement of a task in {math, code, knowledge, chat, reasoning,
  creative} with a percent score, not flagged unreliable; target `relative_drop_pct`.

Every quantization is described by `predictor.model.quantspec` (reference error of its real type mix
on the model's architecture). Model facts come from the registry (training_data/registry.csv).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from predictor.data import default_training_dir, load_training_data
from predictor.data.registry import alias_map
from predictor.data.store import read_table
from predictor.data.tasks import task_by_name
from predictor.errors import UnsupportedError, UsageError
from predictor.model import quantspec as qs
from predictor.quant.recipes import RecipeModel

TASK_CATEGORIES = ("math", "code", "knowledge", "chat", "reasoning", "creative")
# Categories with no measurements borrow a measured one (and the prediction says so).
CATEGORY_PROXY = {"creative": "chat"}
# No tokens/parameter in Stage A: only four models have measured KLD, too few to tell a training-length
# effect from the models' other differences; with it, grouped CV on llama.cpp rows went from MAE 5.4
# to 7.3 pp (Gemma-3-270M at 22,000 tokens/param pulled the slope). Stage B keeps it (56 models).
STAGE_A_FEATURES = ["log_ref_mse", "imatrix", "log_params", "is_ppl",
                    *[f"method_{m}" for m in qs.METHOD_CLASSES if m != "llama.cpp"]]
# The baseline score is not a feature: a user asking before download does not have it, and a
# feature that is always missing at prediction time only shifts the trees' missing-value branch.
# is_gguf: a llama.cpp preset (every prediction is one) rather than an RTN/GPTQ/AWQ... row; the
# training rows of the two kinds come from different eras of models, and the flag lets the trees
# keep them apart.
STAGE_B_FEATURES = ["log_kld", "task_category", "log_params", "log_tpp", "is_gguf"]
NOISE_REF_PP = 3.0  # measurement noise (pp of relative drop) at which a row counts half
_INT_FAMILIES = {"rtn", "gptq", "awq", "autoround", "hqq", "omniquant", "mlx", "bnb", "exl2", "other"}


@dataclass
class ModelFacts:
    model: str
    family: str | None
    params_b: float | None
    tokens_t: float | None
    registry_row: dict | None

    @property
    def log_params(self) -> float:
        return math.log(self.params_b) if self.params_b else float("nan")

    @property
    def log_tpp(self) -> float:
        if not self.params_b or not self.tokens_t:
            return float("nan")
        return math.log(1000.0 * self.tokens_t / self.params_b)


@dataclass
class Tables:
    stage_a: pl.DataFrame
    stage_b: pl.DataFrame
    type_ref: dict[str, float]
    data_hash: str
    source_rows: dict[str, int]
    notes: list[str] = field(default_factory=list)


def registry_frame(registry: pl.DataFrame) -> dict[str, dict]:
    return {r["model"]: r for r in registry.iter_rows(named=True)}


class QuantDescriber:
    """Reference error / bits of a quantization on a given model, cached."""

    def __init__(self, registry_rows: Mapping[str, dict], type_ref: Mapping[str, float]):
        self.registry_rows = registry_rows
        self.type_ref = dict(type_ref)
        self._plans: dict = {}
        self._specs: dict = {}

    def _arch(self, model: str):
        if model not in self._specs:
            row = self.registry_rows.get(model)
            spec = None
            if row and row.get("n_layers") and row.get("hidden_size"):
                meta = qs.metadata_from_registry(row)
                specs = qs.gguf_specs_from_metadata(meta)
                if specs:
                    try:
                        rm = RecipeModel(arch=meta.architecture or "", n_layers=int(meta.n_layers),
                                         n_head=int(meta.n_heads or 0), n_head_kv=int(meta.n_kv_heads or 0),
                                         n_expert=int(row.get("n_experts") or 0))
                        spec = (specs, rm)
                    except UsageError:
                        spec = None
            self._specs[model] = spec
        return self._specs[model]

    def preset(self, model: str, preset: str, imatrix: bool) -> tuple[float, float | None]:
        """(reference rmse, file bits per weight or None) of a llama.cpp preset on `model`."""
        key = (model, preset, imatrix)
        if key not in self._plans:
            arch = self._arch(model)
            plan = None
            if arch is not None:
                plans = qs.plan_presets(arch[0], arch[1], [preset], self.type_ref, has_imatrix=imatrix)
                plan = plans.get(_canon(preset))
            if plan is not None:
                self._plans[key] = (plan.ref_rmse, plan.bits_per_weight)
            else:  # architecture unknown: the preset's main type everywhere
                from predictor.quant.recipes import get_preset

                self._plans[key] = (self.type_ref[get_preset(preset).default_type], None)
        return self._plans[key]

    def integer(self, bits: float, group: int | None) -> tuple[float, float]:
        key = ("int", float(bits), group)
        if key not in self._plans:
            g = 128 if group is None else group
            bpw = bits + (32.0 / g if g and g > 0 else 0.0)
            self._plans[key] = (qs.rtn_ref_rmse(bits, g), bpw)
        return self._plans[key]


def _canon(preset: str) -> str:
    from predictor.quant.recipes import get_preset

    return get_preset(preset).name


def describe_row(desc: QuantDescriber, model: str, quant: str, quant_family: str | None, method: str | None,
                 weight_bits: float | None, group_size: int | None, imatrix: float) -> dict | None:
    """Quant descriptor of one published/measured row, or None if it cannot be described."""
    fam = (quant_family or "").lower()
    if fam in ("float",):
        return None
    if fam.startswith("gguf") and fam != "gguf-mixed" and qs.is_known_preset(quant):
        try:
            ref, bpw = desc.preset(model, quant, imatrix >= 0.5)
        except (UnsupportedError, KeyError):
            return None
        mc = qs.method_class(method)
        mc = "llama.cpp" if mc == "other" else mc
        return dict(ref_rmse=ref, bpw_eff=bpw, nominal_bits=qs.preset_nominal_bits(quant), method_class=mc,
                    is_gguf=True)
    if fam in _INT_FAMILIES and weight_bits and weight_bits >= 2:
        ref, bpw = desc.integer(weight_bits, group_size)
        mc = {"mlx-affine": "rtn"}.get((method or "").lower(), qs.method_class(method))
        return dict(ref_rmse=ref, bpw_eff=bpw, nominal_bits=float(weight_bits), method_class=mc, is_gguf=False)
    return None


def _imatrix_value(v: str | None) -> float:
    return {"yes": 1.0, "no": 0.0}.get((v or "").lower(), 0.5)


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def load_measured(directory: Path) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Our own measured rows (training_data/measured), validated against the same schemas."""
    mdir = directory / "measured"
    meas = read_table(mdir / "measurements.csv", "measurements") if (mdir / "measurements.csv").is_file() else None
    dist = read_table(mdir / "distortion.csv", "distortion") if (mdir / "distortion.csv").is_file() else None
    return meas, dist


def _facts(model: str, rows: Mapping[str, dict]) -> ModelFacts:
    r = rows.get(model)
    if r is None:
        return ModelFacts(model, None, None, None, None)
    return ModelFacts(model, r.get("family"), r.get("n_params_b"), r.get("train_tokens_t"), r)


def _method_onehot(mc: str) -> dict:
    return {f"method_{m}": float(mc == m) for m in qs.METHOD_CLASSES if m != "llama.cpp"}


def build_tables(training_dir: str | Path | None = None, *, type_ref: Mapping[str, float] | None = None) -> Tables:
    directory = Path(training_dir) if training_dir is not None else default_training_dir()
    td = load_training_data(directory)
    meas_m, dist_m = load_measured(directory)
    rows = registry_frame(td.registry)
    type_ref = dict(type_ref) if type_ref is not None else qs.compute_type_ref_rmse()
    desc = QuantDescriber(rows, type_ref)
    aliases = alias_map(td.registry)
    notes: list[str] = []

    def canon_model(m: str) -> str:
        return aliases.get(m.strip().casefold(), m)

    # ---------------- Stage A ----------------
    dist_frames = [td.distortion.with_columns(pl.lit("published").alias("_src"))]
    if dist_m is not None and dist_m.height:
        dist_frames.append(dist_m.with_columns(pl.lit("measured").alias("_src")))
    dist = pl.concat(dist_frames, how="vertical_relaxed").filter(~pl.col("unreliable").fill_null(False))
    a_rows = []
    for r in dist.iter_rows(named=True):
        metric = r["metric"]
        if metric == "kld_mean" and r["value"] is not None and r["value"] > 0:
            y, is_ppl = math.log(max(r["value"], 1e-5)), 0.0
        elif metric == "ppl" and r["baseline"] and r["value"] and math.isfinite(r["value"]) and r["value"] > 0:
            lr = math.log(r["value"] / r["baseline"])
            if r["quant_family"] == "float" or not math.isfinite(lr):
                continue
            y, is_ppl = math.log(max(lr, 3e-4)), 1.0
        else:
            continue
        model = canon_model(r["model"])
        imat = _imatrix_value(r["imatrix"])
        d = describe_row(desc, model, r["quant"], r["quant_family"], r["method"], r["weight_bits"],
                         r["group_size"], imat)
        if d is None:
            continue
        f = _facts(model, rows)
        a_rows.append(dict(
            model=model, family=f.family or model, quant=r["quant"], method_class=d["method_class"],
            imatrix=imat, ref_rmse=d["ref_rmse"], log_ref_mse=2 * math.log(d["ref_rmse"]),
            log_params=f.log_params, log_tpp=f.log_tpp, is_ppl=is_ppl, dataset=r["dataset"] or "",
            src=r["_src"], y=y, **_method_onehot(d["method_class"]),
        ))
    stage_a = pl.DataFrame(a_rows)
    # One row per (model, quant, method, imatrix, kind, data set): average repeats (imatrix notes).
    keys = ["model", "family", "quant", "method_class", "imatrix", "is_ppl", "dataset", "src"]
    stage_a = (stage_a.group_by(keys, maintain_order=True)
               .agg(pl.all().exclude([*keys, "y"]).first(), pl.col("y").mean())
               .sort(keys))
    stage_a = stage_a.filter(pl.col("log_params").is_not_nan())
    n_per_model = stage_a.group_by("model").len().rename({"len": "_n"})
    stage_a = stage_a.join(n_per_model, on="model").with_columns(
        (1.0 / pl.col("_n").cast(pl.Float64).sqrt()).alias("weight")).drop("_n")

    # ---------------- Stage B ----------------
    meas_frames = [td.measurements.with_columns(pl.lit("published").alias("_src"))]
    if meas_m is not None and meas_m.height:
        meas_frames.append(meas_m.with_columns(pl.lit("measured").alias("_src")))
    meas = pl.concat(meas_frames, how="vertical_relaxed").filter(
        ~pl.col("unreliable").fill_null(False)
        & (pl.col("score_unit") == "percent")
        & pl.col("higher_is_better").fill_null(True)
        & pl.col("task_category").is_in(list(TASK_CATEGORIES))
        & pl.col("relative_drop_pct").is_not_null()
    )
    b_rows = []
    skipped = 0
    for r in meas.iter_rows(named=True):
        model = canon_model(r["model"])
        imat = _imatrix_value(r["imatrix"])
        d = describe_row(desc, model, r["quant"], r["quant_family"], r["method"], r["weight_bits"],
                         r["group_size"], imat)
        f = _facts(model, rows)
        if d is None or f.params_b is None:
            skipped += 1
            continue
        task = task_by_name(r["task"])
        chance = task.chance_pct if task and task.chance_pct is not None else 0.0
        base = r["baseline_score"]
        headroom = (base - chance) / max(1e-6, 100.0 - chance) if base is not None else float("nan")
        # Measurement noise of the relative drop (pp), where the row reports standard errors
        # (unpaired: an upper bound for our paired measurements); unknown -> 0.
        bse, qse = r.get("baseline_stderr"), r.get("quant_stderr")
        noise = (100.0 * math.hypot(bse, qse) / base if base and bse is not None and qse is not None
                 and math.isfinite(bse) and math.isfinite(qse) else 0.0)
        group = "|".join(str(r[k]) for k in ("source", "source_location", "task", "metric", "metric_filter", "n_shot"))
        b_rows.append(dict(
            model=model, family=f.family or model, quant=r["quant"], task=r["task"],
            task_category=r["task_category"], method_class=d["method_class"], imatrix=imat,
            ref_rmse=d["ref_rmse"], log_ref_mse=2 * math.log(d["ref_rmse"]),
            bpw_eff=d["bpw_eff"] if d["bpw_eff"] is not None else d["nominal_bits"] + 0.5,
            nominal_bits=d["nominal_bits"], is_gguf=d["is_gguf"], log_params=f.log_params, log_tpp=f.log_tpp,
            baseline_score=base, baseline_headroom=headroom, noise_pp=noise, src=r["_src"],
            group=f"{model}|{r['imatrix']}|{group}",
            y=float(np.clip(r["relative_drop_pct"], -30.0, 100.0)),
            **_method_onehot(d["method_class"]),
        ))
    if skipped:
        notes.append(f"{skipped} accuracy rows had no describable quantization or model size and were left out")
    stage_b = pl.DataFrame(b_rows)
    n_per_model = stage_b.group_by("model").len().rename({"len": "_n"})
    # Each model counts about equally (sqrt damping), llama.cpp presets count 5x: they are
    # what the predictor is asked about. Rows whose own standard errors say the drop is mostly
    # noise count less: 1 / (1 + (noise / NOISE_REF_PP)^2).
    stage_b = stage_b.join(n_per_model, on="model", maintain_order="left").with_columns(
        ((1.0 / pl.col("_n").cast(pl.Float64).sqrt()) * pl.when(pl.col("is_gguf")).then(5.0).otherwise(1.0)
         / (1.0 + (pl.col("noise_pp") / NOISE_REF_PP) ** 2))
        .alias("weight")).drop("_n")

    files = [directory / f for f in ("measurements.csv", "distortion.csv", "registry.csv")]
    files += [p for p in (directory / "measured" / "measurements.csv", directory / "measured" / "distortion.csv")
              if p.is_file()]
    source_rows = {
        "published_measurements": td.measurements.height,
        "published_distortion": td.distortion.height,
        "measured_measurements": 0 if meas_m is None else meas_m.height,
        "measured_distortion": 0 if dist_m is None else dist_m.height,
        "stage_a_rows": stage_a.height,
        "stage_b_rows": stage_b.height,
        "stage_b_models": stage_b.get_column("model").n_unique(),
        "stage_b_families": stage_b.get_column("family").n_unique(),
    }
    return Tables(stage_a, stage_b, type_ref, _hash_files(files), source_rows, notes)
