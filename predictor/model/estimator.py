"""The two learned stages, scikit-learn style, persisted as text (JSON / LightGBM model text).

- `DistortionModel` (Stage A): ridge regression of ln(KLD) on the reference error of the quant's real
  type mix, imatrix, method class, model size and tokens/parameter. Linear on purpose: the distortion
  rows come from ~25 models, far too few for trees to generalise to an unseen model, and the physics
  (KLD grows as a power of the weight error) is close to linear in logs.
- `DropRegressor` (Stage B): LightGBM quantile boosters (0.1 / 0.5 / 0.9) for the relative accuracy
  drop, with the drop constrained to be non-decreasing in predicted distortion. Wraps LightGBM by
  composition; `fit` returns self, fitted attributes end in `_`.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import lightgbm as lgb
import numpy as np

from predictor.errors import SchemaError


class DistortionModel:
    """ln(KLD) ≈ X·coef + intercept (ridge; features standardised; NaN -> training mean)."""

    def __init__(self, *, alpha: float = 1.0, feature_names: Sequence[str] = ()):
        self.alpha = alpha
        self.feature_names = list(feature_names)

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "DistortionModel":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.fill_ = np.array([np.nanmean(c) if np.isfinite(c).any() else 0.0 for c in X.T])
        Xf = np.where(np.isfinite(X), X, self.fill_)
        mu = np.average(Xf, axis=0, weights=w)
        sd = np.sqrt(np.average((Xf - mu) ** 2, axis=0, weights=w))
        sd[sd == 0] = 1.0
        Z = (Xf - mu) / sd
        ym = np.average(y, weights=w)
        sw = np.sqrt(w)[:, None]
        A = Z * sw
        b = (y - ym) * sw[:, 0]
        beta = np.linalg.solve(A.T @ A + self.alpha * np.eye(Z.shape[1]), A.T @ b)
        self.coef_ = beta / sd
        self.intercept_ = float(ym - (mu / sd) @ beta)
        resid = y - self.predict(X)
        self.resid_sd_ = float(np.sqrt(np.average(resid**2, weights=w)))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        Xf = np.where(np.isfinite(X), X, self.fill_)
        return Xf @ self.coef_ + self.intercept_

    def to_dict(self) -> dict:
        return {
            "kind": "ridge",
            "alpha": self.alpha,
            "feature_names": self.feature_names,
            "coef": [float(c) for c in self.coef_],
            "intercept": self.intercept_,
            "fill": [float(f) for f in self.fill_],
            "resid_sd": self.resid_sd_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DistortionModel":
        try:
            m = cls(alpha=d["alpha"], feature_names=d["feature_names"])
            m.coef_ = np.asarray(d["coef"], dtype=np.float64)
            m.intercept_ = float(d["intercept"])
            m.fill_ = np.asarray(d["fill"], dtype=np.float64)
            m.resid_sd_ = float(d["resid_sd"])
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"stage A model description is malformed ({e}) — retrain with `quantpredict train`") from None
        return m


LGB_DEFAULTS = dict(
    n_estimators=300,
    learning_rate=0.04,
    num_leaves=8,
    min_child_samples=20,
    reg_lambda=1.0,
)


class DropRegressor:
    """LightGBM boosters for the relative drop: `predict` returns (point, low, high).

    The point booster is a Huber fit, non-decreasing in `monotone_increasing`; low/high are quantile
    boosters at quantiles[0] / quantiles[2]."""

    def __init__(
        self,
        *,
        feature_names: Sequence[str] = (),
        categorical: Sequence[str] = (),
        monotone_increasing: Sequence[str] = (),
        quantiles: tuple[float, float, float] = (0.1, 0.5, 0.9),
        n_estimators: int = LGB_DEFAULTS["n_estimators"],
        learning_rate: float = LGB_DEFAULTS["learning_rate"],
        num_leaves: int = LGB_DEFAULTS["num_leaves"],
        min_child_samples: int = LGB_DEFAULTS["min_child_samples"],
        reg_lambda: float = LGB_DEFAULTS["reg_lambda"],
        huber_delta: float = 5.0,
        seed: int = 0,
    ):
        self.huber_delta = huber_delta
        self.feature_names = list(feature_names)
        self.categorical = list(categorical)
        self.monotone_increasing = list(monotone_increasing)
        self.quantiles = tuple(quantiles)
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.seed = seed

    def get_params(self, deep: bool = True) -> dict:
        keys = ["feature_names", "categorical", "monotone_increasing", "quantiles", "n_estimators",
                "learning_rate", "num_leaves", "min_child_samples", "reg_lambda", "huber_delta", "seed"]
        return {k: getattr(self, k) for k in keys}

    def _params(self, alpha: float) -> dict:
        # LightGBM refuses monotone constraints with the quantile objective, so the point estimate
        # is a Huber fit (robust to the noisy rows, monotone in distortion) and only the interval
        # bounds are quantile boosters (unconstrained; `predict` orders the three).
        point = abs(alpha - 0.5) < 1e-9
        mono = [1 if (point and f in self.monotone_increasing) else 0 for f in self.feature_names]
        params = {
            "objective": "huber" if point else "quantile",
            "alpha": self.huber_delta if point else alpha,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "lambda_l2": self.reg_lambda,
            "min_data_per_group": 5,
            "cat_smooth": 5.0,
            "max_cat_to_onehot": 8,
            "num_threads": 1,
            "deterministic": True,
            "force_row_wise": True,
            "seed": self.seed,
            "verbosity": -1,
        }
        if any(mono):  # even an all-zero list is refused with the quantile objective
            params.update(monotone_constraints=mono, monotone_constraints_method="advanced")
        return params

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "DropRegressor":
        X = np.asarray(X, dtype=np.float64)
        cats = [self.feature_names.index(c) for c in self.categorical]
        self.boosters_ = []
        for q in self.quantiles:
            ds = lgb.Dataset(X, label=np.asarray(y, dtype=np.float64), weight=sample_weight,
                             feature_name=self.feature_names, categorical_feature=cats or "auto",
                             free_raw_data=False, params={"verbosity": -1})
            self.boosters_.append(lgb.train(self._params(q), ds, num_boost_round=self.n_estimators))
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        lo, mid, hi = (b.predict(X) for b in self.boosters_)
        # Quantile boosters are fitted separately and may cross; order them.
        return mid, np.minimum(lo, mid), np.maximum(hi, mid)

    def model_texts(self) -> list[str]:
        return [b.model_to_string() for b in self.boosters_]

    @classmethod
    def from_texts(cls, texts: Sequence[str], params: dict) -> "DropRegressor":
        m = cls(**params)
        try:
            m.boosters_ = [lgb.Booster(model_str=t) for t in texts]
        except lgb.basic.LightGBMError as e:
            raise SchemaError(f"a LightGBM model file is malformed ({e}) — retrain with `quantpredict train`") from None
        m.n_features_in_ = len(m.feature_names)
        return m


def json_dumps(obj) -> str:
    """Stable JSON for artifacts (sorted keys, floats rounded to 10 significant digits)."""
    def clean(o):
        if isinstance(o, float):
            return float(f"{o:.10g}") if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        return o
    return json.dumps(clean(obj), indent=2, sort_keys=True) + "\n"
