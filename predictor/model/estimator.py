"""The two learned stages, scikit-learn style, persisted as text (JSON / LightGBM model text).

- `DistortionModel` (Stage A): ridge regression of ln(KLD) on the reference error of the quant's real
  type mix, imatrix, method class and model size. Linear on purpose: the distortion rows (KLD and
  PPL) come from ~25 models, far too few for trees to generalise to an unseen model, and the physics
  (KLD grows as a power of the weight error) is close to linear in logs.
- `DropRegressor` (Stage B): a parametric dose-response curve of the relative drop in distortion,
  one sensitivity per task category (`BaseCurve`), plus LightGBM boosters (0.1 / 0.5 / 0.9) that
  learn what the curve misses (model size, training length) as residuals on top of it; the point
  estimate is non-decreasing in predicted distortion. The curve carries the shape the data agree on
  (drop ~ KLD^b at small distortion, saturating at a total loss), so categories with few rows (math)
  still get their own sensitivity instead of being averaged into the others by the trees. Wraps
  LightGBM by composition; `fit` returns self, fitted attributes end in `_`.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import lightgbm as lgb
import numpy as np

from predictor.errors import SchemaError


class DistortionModel:
    """ln(KLD) ≈ X·coef + intercept (ridge; features standardised; NaN -> training mean).

    `predict` clips every feature to the range seen in training: a line fitted on models of 0.1B
    parameters and up must not be extrapolated to a 1M-parameter one (it predicted KLD 20 at Q2_K)."""

    def __init__(self, *, alpha: float = 1.0, feature_names: Sequence[str] = ()):
        self.alpha = alpha
        self.feature_names = list(feature_names)

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "DistortionModel":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.fill_ = np.array([np.nanmean(c) if np.isfinite(c).any() else 0.0 for c in X.T])
        Xf = np.where(np.isfinite(X), X, self.fill_)
        self.lo_, self.hi_ = Xf.min(axis=0), Xf.max(axis=0)
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
        Xf = np.clip(np.where(np.isfinite(X), X, self.fill_), self.lo_, self.hi_)
        return Xf @ self.coef_ + self.intercept_

    def to_dict(self) -> dict:
        return {
            "kind": "ridge",
            "alpha": self.alpha,
            "feature_names": self.feature_names,
            "coef": [float(c) for c in self.coef_],
            "intercept": self.intercept_,
            "fill": [float(f) for f in self.fill_],
            "low": [float(v) for v in self.lo_],
            "high": [float(v) for v in self.hi_],
            "resid_sd": self.resid_sd_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DistortionModel":
        try:
            m = cls(alpha=d["alpha"], feature_names=d["feature_names"])
            m.coef_ = np.asarray(d["coef"], dtype=np.float64)
            m.intercept_ = float(d["intercept"])
            m.fill_ = np.asarray(d["fill"], dtype=np.float64)
            m.lo_, m.hi_ = np.asarray(d["low"], dtype=np.float64), np.asarray(d["high"], dtype=np.float64)
            m.resid_sd_ = float(d["resid_sd"])
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"stage A model description is malformed ({e}) — retrain with `quantpredict train`") from None
        return m


class BaseCurve:
    """drop(x, g) = M_g * (1 - exp(-exp(a_g + b * x))), x = ln KLD, g = task category code.

    A complementary log-log link: drop ≈ M_g * e^a_g * KLD^b while small, M_g at collapse (M_g < 100
    where a collapsed model still scores chance level: multiple choice). Fitted by Huber least
    squares; each a_g and M_g is shrunk toward a shared value (ridge penalty `shrink`, in units of
    the mean row weight), so a category with few rows keeps close to the common curve; categories
    absent from training use the shared values. b > 0 keeps the curve non-decreasing in distortion."""

    def __init__(self, *, shrink: float = 2.0, huber: float = 5.0):
        self.shrink = shrink
        self.huber = huber

    @staticmethod
    def _curve(z: np.ndarray, top: np.ndarray | float = 100.0) -> np.ndarray:
        return top * -np.expm1(-np.exp(np.clip(z, -30.0, 5.0)))

    def fit(self, x: np.ndarray, g: np.ndarray, y: np.ndarray, w: np.ndarray) -> "BaseCurve":
        from scipy.optimize import least_squares

        codes = sorted({int(c) for c in g})
        idx = np.searchsorted(codes, g.astype(int))
        sw = np.sqrt(w / w.mean())
        lam = math.sqrt(self.shrink)
        k = len(codes)

        def resid(theta):
            a0, b, t0, a, t = theta[0], theta[1], theta[2], theta[3:3 + k], theta[3 + k:]
            r = (self._curve(a[idx] + b * x, t[idx]) - y) * sw
            return np.concatenate([r, lam * (a - a0), lam * (t - t0) / 20.0])

        theta0 = np.concatenate([[-3.0, 1.0, 80.0], np.full(k, -3.0), np.full(k, 80.0)])
        lo = np.concatenate([[-30.0, 0.05, 20.0], np.full(k, -30.0), np.full(k, 20.0)])
        hi = np.concatenate([[10.0, 5.0, 100.0], np.full(k, 10.0), np.full(k, 100.0)])
        sol = least_squares(resid, theta0, bounds=(lo, hi), loss="huber", f_scale=self.huber)
        self.a_shared_, self.b_, self.top_shared_ = (float(v) for v in sol.x[:3])
        self.a_ = {c: float(v) for c, v in zip(codes, sol.x[3:3 + k])}
        self.top_ = {c: float(v) for c, v in zip(codes, sol.x[3 + k:])}
        return self

    def predict(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        a = np.array([self.a_.get(int(c), self.a_shared_) for c in g])
        top = np.array([self.top_.get(int(c), self.top_shared_) for c in g])
        return self._curve(a + self.b_ * np.asarray(x, dtype=np.float64), top)

    def to_dict(self) -> dict:
        return {"kind": "cloglog", "shrink": self.shrink, "huber": self.huber, "a_shared": self.a_shared_,
                "b": self.b_, "top_shared": self.top_shared_, "a": {str(k): v for k, v in self.a_.items()},
                "top": {str(k): v for k, v in self.top_.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "BaseCurve":
        try:
            m = cls(shrink=float(d["shrink"]), huber=float(d["huber"]))
            m.a_shared_, m.b_, m.top_shared_ = float(d["a_shared"]), float(d["b"]), float(d["top_shared"])
            m.a_ = {int(k): float(v) for k, v in d["a"].items()}
            m.top_ = {int(k): float(v) for k, v in d["top"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SchemaError(f"stage B base curve is malformed ({e}) — retrain with `quantpredict train`") from None
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
    boosters at quantiles[0] / quantiles[2]. With `base=(dose_feature, group_feature)` all three fit
    the residual of a `BaseCurve` in those two features (LightGBM init scores) and `predict` adds
    the curve back."""

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
        base: Sequence[str] | None = None,
        seed: int = 0,
    ):
        self.huber_delta = huber_delta
        self.base = list(base) if base else None
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
                "learning_rate", "num_leaves", "min_child_samples", "reg_lambda", "huber_delta", "base", "seed"]
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
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        cats = [self.feature_names.index(c) for c in self.categorical]
        self.base_ = BaseCurve().fit(*self._base_inputs(X), y, w) if self.base else None
        init = self._base_predict(X)
        self.boosters_ = []
        for q in self.quantiles:
            ds = lgb.Dataset(X, label=y, weight=w, init_score=init,
                             feature_name=self.feature_names, categorical_feature=cats or "auto",
                             free_raw_data=False, params={"verbosity": -1})
            self.boosters_.append(lgb.train(self._params(q), ds, num_boost_round=self.n_estimators))
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        base = self._base_predict(X)
        lo, mid, hi = (b.predict(X) + base for b in self.boosters_)
        # Quantile boosters are fitted separately and may cross; order them.
        return mid, np.minimum(lo, mid), np.maximum(hi, mid)

    def _base_inputs(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dose, group = (self.feature_names.index(f) for f in self.base)
        return X[:, dose], X[:, group]

    def _base_predict(self, X: np.ndarray) -> np.ndarray:
        return self.base_.predict(*self._base_inputs(X)) if self.base_ is not None else np.zeros(len(X))

    def model_texts(self) -> list[str]:
        return [b.model_to_string() for b in self.boosters_]

    def base_dict(self) -> dict | None:
        return self.base_.to_dict() if self.base_ is not None else None

    @classmethod
    def from_texts(cls, texts: Sequence[str], params: dict, base: dict | None = None) -> "DropRegressor":
        m = cls(**params)
        try:
            m.boosters_ = [lgb.Booster(model_str=t) for t in texts]
        except lgb.basic.LightGBMError as e:
            raise SchemaError(f"a LightGBM model file is malformed ({e}) — retrain with `quantpredict train`") from None
        if bool(m.base) != (base is not None):
            raise SchemaError("stage B base curve is missing or unexpected — retrain with `quantpredict train`")
        m.base_ = BaseCurve.from_dict(base) if base is not None else None
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
