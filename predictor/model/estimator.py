"""The learned pieces of the predictor, scikit-learn style, persisted as JSON (no pickle).

- `DistortionModel` (Stage A): the output distortion (ln KLD) of a quantized model from the
  reference error of each tensor role, a floor, the model's size and the method:

      S     = exp(μ_method + μ_imatrix · imatrix) · Σ_r exp(ρ_r) · e_r  +  exp(φ)
      ln KLD = β0 + β_size · (ln params, ln tokens/param, ln vocab) + γ · ln S  (+ offsets: PPL target, our suite)

  e_r is role r's part of the reference error² (so Σ_r e_r is the element-weighted error); ρ_r
  are fitted role weights, ridge-shrunk toward 0 (= weigh by element count); exp(φ) is the
  floor that activation quantization and engine arithmetic add even at 8 bits; μ_method ≤ 0
  (GPTQ/AWQ/... are no worse than round-to-nearest at equal bits) and μ_imatrix ≤ 0.
- `DropCurve` (Stage B): the relative accuracy drop as a dose-response curve in KLD,

      drop(KLD) = M_c · (1 − exp(−exp(a_c + δ_t + b_c · ln KLD)))

  per task category c (ceiling M_c, offset a_c, slope b_c, each shrunk toward a shared value) and
  per benchmark t (offset δ_t shrunk toward 0). Strictly increasing in KLD, zero at KLD → 0,
  never above 100. Rows measured against a llama.cpp preset (Q8_0) are fitted as the difference
  of two points on the curve.
- `IntervalModel`: the spread of the true drop around the point, s = α + β·point, and the factor κ
  on a row's measurement noise, fitted by maximum likelihood on cross-validated residuals; the
  conformal multiplier that makes the interval cover 80% comes from the same residuals.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from predictor.errors import SchemaError

_CLIP_Z = (-30.0, 5.0)


def _least_squares(*args, **kwargs):
    from scipy.optimize import least_squares  # training only: prediction never imports scipy

    return least_squares(*args, **kwargs)


def _minimize(*args, **kwargs):
    from scipy.optimize import minimize

    return minimize(*args, **kwargs)


def _malformed(what: str, e: Exception):
    return SchemaError(f"{what} is malformed ({type(e).__name__}: {e}) — retrain with `quantpredict train`")


class DistortionModel:
    """ln KLD from role errors; see the module docstring for the form.

    X columns: `role_features` (nonnegative error parts), then `imatrix`, the `size_features`
    (log_params, ...), the 0/1 `offset_features` (kind of target: is_ppl, is_own), then one 0/1 column
    per constrained method class (`method_features`). Predictions are for offsets 0: a KLD as
    llama-perplexity --kl-divergence reports it.
    Size features are centred, NaN filled with the training mean, and clipped to the training range at
    prediction (`in_range` tells whether they had to be)."""

    _N_FIXED = 4  # b0, gamma, floor, imatrix

    def __init__(self, *, role_features: Sequence[str] = (), size_features: Sequence[str] = ("log_params",),
                 offset_features: Sequence[str] = ("is_ppl",), method_features: Sequence[str] = (),
                 role_shrink: float = 1.0, size_shrink: float = 0.3, loss: str = "soft_l1", f_scale: float = 1.0):
        self.role_features = list(role_features)
        self.size_features = list(size_features)
        self.offset_features = list(offset_features)
        self.method_features = list(method_features)
        self.role_shrink = role_shrink
        self.size_shrink = size_shrink
        self.loss = loss
        self.f_scale = f_scale

    @property
    def feature_names(self) -> list[str]:
        return [*self.role_features, "imatrix", *self.size_features, *self.offset_features, *self.method_features]

    def _split(self, X: np.ndarray):
        k, ns, no = len(self.role_features), len(self.size_features), len(self.offset_features)
        return (X[:, :k], X[:, k], X[:, k + 1:k + 1 + ns], X[:, k + 1 + ns:k + 1 + ns + no],
                X[:, k + 1 + ns + no:])

    def _slices(self):
        k, ns, no = len(self.role_features), len(self.size_features), len(self.offset_features)
        nm = len(self.method_features)
        a = self._N_FIXED
        b = a + ns + no
        return slice(a, a + ns), slice(a + ns, b), slice(b, b + k - 1), slice(b + k - 1, b + k - 1 + nm)

    def _eta(self, theta: np.ndarray, E, imat, Z, O, M) -> np.ndarray:
        b0, gamma, phi, mu_im = theta[:self._N_FIXED]
        s_size, s_off, s_role, s_meth = self._slices()
        rho = np.concatenate([theta[s_role], [0.0]])  # the last role ("other") is the reference
        s = np.exp(M @ theta[s_meth] + mu_im * imat) * (E @ np.exp(rho)) + math.exp(phi)
        return b0 + Z @ theta[s_size] + gamma * np.log(s) + O @ theta[s_off]

    def _standardize(self, S: np.ndarray, clip: bool) -> np.ndarray:
        S = np.where(np.isfinite(S), S, self.size_center_)
        if clip:
            S = np.clip(S, self.size_lo_, self.size_hi_)
        return S - self.size_center_

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "DistortionModel":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        E, imat, S, O, M = self._split(X)
        imat = np.nan_to_num(imat, nan=0.5)
        self.size_center_ = np.array([np.average(c[np.isfinite(c)], weights=w[np.isfinite(c)])
                                      if np.isfinite(c).any() else 0.0 for c in S.T])
        Sf = np.where(np.isfinite(S), S, self.size_center_)
        self.size_lo_, self.size_hi_ = Sf.min(axis=0), Sf.max(axis=0)
        Z = Sf - self.size_center_
        k, ns, no, nm = E.shape[1], S.shape[1], O.shape[1], M.shape[1]
        s_size, _, s_role, s_meth = self._slices()
        sw = np.sqrt(w / w.mean())
        lam, lam_s = math.sqrt(self.role_shrink), math.sqrt(self.size_shrink)

        def resid(theta):
            r = (self._eta(theta, E, imat, Z, O, M) - y) * sw
            return np.concatenate([r, lam * theta[s_role], lam_s * theta[s_size], 0.3 * theta[s_meth]])

        #                  b0   gamma phi    mu_im
        theta0 = np.array([3.0, 1.0, -9.0, -0.2] + [0.0] * (ns + no) + [0.0] * (k - 1) + [-0.2] * nm)
        lo = np.array([-20.0, 0.3, -20.0, -2.0] + [-3.0] * ns + [-5.0] * no + [-4.0] * (k - 1) + [-3.0] * nm)
        hi = np.array([20.0, 2.5, -2.0, 0.0] + [3.0] * ns + [5.0] * no + [4.0] * (k - 1) + [0.0] * nm)
        sol = _least_squares(resid, theta0, bounds=(lo, hi), loss=self.loss, f_scale=self.f_scale)
        self.theta_ = sol.x
        res = y - self._eta(self.theta_, E, imat, Z, O, M)
        self.resid_sd_ = float(np.sqrt(np.average(res**2, weights=w)))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        E, imat, S, O, M = self._split(X)
        return self._eta(self.theta_, E, np.nan_to_num(imat, nan=0.5), self._standardize(S, True), O, M)

    def in_range(self, X: np.ndarray) -> np.ndarray:
        """Rows whose known size features all lie inside the training range."""
        S = self._split(np.asarray(X, dtype=np.float64))[2]
        ok = ~np.isfinite(S) | ((S >= self.size_lo_ - 1e-9) & (S <= self.size_hi_ + 1e-9))
        return ok.all(axis=1)

    def offset(self, name: str) -> float:
        """Fitted ln offset of a kind of target (is_ppl: ln ln(PPL ratio) − ln KLD at equal distortion;
        is_own: our measurement suite's KLD − llama-perplexity's) — to read a measurement as a KLD."""
        return float(self.theta_[self._slices()[1]][self.offset_features.index(name)])

    def params(self) -> dict:
        t = self.theta_
        s_size, s_off, s_role, s_meth = self._slices()
        return {
            "intercept": t[0], "gamma": t[1], "floor_log_mse": t[2], "imatrix": t[3],
            "size_slope": dict(zip(self.size_features, t[s_size])),
            "offsets": dict(zip(self.offset_features, t[s_off])),
            "role_log_weight": {**dict(zip(self.role_features[:-1], t[s_role])), self.role_features[-1]: 0.0},
            "method": dict(zip(self.method_features, t[s_meth])),
            "size_center": dict(zip(self.size_features, self.size_center_)),
            "size_range": {f: [lo, hi] for f, lo, hi in zip(self.size_features, self.size_lo_, self.size_hi_)},
        }

    def to_dict(self) -> dict:
        return {"kind": "role-weighted power law with floor", "role_features": self.role_features,
                "size_features": self.size_features, "offset_features": self.offset_features,
                "method_features": self.method_features,
                "role_shrink": self.role_shrink, "size_shrink": self.size_shrink, "loss": self.loss,
                "f_scale": self.f_scale, "theta": [float(v) for v in self.theta_],
                "size_center": [float(v) for v in self.size_center_], "size_low": [float(v) for v in self.size_lo_],
                "size_high": [float(v) for v in self.size_hi_], "resid_sd": self.resid_sd_, "readable": self.params()}

    @classmethod
    def from_dict(cls, d: dict) -> "DistortionModel":
        try:
            m = cls(role_features=d["role_features"], size_features=d["size_features"],
                    offset_features=d["offset_features"], method_features=d["method_features"], role_shrink=float(d["role_shrink"]),
                    size_shrink=float(d["size_shrink"]), loss=d["loss"], f_scale=float(d["f_scale"]))
            m.theta_ = np.asarray(d["theta"], dtype=np.float64)
            m.size_center_, m.size_lo_, m.size_hi_ = (np.asarray(d[k], dtype=np.float64)
                                                      for k in ("size_center", "size_low", "size_high"))
            m.resid_sd_ = float(d["resid_sd"])
            n = (cls._N_FIXED + len(m.size_features) + len(m.offset_features) + len(m.role_features) - 1
                 + len(m.method_features))
            if len(m.theta_) != n or len(m.size_center_) != len(m.size_features):
                raise ValueError("parameter count does not match the features")
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed("stage A model description", e) from None
        return m


class DropCurve:
    """drop = M_c (1 − exp(−exp(a_c + δ_t + b_c x))), x = ln KLD; see the module docstring.

    `fit(x, x_ref, c, t, y, w)`: x_ref is the reference quant's ln KLD for rows measured against a
    llama.cpp preset (NaN for a 16-bit baseline); c / t are category / task names. Categories and
    tasks absent from training use the shared values / no offset. With `per_category=False` and
    `per_task=False` it is one global curve (a validation baseline)."""

    def __init__(self, *, shrink: float = 2.0, task_shrink: float = 4.0, huber: float = 5.0,
                 per_category: bool = True, per_task: bool = True, min_task_rows: int = 3):
        self.shrink = shrink
        self.task_shrink = task_shrink
        self.huber = huber
        self.per_category = per_category
        self.per_task = per_task
        self.min_task_rows = min_task_rows

    @staticmethod
    def curve(z: np.ndarray, top) -> np.ndarray:
        return top * -np.expm1(-np.exp(np.clip(z, *_CLIP_Z)))

    @staticmethod
    def relative_to(f: np.ndarray, f_ref: np.ndarray) -> np.ndarray:
        """Drop against a reference that itself lost f_ref % (NaN reference -> against 16 bits)."""
        f_ref = np.nan_to_num(f_ref, nan=0.0)
        return 100.0 * (1.0 - (1.0 - f / 100.0) / np.maximum(1e-6, 1.0 - f_ref / 100.0))

    def fit(self, x, x_ref, c, t, y, w) -> "DropCurve":
        x, x_ref, y, w = (np.asarray(v, dtype=np.float64) for v in (x, x_ref, y, w))
        c = np.asarray(c if self.per_category else ["*"] * len(y), dtype=object)
        t = np.asarray(t if self.per_task else ["*"] * len(y), dtype=object)
        cats = sorted(set(c.tolist()))
        counts = {k: int((t == k).sum()) for k in set(t.tolist())}
        tasks = sorted(k for k, n in counts.items() if n >= self.min_task_rows) if self.per_task else []
        ci = np.array([cats.index(v) for v in c])
        ti = np.array([tasks.index(v) + 1 if v in tasks else 0 for v in t])  # 0: no offset
        has_ref = np.isfinite(x_ref)
        xr = np.where(has_ref, x_ref, 0.0)
        kc, kt = len(cats), len(tasks)
        sw = np.sqrt(w / w.mean())
        lam, lam_t = math.sqrt(self.shrink), math.sqrt(self.task_shrink)

        def unpack(th):
            a0, b0, m0 = th[:3]
            a, b, m = th[3:3 + kc], th[3 + kc:3 + 2 * kc], th[3 + 2 * kc:3 + 3 * kc]
            d = np.concatenate([[0.0], th[3 + 3 * kc:]])
            return a0, b0, m0, a, b, m, d

        def predict_rows(th):
            _, _, _, a, b, m, d = unpack(th)
            z = a[ci] + d[ti]
            f = self.curve(z + b[ci] * x, m[ci])
            f_ref = np.where(has_ref, self.curve(z + b[ci] * xr, m[ci]), np.nan)
            return self.relative_to(f, f_ref)

        def resid(th):
            a0, b0, m0, a, b, m, d = unpack(th)
            r = (predict_rows(th) - y) * sw
            return np.concatenate([r, lam * (a - a0), 3.0 * lam * (b - b0), lam * (m - m0) / 20.0, lam_t * d[1:]])

        theta0 = np.concatenate([[-1.0, 1.0, 80.0], np.full(kc, -1.0), np.full(kc, 1.0), np.full(kc, 80.0),
                                 np.zeros(kt)])
        lo = np.concatenate([[-30.0, 0.2, 20.0], np.full(kc, -30.0), np.full(kc, 0.2), np.full(kc, 20.0),
                             np.full(kt, -6.0)])
        hi = np.concatenate([[10.0, 3.0, 100.0], np.full(kc, 10.0), np.full(kc, 3.0), np.full(kc, 100.0),
                             np.full(kt, 6.0)])
        sol = _least_squares(resid, theta0, bounds=(lo, hi), loss="huber", f_scale=self.huber)
        a0, b0, m0, a, b, m, d = unpack(sol.x)
        self.shared_ = {"a": float(a0), "b": float(b0), "top": float(m0)}
        self.category_ = {k: {"a": float(a[i]), "b": float(b[i]), "top": float(m[i])} for i, k in enumerate(cats)}
        self.task_offset_ = {k: float(d[i + 1]) for i, k in enumerate(tasks)}
        self.task_category_ = {k: str(c[np.flatnonzero(t == k)[0]]) for k in tasks}
        return self

    def _params(self, c, t):
        n = len(c)
        if not self.per_category:
            c = ["*"] * n
        if not self.per_task:
            t = ["*"] * n
        p = [self.category_.get(ci, self.shared_) for ci in c]
        a = np.array([q["a"] for q in p]) + np.array([self.task_offset_.get(ti, 0.0) for ti in t])
        return a, np.array([q["b"] for q in p]), np.array([q["top"] for q in p])

    def predict(self, x, c, t, x_ref=None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        a, b, top = self._params(list(c), list(t))
        f = self.curve(a + b * x, top)
        if x_ref is None:
            return f
        x_ref = np.asarray(x_ref, dtype=np.float64)
        f_ref = np.where(np.isfinite(x_ref), self.curve(a + b * np.nan_to_num(x_ref), top), np.nan)
        return self.relative_to(f, f_ref)

    def to_dict(self) -> dict:
        return {"kind": "cloglog per category and task", "shrink": self.shrink, "task_shrink": self.task_shrink,
                "huber": self.huber, "per_category": self.per_category, "per_task": self.per_task,
                "min_task_rows": self.min_task_rows, "shared": self.shared_, "category": self.category_,
                "task_offset": self.task_offset_, "task_category": self.task_category_}

    @classmethod
    def from_dict(cls, d: dict) -> "DropCurve":
        try:
            m = cls(shrink=float(d["shrink"]), task_shrink=float(d["task_shrink"]), huber=float(d["huber"]),
                    per_category=bool(d["per_category"]), per_task=bool(d["per_task"]),
                    min_task_rows=int(d["min_task_rows"]))
            m.shared_ = {k: float(d["shared"][k]) for k in ("a", "b", "top")}
            m.category_ = {c: {k: float(v[k]) for k in ("a", "b", "top")} for c, v in d["category"].items()}
            m.task_offset_ = {k: float(v) for k, v in d["task_offset"].items()}
            m.task_category_ = {k: str(v) for k, v in d["task_category"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _malformed("stage B drop curve", e) from None
        return m


class IntervalModel:
    """Spread of the drop around the point prediction, for one kind of row.

    A residual r (measured − predicted) is modelled as N(0, s² + (κ·noise)²), s = α + β·point: s is
    the model's own error (where the *true* drop lies), κ·noise what a benchmark's finite item count
    adds. α, β, κ are fitted by maximum likelihood; `q` is the conformal quantile of
    |r| / sqrt(s² + (κ·noise)²) at the coverage target, so the interval point ± q·sqrt(...) covers
    that share of the calibration rows; the true-drop interval is point ± q·s."""

    def __init__(self, *, coverage: float = 0.8):
        self.coverage = coverage

    def fit(self, point: np.ndarray, resid: np.ndarray, noise: np.ndarray) -> "IntervalModel":
        point = np.maximum(0.0, np.asarray(point, dtype=np.float64))
        r = np.asarray(resid, dtype=np.float64)
        n = np.nan_to_num(np.asarray(noise, dtype=np.float64), nan=0.0)

        def nll(th):
            alpha, beta, kappa = np.exp(th)
            v = (alpha + beta * point) ** 2 + (kappa * n) ** 2
            return float(np.sum(np.log(v) + r**2 / v))

        bounds = list(zip(np.log([0.05, 1e-3, 0.05]), np.log([30.0, 3.0, 3.0])))
        sol = _minimize(nll, np.log([1.0, 0.3, 0.6]), method="L-BFGS-B", bounds=bounds)
        self.alpha_, self.beta_, self.kappa_ = (float(v) for v in np.exp(sol.x))
        self.q_ = conformal_quantile(np.abs(r) / self.total_scale(point, n), self.coverage)
        self.n_ = int(len(r))
        return self

    def scale(self, point) -> np.ndarray:
        return self.alpha_ + self.beta_ * np.maximum(0.0, np.asarray(point, dtype=np.float64))

    def total_scale(self, point, noise) -> np.ndarray:
        return np.hypot(self.scale(point), self.kappa_ * np.nan_to_num(np.asarray(noise, dtype=np.float64)))

    def to_dict(self) -> dict:
        return {"alpha": self.alpha_, "beta": self.beta_, "kappa": self.kappa_, "q": self.q_, "n": self.n_,
                "coverage": self.coverage}

    @classmethod
    def from_dict(cls, d: dict) -> "IntervalModel":
        try:
            m = cls(coverage=float(d["coverage"]))
            m.alpha_, m.beta_, m.kappa_, m.q_ = (float(d[k]) for k in ("alpha", "beta", "kappa", "q"))
            m.n_ = int(d["n"])
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed("interval model", e) from None
        return m


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n+1)·coverage)-th smallest score (split-conformal), 0 for no scores."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    if n == 0:
        return 0.0
    k = min(n - 1, int(math.ceil((n + 1) * coverage)) - 1)
    return float(max(0.0, scores[k]))


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
