"""Feature tables for the predictor, built from training_data/ (published + our measured rows).

Two tables, one row per training example:

- Stage A (distortion): one row per (model, quant, method, imatrix, kind, data set); target
  `y = ln(KLD)` for KL-divergence rows and `ln(ln(PPL_q / PPL_base))` for perplexity rows (the
  `is_ppl` feature absorbs the offset between the two, learned where a model has both). Our own
  measured rows (SmolLM2, Gemma-3, the self-trained family of 1-5M-parameter models) are included,
  so the fit spans 1M to 400B parameters.
- Stage B (accuracy): one row per measurement of a task in {math, code, knowledge, chat, reasoning}
  with a percent score, not flagged unreliable; target `relative_drop_pct`. A row whose baseline is
  a llama.cpp preset (Q8_0 against Q4_K_M) is kept as a pair: its reference quant is described too,
  and the model predicts the difference between the two. Every row carries a noise estimate: its
  standard errors where the source gives them, else the binomial error of the benchmark's standard
  size at the reported scores (`noise_imputed`).

Every quantization is described by `predictor.model.quantspec`: the reference error of its real
type mix on the model's architecture, split by tensor role (`e_<role>` columns). Model facts come
from the registry (training_data/registry.csv) and, for the self-trained family, from its records.
"""

from __future__ import annotations

import hashlib
import json
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
from predictor.quant.recipes import RecipeModel, get_preset

TASK_CATEGORIES = ("math", "code", "knowledge", "chat", "reasoning", "creative")
# Categories with no measurements borrow a measured one (and the prediction says so).
CATEGORY_PROXY = {"creative": "chat"}
ROLE_FEATURES = [f"e_{g}" for g in qs.ROLE_GROUPS]
METHOD_FEATURES = [f"method_{m}" for m in qs.METHOD_CLASSES if m not in ("llama.cpp", "rtn")]
# Stage A: role parts of the reference error, imatrix, model size, kind of target, method class
# (llama.cpp presets and RTN are both described by their exact reference error: no offset).
# log_tpp (training tokens per parameter) and log_vocab carry what size alone cannot: heavily trained
# models are more fragile, and a small vocabulary bounds how far a distribution can move.
SIZE_FEATURES = ["log_params", "log_tpp", "log_vocab"]
# is_ppl / is_own: the target is ln ln(PPL ratio), / measured by our own suite (short texts, llama-cpp-python)
# rather than llama-perplexity on wikitext; fitted offsets, 0 at prediction.
OFFSET_FEATURES = ["is_ppl", "is_own"]
STAGE_A_FEATURES = [*ROLE_FEATURES, "imatrix", *SIZE_FEATURES, *OFFSET_FEATURES, *METHOD_FEATURES]
NOISE_REF_PP = 3.0  # measurement noise (pp of relative drop) at which a row counts half
GGUF_WEIGHT = 5.0  # llama.cpp preset rows count this much more: every prediction is one
DEFAULT_N_ITEMS = 500  # benchmark size assumed for noise when the task has no standard size
FAMILY_NAME = "quantpredict-family"  # the self-trained 1-5M-parameter llama models (training_data/family)
_INT_FAMILIES = {"rtn", "gptq", "awq", "autoround", "hqq", "omniquant", "mlx", "bnb", "exl2", "other"}
# Reference architecture for rows whose model has no dimensions in the registry (Llama-2-7B's).
_GENERIC_ARCH = {"model": "generic-7b", "gguf_arch": "llama", "n_layers": 32, "hidden_size": 4096,
                 "ffn_size": 11008, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000, "tied_embeddings": False}


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
        return model_log_tpp(self.params_b, self.tokens_t)

    @property
    def log_vocab(self) -> float:
        v = (self.registry_row or {}).get("vocab_size")
        return math.log(v) if v else float("nan")

    def size_features(self) -> dict[str, float]:
        return {"log_params": self.log_params, "log_tpp": self.log_tpp, "log_vocab": self.log_vocab}


def model_log_tpp(params_b: float | None, tokens_t: float | None) -> float:
    """ln(training tokens per parameter); NaN when either is unknown."""
    return math.log(1000.0 * tokens_t / params_b) if params_b and tokens_t else float("nan")


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


def family_registry_rows(directory: Path) -> dict[str, dict]:
    """Registry-like rows for the self-trained family (training_data/family/models/*.json)."""
    out: dict[str, dict] = {}
    for p in sorted((directory / "family" / "models").glob("*.json")):
        rec = json.loads(p.read_text())
        m = rec["config"]["model"]
        out[rec["name"]] = {
            "model": rec["name"], "family": FAMILY_NAME, "gguf_arch": "llama", "n_layers": m["n_layers"],
            "hidden_size": m["d_model"], "ffn_size": m["d_ff"], "n_heads": m["n_heads"],
            "n_kv_heads": m["n_kv_heads"], "vocab_size": m["n_vocab"], "tied_embeddings": False,
            "n_params_b": rec["n_params"] / 1e9, "train_tokens_t": rec["tokens_seen"] / 1e12,
        }
    return out


@dataclass
class QuantDescription:
    role_mse: dict[str, float]  # role group -> part of the reference error² (quantspec.PresetPlan)
    bpw_eff: float | None
    nominal_bits: float
    method_class: str
    is_gguf: bool

    @property
    def ref_rmse(self) -> float:
        return math.sqrt(sum(self.role_mse.values()))

    def features(self) -> dict[str, float]:
        return {f"e_{g}": self.role_mse.get(g, 0.0) for g in qs.ROLE_GROUPS}


class QuantDescriber:
    """Per-role reference error / bits of a quantization on a given model, cached."""

    def __init__(self, registry_rows: Mapping[str, dict], type_ref: Mapping[str, float]):
        self.registry_rows = registry_rows
        self.type_ref = dict(type_ref)
        self._plans: dict = {}
        self._specs: dict = {}

    def _arch(self, model: str):
        """(GGUF specs, RecipeModel) of a registry model, or of the generic 7B when its dims are unknown."""
        if model not in self._specs:
            row = self.registry_rows.get(model)
            spec = None
            for r in (row, _GENERIC_ARCH):
                if spec is None and r and r.get("n_layers") and r.get("hidden_size"):
                    spec = _arch_of(r)
            self._specs[model] = spec
        return self._specs[model]

    def preset(self, model: str, preset: str, imatrix: bool) -> tuple[dict[str, float], float | None]:
        """(role_mse, file bits per weight or None) of a llama.cpp preset on `model`."""
        key = (model, preset, imatrix)
        if key not in self._plans:
            specs, rm = self._arch(model)
            plan = qs.plan_presets(specs, rm, [preset], self.type_ref, has_imatrix=imatrix).get(get_preset(preset).name)
            if plan is None:
                raise UnsupportedError(f"llama-quantize refuses {preset} for {model}")
            self._plans[key] = (plan.role_mse, plan.bits_per_weight)
        return self._plans[key]

    def integer(self, model: str, bits: float, group: int | None) -> tuple[dict[str, float], float]:
        key = ("int", model, float(bits), group)
        if key not in self._plans:
            g = 128 if group is None else group
            bpw = bits + (32.0 / g if g and g > 0 else 0.0)
            specs, _ = self._arch(model)
            self._plans[key] = (qs.integer_role_mse(qs.rtn_ref_rmse(bits, g), qs.block_role_shares(specs)), bpw)
        return self._plans[key]


def _arch_of(row: Mapping) -> tuple | None:
    meta = qs.metadata_from_registry(row)
    specs = qs.gguf_specs_from_metadata(meta)
    if not specs:
        return None
    try:
        rm = RecipeModel(arch=meta.architecture or "", n_layers=int(meta.n_layers), n_head=int(meta.n_heads or 0),
                         n_head_kv=int(meta.n_kv_heads or 0), n_expert=int(row.get("n_experts") or 0))
    except UsageError:
        return None
    return specs, rm


def describe_row(desc: QuantDescriber, model: str, quant: str, quant_family: str | None, method: str | None,
                 weight_bits: float | None, group_size: int | None, imatrix: float) -> QuantDescription | None:
    """Quant descriptor of one published/measured row, or None if it cannot be described."""
    fam = (quant_family or "").lower()
    if fam in ("float",):
        return None
    if fam.startswith("gguf") and fam not in ("gguf-mixed", "gguf-ik") and qs.is_known_preset(quant):
        try:
            role_mse, bpw = desc.preset(model, quant, imatrix >= 0.5)
        except (UnsupportedError, KeyError):
            return None
        mc = qs.method_class(method)
        mc = "llama.cpp" if mc == "other" else mc
        return QuantDescription(role_mse, bpw, qs.preset_nominal_bits(quant), mc, True)
    if fam in _INT_FAMILIES and weight_bits and weight_bits >= 2:
        role_mse, bpw = desc.integer(model, weight_bits, group_size)
        mc = {"mlx-affine": "rtn"}.get((method or "").lower(), qs.method_class(method))
        return QuantDescription(role_mse, bpw, float(weight_bits), mc, False)
    return None


def imatrix_value(v: str | None) -> float:
    return {"yes": 1.0, "no": 0.0}.get((v or "").lower(), 0.5)


def method_features(mc: str) -> dict[str, float]:
    return {f: float(f == f"method_{mc}") for f in METHOD_FEATURES}


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _measured_files(directory: Path) -> dict[str, list[Path]]:
    """Our own measured tables: SmolLM2/Gemma (measured/) and the self-trained family (measured/family/)."""
    out: dict[str, list[Path]] = {"measurements": [], "distortion": []}
    for sub in (directory / "measured", directory / "measured" / "family"):
        for name in out:
            if (sub / f"{name}.csv").is_file():
                out[name].append(sub / f"{name}.csv")
    return out


def load_measured(directory: Path) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Our own measured rows, validated against the same schemas. Family accuracy rows stay out
    (teacher-forced probes of models too small for exact match; see training_data/family)."""
    files = _measured_files(directory)
    meas = [read_table(p, "measurements") for p in files["measurements"] if p.parent.name != "family"]
    dist = [read_table(p, "distortion") for p in files["distortion"]]
    return (pl.concat(meas, how="vertical_relaxed") if meas else None,
            pl.concat(dist, how="vertical_relaxed") if dist else None)


def _facts(model: str, rows: Mapping[str, dict]) -> ModelFacts:
    r = rows.get(model)
    if r is None:
        return ModelFacts(model, None, None, None, None)
    return ModelFacts(model, r.get("family"), r.get("n_params_b"), r.get("train_tokens_t"), r)


def row_noise_pp(base: float | None, quant: float | None, base_se: float | None, quant_se: float | None,
                 n_items: int | None) -> tuple[float, bool]:
    """Noise of a relative drop (pp): 100·hypot(se_base, se_quant)/base from the row's standard errors,
    else imputed as the binomial error of `n_items` at both scores. (noise, imputed)."""
    if not base or base <= 0:
        return float("nan"), True
    if base_se is not None and quant_se is not None and math.isfinite(base_se) and math.isfinite(quant_se):
        return 100.0 * math.hypot(base_se, quant_se) / base, False
    q = base if quant is None else quant
    return imputed_noise_pp(base, n_items or DEFAULT_N_ITEMS, quant_pct=q), True


def imputed_noise_pp(base_pct: float, n_items: int, *, quant_pct: float | None = None) -> float:
    """Unpaired binomial noise of the relative drop (pp) for a benchmark of `n_items` items."""
    p0 = min(max(base_pct / 100.0, 1e-3), 1 - 1e-3)
    p1 = min(max((base_pct if quant_pct is None else quant_pct) / 100.0, 1e-3), 1 - 1e-3)
    se = math.sqrt((p0 * (1 - p0) + p1 * (1 - p1)) / max(1, n_items))
    return 100.0 * se / p0


def _stage_a_rows(dist: pl.DataFrame, desc: QuantDescriber, rows: Mapping[str, dict], canon) -> pl.DataFrame:
    a_rows = []
    for r in dist.iter_rows(named=True):
        metric = r["metric"]
        if metric == "kld_mean" and r["value"] is not None and r["value"] > 0:
            y, is_ppl = math.log(max(r["value"], 1e-6)), 0.0
        elif metric == "ppl" and r["baseline"] and r["value"] and math.isfinite(r["value"]) and r["value"] > 0:
            lr = math.log(r["value"] / r["baseline"])
            if r["quant_family"] == "float" or not math.isfinite(lr):
                continue
            y, is_ppl = math.log(max(lr, 3e-4)), 1.0
        else:
            continue
        model = canon(r["model"])
        imat = imatrix_value(r["imatrix"])
        d = describe_row(desc, model, r["quant"], r["quant_family"], r["method"], r["weight_bits"],
                         r["group_size"], imat)
        f = _facts(model, rows)
        if d is None or f.params_b is None:
            continue
        a_rows.append(dict(
            model=model, family=f.family or model, quant=r["quant"], method_class=d.method_class,
            imatrix=imat, imatrix_str=r["imatrix"] or "unknown", is_ppl=is_ppl, is_own=float(r["_src"] == "measured"),
            dataset=r["dataset"] or "",
            src=r["_src"], ref_rmse=d.ref_rmse, y=y, **f.size_features(),
            **d.features(), **method_features(d.method_class),
        ))
    stage_a = pl.DataFrame(a_rows, infer_schema_length=None)
    # One row per (model, quant, method, imatrix, kind, data set): average repeats (imatrix notes).
    keys = ["model", "family", "quant", "method_class", "imatrix", "imatrix_str", "is_ppl", "dataset", "src"]
    stage_a = (stage_a.group_by(keys, maintain_order=True)
               .agg(pl.all().exclude([*keys, "y"]).first(), pl.col("y").mean())
               .sort(keys))
    # Every model counts the same in total: our own sweeps have hundreds of rows per model, a
    # published table a handful, and Stage A must generalise across models, not within ours.
    n_per_model = stage_a.group_by("model").len().rename({"len": "_n"})
    return stage_a.join(n_per_model, on="model").with_columns(
        (1.0 / pl.col("_n").cast(pl.Float64)).alias("weight")).drop("_n")


def measured_doses(stage_a: pl.DataFrame) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(model, quant, imatrix) -> (mean measured ln KLD, mean ln ln PPL ratio); NaN where not measured.
    Stage B is fitted on these where a training row has them (Stage A predicts the rest). Our own
    suite's values are marked by is_own; `stage_b_doses` moves them onto llama-perplexity's scale."""
    agg = (stage_a.filter(pl.col("method_class") == "llama.cpp")
           .group_by("model", "quant", "imatrix_str", "is_ppl").agg(pl.col("y").mean(), pl.col("is_own").max()))
    out: dict[tuple[str, str, str], list[float]] = {}
    for model, quant, imat, is_ppl, y, own in agg.iter_rows():
        v = out.setdefault((model, quant, imat), [float("nan"), float("nan"), 0.0])
        v[int(is_ppl)], v[2] = y, max(v[2], own)
    return {k: tuple(v) for k, v in out.items()}


def _dose(doses: Mapping, model: str, quant: str | None, imatrix: str) -> tuple[float, float, float]:
    if quant is None:
        return float("nan"), float("nan"), 0.0
    hit = doses.get((model, quant, imatrix))
    if hit is None and imatrix == "unknown":  # a publisher's file: either measurement will do
        hit = doses.get((model, quant, "no")) or doses.get((model, quant, "yes"))
    return hit if hit is not None else (float("nan"), float("nan"), 0.0)


def reference_quant(baseline_precision: str | None) -> str | None:
    """The llama.cpp preset a row's baseline is (Q8_0, Q5_K_M), or None for a 16-bit baseline."""
    p = (baseline_precision or "").strip()
    if not p or not qs.is_known_preset(p):
        return None
    name = get_preset(p).name
    return None if name in ("F32", "F16", "BF16") else name


def _stage_b_rows(meas: pl.DataFrame, desc: QuantDescriber, rows: Mapping[str, dict], canon, doses,
                  notes: list[str]) -> pl.DataFrame:
    b_rows = []
    skipped = 0
    for r in meas.iter_rows(named=True):
        model = canon(r["model"])
        imat = imatrix_value(r["imatrix"])
        d = describe_row(desc, model, r["quant"], r["quant_family"], r["method"], r["weight_bits"],
                         r["group_size"], imat)
        f = _facts(model, rows)
        ref_q = reference_quant(r["baseline_precision"])
        ref = None
        if ref_q is not None and d is not None:
            ref = describe_row(desc, model, ref_q, "gguf-legacy" if ref_q.endswith("_0") else "gguf-k", "llama.cpp",
                               None, None, imat)
        if d is None or f.params_b is None or (ref_q is not None and ref is None):
            skipped += 1
            continue
        task = task_by_name(r["task"])
        base = r["baseline_score"]
        noise, imputed = row_noise_pp(base, r["quant_score"], r.get("baseline_stderr"), r.get("quant_stderr"),
                                      task.n_items if task else None)
        group = "|".join(str(r[k]) for k in ("source", "source_location", "task", "metric", "metric_filter", "n_shot"))
        istr = r["imatrix"] or "unknown"
        dk, dp, down = _dose(doses, model, r["quant"], istr) if d.is_gguf else (float("nan"), float("nan"), 0.0)
        rk, rp, rown = _dose(doses, model, ref_q, istr)
        b_rows.append(dict(
            model=model, family=f.family or model, quant=r["quant"], ref_quant=ref_q,
            task=task.name if task else r["task"], task_category=r["task_category"], method_class=d.method_class,
            imatrix=imat, ref_rmse=d.ref_rmse,
            bpw_eff=d.bpw_eff if d.bpw_eff is not None else d.nominal_bits + 0.5,
            nominal_bits=d.nominal_bits, is_gguf=d.is_gguf, params_b=f.params_b, **f.size_features(),
            baseline_score=base, noise_pp=noise, noise_imputed=imputed, src=r["_src"],
            group=f"{model}|{r['imatrix']}|{ref_q}|{group}",
            y=float(np.clip(r["relative_drop_pct"], -30.0, 100.0)),
            dose_kld=dk, dose_ppl=dp, dose_own=down, ref_dose_kld=rk, ref_dose_ppl=rp, ref_dose_own=rown,
            **d.features(), **{f"ref_{k}": v for k, v in (ref.features() if ref else
                                                          dict.fromkeys(ROLE_FEATURES, 0.0)).items()},
            **method_features(d.method_class),
        ))
    if skipped:
        notes.append(f"{skipped} accuracy rows had no describable quantization or model size and were left out")
    stage_b = pl.DataFrame(b_rows, infer_schema_length=None)
    n_per_model = stage_b.group_by("model").len().rename({"len": "_n"})
    # Each model counts about equally (sqrt damping), llama.cpp presets count GGUF_WEIGHT times more:
    # they are what the predictor is asked about. Rows whose noise says the drop is mostly noise count
    # less: 1 / (1 + (noise / NOISE_REF_PP)^2).
    return stage_b.join(n_per_model, on="model", maintain_order="left").with_columns(
        ((1.0 / pl.col("_n").cast(pl.Float64).sqrt()) * pl.when(pl.col("is_gguf")).then(GGUF_WEIGHT).otherwise(1.0)
         / (1.0 + (pl.col("noise_pp").fill_nan(NOISE_REF_PP) / NOISE_REF_PP) ** 2))
        .alias("weight")).drop("_n")


def build_tables(training_dir: str | Path | None = None, *, type_ref: Mapping[str, float] | None = None) -> Tables:
    directory = Path(training_dir) if training_dir is not None else default_training_dir()
    td = load_training_data(directory)
    meas_m, dist_m = load_measured(directory)
    rows = registry_frame(td.registry) | family_registry_rows(directory)
    type_ref = dict(type_ref) if type_ref is not None else qs.compute_type_ref_rmse()
    desc = QuantDescriber(rows, type_ref)
    aliases = alias_map(td.registry)
    notes: list[str] = []

    def canon(m: str) -> str:
        return aliases.get(m.strip().casefold(), m)

    def tagged(published: pl.DataFrame, measured: pl.DataFrame | None) -> pl.DataFrame:
        frames = [published.with_columns(pl.lit("published").alias("_src"))]
        if measured is not None and measured.height:
            frames.append(measured.with_columns(pl.lit("measured").alias("_src")))
        return pl.concat(frames, how="vertical_relaxed").filter(~pl.col("unreliable").fill_null(False))

    stage_a = _stage_a_rows(tagged(td.distortion, dist_m), desc, rows, canon)
    meas = tagged(td.measurements, meas_m).filter(
        (pl.col("score_unit") == "percent")
        & pl.col("higher_is_better").fill_null(True)
        & pl.col("task_category").is_in(list(TASK_CATEGORIES))
        & pl.col("relative_drop_pct").is_not_null()
    )
    stage_b = _stage_b_rows(meas, desc, rows, canon, measured_doses(stage_a), notes)

    files = [directory / f for f in ("measurements.csv", "distortion.csv", "registry.csv")]
    files += [p for ps in _measured_files(directory).values() for p in ps]
    files += sorted((directory / "family" / "models").glob("*.json"))
    source_rows = {
        "published_measurements": td.measurements.height,
        "published_distortion": td.distortion.height,
        "measured_measurements": 0 if meas_m is None else meas_m.height,
        "measured_distortion": 0 if dist_m is None else dist_m.height,
        "stage_a_rows": stage_a.height,
        "stage_a_models": stage_a.get_column("model").n_unique(),
        "stage_b_rows": stage_b.height,
        "stage_b_pair_rows": int(stage_b.get_column("ref_quant").is_not_null().sum()),
        "stage_b_rows_with_measured_distortion": int(
            (stage_b.get_column("dose_kld").is_not_nan() | stage_b.get_column("dose_ppl").is_not_nan()).sum()),
        "stage_b_models": stage_b.get_column("model").n_unique(),
        "stage_b_families": stage_b.get_column("family").n_unique(),
    }
    return Tables(stage_a, stage_b, type_ref, _hash_files(files), source_rows, notes)
