"""Fit the two stages, persist them as text (no pickle), load them back.

    from predictor.model.train import train, load_model
    train("training_data", "models/default")      # fit + grouped CV + card.json + README.md
    predictor = load_model("models/default")

Artifacts in a model directory:
    stage_a.json                 ridge coefficients of ln(KLD), feature names, fill values
    drop_curve.json              Stage B's dose-response curve (per task category) of the relative drop
    drop_q10.txt / q50 / q90     LightGBM text models of the drop's residual from that curve (percent,
                                 positive = worse)
    card.json                    features in order, target definition, training-data hash and row
                                 counts, package versions, reference errors, conformal widening,
                                 cross-validated metrics of the model and of the baselines
    README.md                    generated from card.json
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
from predictor.model.estimator import DistortionModel, DropRegressor, json_dumps
from predictor.model.features import (
    STAGE_A_FEATURES,
    STAGE_B_FEATURES,
    TASK_CATEGORIES,
    Tables,
    build_tables,
)

CARD_VERSION = 2
QUANTILES = (0.1, 0.5, 0.9)
BOOSTER_FILES = ("drop_q10.txt", "drop_q50.txt", "drop_q90.txt")
BASE_FILE = "drop_curve.json"
TARGET_DEFINITION = (
    "relative_drop_pct = (baseline - quantized) / baseline x 100 for a higher-is-better percent score "
    "(positive = worse), clipped to [-30, 100]; rows flagged unreliable are excluded"
)
STAGE_A_TARGET = "ln(mean KL divergence of the quantized model's next-token distribution vs the 16-bit model)"
CATEGORY_CODE = {c: float(i) for i, c in enumerate(TASK_CATEGORIES)}


@dataclass
class Predictor:
    """A loaded (or freshly fitted) two-stage predictor."""

    stage_a: DistortionModel
    stage_b: DropRegressor
    type_ref: dict[str, float]
    conformal: dict[str, float]  # extra half-width (pp) of the 80% interval on llama.cpp presets: 'model' / 'family' held out
    card: dict

    def log_kld(self, feats: pl.DataFrame) -> np.ndarray:
        """Stage A on rows holding STAGE_A_FEATURES (is_ppl forced to 0: we predict KLD)."""
        return self.stage_a.predict(stage_a_matrix(feats.with_columns(pl.lit(0.0).alias("is_ppl"))))

    def drop(self, feats: pl.DataFrame, log_kld: np.ndarray, *, unseen_family: bool | np.ndarray = False):
        """(point, low, high) relative drop in percent; the 80% interval is widened by the conformal
        half-width measured with whole models held out, or whole families when the family is unseen."""
        mid, lo, hi = self.stage_b.predict(stage_b_matrix(feats, log_kld))
        q = np.where(np.asarray(unseen_family), self.conformal.get("family", 0.0), self.conformal.get("model", 0.0))
        return mid, lo - q, hi + q


def stage_a_matrix(df: pl.DataFrame) -> np.ndarray:
    return df.select([pl.col(c).cast(pl.Float64) for c in STAGE_A_FEATURES]).to_numpy()


def stage_b_matrix(df: pl.DataFrame, log_kld: np.ndarray) -> np.ndarray:
    cat = np.array([CATEGORY_CODE[c] for c in df.get_column("task_category").to_list()], dtype=np.float64)
    cols = {"log_kld": np.asarray(log_kld, dtype=np.float64), "task_category": cat}
    return np.column_stack([cols[f] if f in cols else df.get_column(f).cast(pl.Float64).to_numpy()
                            for f in STAGE_B_FEATURES])


def fit_stage_a(stage_a: pl.DataFrame) -> DistortionModel:
    return DistortionModel(alpha=1.0, feature_names=STAGE_A_FEATURES).fit(
        stage_a_matrix(stage_a), stage_a.get_column("y").to_numpy(), stage_a.get_column("weight").to_numpy())


def new_stage_b() -> DropRegressor:
    # Few, shallow trees on top of the curve: grouped CV got worse with more boosting (300 rounds
    # of 8 leaves: MAE 7.64 -> 7.53 pp at 100 rounds of 4 leaves, models held out).
    return DropRegressor(feature_names=STAGE_B_FEATURES, categorical=["task_category"],
                         monotone_increasing=["log_kld"], quantiles=QUANTILES,
                         base=["log_kld", "task_category"], n_estimators=100, num_leaves=4,
                         min_child_samples=50)


def fit_predictor(tables: Tables, *, stage_a_rows: pl.DataFrame | None = None,
                  stage_b_rows: pl.DataFrame | None = None) -> tuple[DistortionModel, DropRegressor]:
    a_rows = tables.stage_a if stage_a_rows is None else stage_a_rows
    b_rows = tables.stage_b if stage_b_rows is None else stage_b_rows
    sa = fit_stage_a(a_rows)
    lk = sa.predict(stage_a_matrix(b_rows.with_columns(pl.lit(0.0).alias("is_ppl"))))
    sb = new_stage_b().fit(stage_b_matrix(b_rows, lk), b_rows.get_column("y").to_numpy(),
                           b_rows.get_column("weight").to_numpy())
    return sa, sb


def _versions() -> dict[str, str]:
    import lightgbm
    import polars
    import sklearn

    import predictor

    return {
        "python": platform.python_version(),
        "quantpredict": predictor.__version__,
        "lightgbm": lightgbm.__version__,
        "numpy": np.__version__,
        "polars": polars.__version__,
        "scikit-learn": sklearn.__version__,
    }


def train(training_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "models/default", *,
          validate: bool = True, progress=None, tables: Tables | None = None) -> Path:
    """Fit on all of `training_dir` and write the artifacts; with `validate`, run grouped CV first
    (it sets the conformal interval widening and the card's metrics)."""
    from predictor.model import validate as val

    tables = tables if tables is not None else build_tables(training_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cv = val.cross_validate(tables, progress=progress) if validate else None
    sa, sb = fit_predictor(tables)
    conformal = cv.conformal if cv else {"model": 0.0, "family": 0.0}
    (out / "stage_a.json").write_text(json_dumps(sa.to_dict()))
    texts = sb.model_texts()
    for name, text in zip(BOOSTER_FILES, texts):
        (out / name).write_text(text)
    (out / BASE_FILE).write_text(json_dumps(sb.base_dict()))
    card = {
        "card_version": CARD_VERSION,
        "name": out.name,
        "target": {"stage_b": TARGET_DEFINITION, "stage_a": STAGE_A_TARGET,
                   "interval": "80% (quantile boosters at 0.1/0.9, widened by split-conformal half-widths "
                               "measured on the llama.cpp rows)"},
        "features": {"stage_a": STAGE_A_FEATURES, "stage_b": STAGE_B_FEATURES,
                     "task_category_codes": CATEGORY_CODE},
        "stage_b_params": {k: v for k, v in sb.get_params().items()},
        "files": {"stage_a": "stage_a.json", "stage_b": list(BOOSTER_FILES), "stage_b_curve": BASE_FILE,
                  "sha256": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in zip(BOOSTER_FILES, texts)}},
        "training_data": {"hash": tables.data_hash, "rows": tables.source_rows, "notes": tables.notes,
                          "families": sorted(set(tables.stage_b.get_column("family").to_list())),
                          "models": sorted(set(tables.stage_b.get_column("model").to_list()))},
        "type_ref_rmse": tables.type_ref,
        "conformal_halfwidth_pp": conformal,
        "package_versions": _versions(),
        "validation": cv.summary if cv else None,
    }
    (out / "card.json").write_text(json_dumps(card))
    (out / "README.md").write_text(render_readme(card))
    return out


def load_model(model_dir: str | os.PathLike | None = None) -> Predictor:
    """Load a model directory written by `train` (text files only; never unpickles anything)."""
    d = Path(model_dir) if model_dir is not None else default_model_dir()
    card_path = d / "card.json"
    if not card_path.is_file():
        raise InputFileError(d, "is not a quantpredict model directory (no card.json)",
                             "pass a folder written by `quantpredict train` (e.g. models/default)")
    try:
        card = json.loads(card_path.read_text())
        sa = DistortionModel.from_dict(json.loads((d / card["files"]["stage_a"]).read_text()))
        texts = [(d / f).read_text() for f in card["files"]["stage_b"]]
        params = dict(card["stage_b_params"])
        params["quantiles"] = tuple(params["quantiles"])
        curve = card["files"].get("stage_b_curve")
        sb = DropRegressor.from_texts(texts, params, json.loads((d / curve).read_text()) if curve else None)
        type_ref = {k: float(v) for k, v in card["type_ref_rmse"].items()}
        conformal = {k: float(v) for k, v in card["conformal_halfwidth_pp"].items()}
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise InputFileError(d, f"model files are missing or malformed ({type(e).__name__}: {e})",
                             "retrain with `quantpredict train`") from None
    if card.get("features", {}).get("stage_b") != STAGE_B_FEATURES or card["features"].get("stage_a") != STAGE_A_FEATURES:
        raise SchemaError(f"{d}: model was trained with other features than this version of quantpredict uses — "
                          "retrain with `quantpredict train`")
    return Predictor(sa, sb, type_ref, conformal, card)


def default_model_dir() -> Path:
    """$QUANTPREDICT_MODEL if set, else models/default of the repository this package lives in."""
    env = os.environ.get("QUANTPREDICT_MODEL")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models" / "default"


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def render_readme(card: dict) -> str:
    rows = card["training_data"]["rows"]
    lines = [
        f"# quantpredict model `{card['name']}`",
        "",
        "Generated by `quantpredict train` from `card.json`; do not edit by hand.",
        "",
        "## What it predicts",
        "",
        f"- **Stage A** (distortion): {card['target']['stage_a']}; ridge regression on "
        f"{', '.join(card['features']['stage_a'])}.",
        f"- **Stage B** (accuracy): {card['target']['stage_b']}. A dose-response curve of the drop in "
        "`log_kld`, one sensitivity and ceiling per task category (`drop_curve.json`), plus LightGBM boosters "
        f"(Huber point, 0.1/0.9 quantiles) on its residuals with {', '.join(card['features']['stage_b'])}; "
        "the point estimate is non-decreasing in `log_kld`.",
        f"- Interval: {card['target']['interval']}; half-widths added: "
        f"{_fmt(card['conformal_halfwidth_pp'].get('model'))} pp (known family), "
        f"{_fmt(card['conformal_halfwidth_pp'].get('family'))} pp (unseen family).",
        "",
        "## Training data",
        "",
        f"- hash `{card['training_data']['hash'][:16]}…`",
    ]
    lines += [f"- {k}: {v}" for k, v in rows.items()]
    lines += [f"- note: {n}" for n in card["training_data"].get("notes", [])]
    val = card.get("validation")
    if val:
        lines += ["", "## Cross-validated metrics", "", val.get("markdown", "")]
    lines += ["", "## Package versions", ""]
    lines += [f"- {k} {v}" for k, v in card["package_versions"].items()]
    lines += ["", "Files: `stage_a.json`, `drop_curve.json`, " + ", ".join(f"`{f}`" for f in card["files"]["stage_b"])
              + ", `card.json`. No pickle anywhere.", ""]
    return "\n".join(lines)
