"""Fit the predictor, persist it as JSON (no pickle), load it back.

    from predictor.model.train import train, load_model
    train("training_data", "models/default")      # fit + grouped CV + card.json + README.md
    predictor = load_model("models/default")

Artifacts in a model directory:
    stage_a.json      Stage A: ln KLD from the per-role reference error (estimator.DistortionModel)
    drop_curve.json   Stage B: relative drop from ln KLD per task category and benchmark (DropCurve)
    intervals.json    spread of the drop around the point, per held-out scheme and kind of row
                      (IntervalModel), fitted on cross-validated residuals
    card.json         features in order, target definitions, training-data hash and row counts,
                      package versions, reference errors, cross-validated metrics beside baselines
    README.md         generated from card.json
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from predictor.errors import InputFileError, SchemaError
from predictor.model.estimator import DistortionModel, DropCurve, IntervalModel, json_dumps
from predictor.model.features import (
    METHOD_FEATURES,
    OFFSET_FEATURES,
    ROLE_FEATURES,
    SIZE_FEATURES,
    STAGE_A_FEATURES,
    TASK_CATEGORIES,
    Tables,
    build_tables,
)

CARD_VERSION = 3
COVERAGE = 0.8
STAGE_A_FILE, CURVE_FILE, INTERVAL_FILE = "stage_a.json", "drop_curve.json", "intervals.json"
MODEL_FILES = (STAGE_A_FILE, CURVE_FILE, INTERVAL_FILE)
TARGET_DEFINITION = (
    "relative_drop_pct = (baseline - quantized) / baseline x 100 for a higher-is-better percent score "
    "(positive = worse), clipped to [-30, 100]; rows flagged unreliable are excluded; rows whose baseline "
    "is a llama.cpp preset are fitted as the difference of two predicted drops"
)
STAGE_A_TARGET = "ln(mean KL divergence of the quantized model's next-token distribution vs the 16-bit model)"
INTERVAL_KINDS = ("llama_cpp", "other_methods")


@dataclass
class Predictor:
    """A loaded (or freshly fitted) predictor."""

    stage_a: DistortionModel
    curve: DropCurve
    intervals: dict[str, IntervalModel]  # "<scheme>/<kind>": scheme model|family, kind llama_cpp|other_methods
    type_ref: dict[str, float]
    card: dict

    def log_kld(self, feats: pl.DataFrame) -> np.ndarray:
        """Stage A on rows holding STAGE_A_FEATURES (offsets forced to 0: we predict llama-perplexity's KLD)."""
        return self.stage_a.predict(stage_a_matrix(as_kld_rows(feats)))

    def interval(self, unseen_family: bool, kind: str = "llama_cpp") -> IntervalModel:
        return self.intervals[f"{'family' if unseen_family else 'model'}/{kind}"]


def as_kld_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Rows asking Stage A for a KLD as llama-perplexity reports it (every offset 0)."""
    return df.with_columns([pl.lit(0.0).alias(c) for c in OFFSET_FEATURES])


def stage_a_matrix(df: pl.DataFrame, prefix: str = "") -> np.ndarray:
    """STAGE_A_FEATURES of `df` (with `prefix`, the reference quant's role errors of a pair row)."""
    cols = [f"{prefix}{c}" if c in ROLE_FEATURES else c for c in STAGE_A_FEATURES]
    return df.select([pl.col(c).cast(pl.Float64) for c in cols]).to_numpy()


def new_stage_a() -> DistortionModel:
    # role_shrink 5: of 1 / 5 / 20 it gave the lowest leave-model-out error on published KLD rows
    # (0.42 / 0.40 / 0.36 ln) without losing our own rows (0.51 / 0.50 / 0.57).
    return DistortionModel(role_features=ROLE_FEATURES, size_features=SIZE_FEATURES, offset_features=OFFSET_FEATURES,
                           method_features=METHOD_FEATURES, role_shrink=5.0)


def fit_stage_a(stage_a: pl.DataFrame) -> DistortionModel:
    return new_stage_a().fit(stage_a_matrix(stage_a), stage_a.get_column("y").to_numpy(),
                             stage_a.get_column("weight").to_numpy())


def stage_b_doses(sa: DistortionModel, rows: pl.DataFrame, *, measured: bool) -> tuple[np.ndarray, np.ndarray]:
    """ln KLD of each row's quant and of its reference quant (NaN: 16-bit baseline): Stage A's
    prediction, or with `measured` the row's own measured KLD (a PPL ratio, or our suite's KLD, read
    through Stage A's offsets) where it has one."""
    kld_rows = as_kld_rows(rows)
    x = sa.predict(stage_a_matrix(kld_rows))
    x_ref = np.where(rows.get_column("ref_quant").is_not_null().to_numpy(),
                     sa.predict(stage_a_matrix(kld_rows, "ref_")), np.nan)
    if measured:
        own_offset = sa.offset("is_own")
        for pre, arr in (("", x), ("ref_", x_ref)):
            own = rows.get_column(f"{pre}dose_own").to_numpy() * own_offset
            k = rows.get_column(f"{pre}dose_kld").to_numpy() - own
            p = rows.get_column(f"{pre}dose_ppl").to_numpy() - sa.offset("is_ppl") - own
            meas = np.where(np.isfinite(k), k, p)
            keep = np.isfinite(meas) & (np.isfinite(arr) if pre else True)
            arr[keep] = meas[keep]
    return x, x_ref


def fit_curve(rows: pl.DataFrame, x: np.ndarray, x_ref: np.ndarray, **kwargs) -> DropCurve:
    return DropCurve(**kwargs).fit(x, x_ref, rows.get_column("task_category").to_list(),
                                   rows.get_column("task").to_list(), rows.get_column("y").to_numpy(),
                                   rows.get_column("weight").to_numpy())


def fit_predictor(tables: Tables, *, stage_a_rows: pl.DataFrame | None = None,
                  stage_b_rows: pl.DataFrame | None = None) -> tuple[DistortionModel, DropCurve]:
    a_rows = tables.stage_a if stage_a_rows is None else stage_a_rows
    b_rows = tables.stage_b if stage_b_rows is None else stage_b_rows
    sa = fit_stage_a(a_rows)
    x, x_ref = stage_b_doses(sa, b_rows, measured=True)
    return sa, fit_curve(b_rows, x, x_ref)


def _versions() -> dict[str, str]:
    import polars
    import scipy
    import sklearn

    import predictor

    return {
        "python": platform.python_version(),
        "quantpredict": predictor.__version__,
        "numpy": np.__version__,
        "polars": polars.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def train(training_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "models/default", *,
          validate: bool = True, progress=None, tables: Tables | None = None) -> Path:
    """Fit on all of `training_dir` and write the artifacts; with `validate`, run grouped CV first
    (it fits the intervals and gives the card its metrics). Without it the intervals are fitted on
    the training residuals and say so in the card."""
    from predictor.model import validate as val

    tables = tables if tables is not None else build_tables(training_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cv = val.cross_validate(tables, progress=progress) if validate else None
    sa, curve = fit_predictor(tables)
    intervals = cv.intervals if cv else val.in_sample_intervals(tables, sa, curve)
    texts = {STAGE_A_FILE: json_dumps(sa.to_dict()), CURVE_FILE: json_dumps(curve.to_dict()),
             INTERVAL_FILE: json_dumps({k: v.to_dict() for k, v in intervals.items()})}
    for name, text in texts.items():
        (out / name).write_text(text)
    card = {
        "card_version": CARD_VERSION,
        "name": out.name,
        "target": {"stage_b": TARGET_DEFINITION, "stage_a": STAGE_A_TARGET,
                   "interval": ("80%: 'true' = where the true drop lies (point ± q·s, s = α + β·point); "
                                "'bench' = what a benchmark of n items would measure (point ± q·sqrt(s² + "
                                "(κ·noise(n))²)); α, β, κ by maximum likelihood and q by conformal calibration "
                                "on cross-validated residuals, per held-out scheme and kind of row"
                                + ("" if cv else "; NOT cross-validated (trained with --no-validate)"))},
        "features": {"stage_a": STAGE_A_FEATURES, "stage_b": ["ln KLD (Stage A)", "task_category", "task"]},
        "files": {"model": list(MODEL_FILES),
                  "sha256": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in texts.items()}},
        "training_data": {"hash": tables.data_hash, "rows": tables.source_rows, "notes": tables.notes,
                          "families": sorted(set(tables.stage_b.get_column("family").to_list())),
                          "models": sorted(set(tables.stage_b.get_column("model").to_list())),
                          "tasks": sorted(curve.task_offset_),
                          "task_baseline_median": task_baseline_medians(tables.stage_b)},
        "type_ref_rmse": tables.type_ref,
        "package_versions": _versions(),
        "validation": cv.summary if cv else None,
    }
    (out / "card.json").write_text(json_dumps(card))
    (out / "README.md").write_text(render_readme(card, sa, curve))
    return out


def task_baseline_medians(stage_b: pl.DataFrame) -> dict[str, float]:
    """Median baseline score per task and per category ("category:<name>"): the score a user's
    benchmark noise is computed at when they give none."""
    out = {t: float(v) for t, v in stage_b.group_by("task").agg(pl.col("baseline_score").median()).iter_rows()
           if v is not None}
    out |= {f"category:{c}": float(v) for c, v in
            stage_b.group_by("task_category").agg(pl.col("baseline_score").median()).iter_rows() if v is not None}
    return out


def load_model(model_dir: str | os.PathLike | None = None) -> Predictor:
    """Load a model directory written by `train` (JSON files only; never unpickles anything)."""
    d = Path(model_dir) if model_dir is not None else default_model_dir()
    card_path = d / "card.json"
    if not card_path.is_file():
        raise InputFileError(d, "is not a quantpredict model directory (no card.json)",
                             "pass a folder written by `quantpredict train` (e.g. models/default)")
    try:
        card = json.loads(card_path.read_text())
        if card.get("card_version") != CARD_VERSION:
            raise SchemaError(f"{d}: model card version {card.get('card_version')} is not {CARD_VERSION} — "
                              "retrain with `quantpredict train`")
        sa = DistortionModel.from_dict(json.loads((d / STAGE_A_FILE).read_text()))
        curve = DropCurve.from_dict(json.loads((d / CURVE_FILE).read_text()))
        intervals = {k: IntervalModel.from_dict(v) for k, v in json.loads((d / INTERVAL_FILE).read_text()).items()}
        type_ref = {k: float(v) for k, v in card["type_ref_rmse"].items()}
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputFileError(d, f"model files are missing or malformed ({type(e).__name__}: {e})",
                             "retrain with `quantpredict train`") from None
    if card.get("features", {}).get("stage_a") != STAGE_A_FEATURES:
        raise SchemaError(f"{d}: model was trained with other features than this version of quantpredict uses — "
                          "retrain with `quantpredict train`")
    missing = [f"{s}/{k}" for s in ("model", "family") for k in INTERVAL_KINDS if f"{s}/{k}" not in intervals]
    if missing:
        raise SchemaError(f"{d}: intervals.json lacks {', '.join(missing)} — retrain with `quantpredict train`")
    return Predictor(sa, curve, intervals, type_ref, card)


def default_model_dir() -> Path:
    """$QUANTPREDICT_MODEL if set, else models/default of the repository this package lives in."""
    env = os.environ.get("QUANTPREDICT_MODEL")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models" / "default"


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def render_readme(card: dict, sa: DistortionModel, curve: DropCurve) -> str:
    rows = card["training_data"]["rows"]
    pa = sa.params()
    val = card.get("validation") or {}
    lines = [
        f"# quantpredict model `{card['name']}`",
        "",
        "Generated by `quantpredict train` from `card.json`; do not edit by hand.",
        "",
        "## Where it is weak (read this first)",
        "",
    ]
    lines += [f"- {w}" for w in val.get("weaknesses", ["not cross-validated (trained with --no-validate)"])]
    lines += [
        "",
        "## What it predicts",
        "",
        f"- **Stage A** (distortion): {card['target']['stage_a']}. ln KLD = β0 + β·ln(params) + γ·ln(Σ_r w_r·e_r·"
        "method·imatrix + floor), e_r = each tensor role's part of the reference error² of the preset's real type "
        f"mix. Fitted: γ = {pa['gamma']:.2f}, size slopes "
        + ", ".join(f"{k} {v:.2f}" for k, v in pa["size_slope"].items()) + ", floor = "
        f"{math.exp(pa['floor_log_mse']):.2e} (error² units), imatrix factor {math.exp(pa['imatrix']):.2f}; role weights "
        + ", ".join(f"{k[2:]} ×{math.exp(v):.2f}" for k, v in pa["role_log_weight"].items())
        + "; method factors " + ", ".join(f"{k[7:]} ×{math.exp(v):.2f}" for k, v in pa["method"].items())
        + f". Calibrated on models of {math.exp(pa['size_range']['log_params'][0]) * 1e3:.1f}M to "
        f"{math.exp(pa['size_range']['log_params'][1]):.0f}B parameters.",
        f"- **Stage B** (accuracy): {card['target']['stage_b']}. drop = M·(1 − exp(−exp(a + δ_task + b·ln KLD))) "
        "per category: " + "; ".join(f"{c} M={v['top']:.0f}, a={v['a']:.2f}, b={v['b']:.2f}"
                                     for c, v in sorted(curve.category_.items()))
        + f"; {len(curve.task_offset_)} benchmarks with their own offset δ.",
        f"- Intervals: {card['target']['interval']}.",
        "",
        "## Training data",
        "",
        f"- hash `{card['training_data']['hash'][:16]}…`",
    ]
    lines += [f"- {k}: {v}" for k, v in rows.items()]
    lines += [f"- note: {n}" for n in card["training_data"].get("notes", [])]
    if val:
        lines += ["", "## Cross-validated metrics", "", val.get("markdown", "")]
    lines += ["", "## Package versions", ""]
    lines += [f"- {k} {v}" for k, v in card["package_versions"].items()]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in card["files"]["model"]) + ", `card.json`. No pickle anywhere.",
              ""]
    return "\n".join(lines)


__all__ = ["Predictor", "TASK_CATEGORIES", "fit_predictor", "load_model", "train"]
