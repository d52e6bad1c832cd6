"""Grouped cross-validation of the predictor against baselines, and the validation report.

Two splits, both 5-fold and deterministic (scikit-learn's GroupKFold):
- **model**: every row of a held-out model is unseen (its siblings, e.g. the -Base of an -Instruct,
  may be in training);
- **family**: every model of a held-out family (llama2, qwen3, ...) is unseen — the honest figure for
  a model from a family we have no measurements of.

In each fold both stages are refitted without the held-out rows (Stage A too), and so are the
baselines that learn anything:
- `no_drop`: predicts 0 everywhere;
- `bpw_curve`: median measured drop per (task category, nominal bits) on the training folds
  (falling back to the median per nominal bits), i.e. the usual "bits → damage" curve;
- `folklore`: the popular rule "at 4 bits chat −2.5%, code −7.5%, math −17.5%" (knowledge,
  reasoning and creative take the chat figure), extrapolated to other widths as quantization noise
  power scales: drop(b) = drop(4) · 4^(4 − b), capped at 100 (Q8: 1/256 of it, Q3: 4x, Q2: 16x).

Metrics: MAE (percentage points of relative drop) per task category, over all rows and over llama.cpp
presets only; 80%-interval coverage (raw quantile boosters, and after cross-conformal widening,
calibrated separately on llama.cpp rows and on the other methods' rows);
mean Spearman correlation of predicted vs measured drops across the quant levels of one
(model, task, metric, source) group; and how often the recommended quant (the smallest by bits per
weight whose drop is within the tolerance) matches the one the measurements pick.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.model_selection import GroupKFold

from predictor.model.features import TASK_CATEGORIES, Tables, build_tables
from predictor.model.train import fit_predictor, stage_a_matrix, stage_b_matrix

N_SPLITS = 5
COVERAGE_TARGET = 0.8
REC_TOLERANCE = 3.0  # % relative drop used for the recommendation-agreement metric
FOLKLORE_Q4 = {"chat": 2.5, "code": 7.5, "math": 17.5, "knowledge": 2.5, "reasoning": 2.5, "creative": 2.5}
METHODS = ("model", "no_drop", "bpw_curve", "folklore")


def folklore_drop(category: str, nominal_bits: float) -> float:
    return float(min(100.0, FOLKLORE_Q4.get(category, 2.5) * 4.0 ** (4.0 - nominal_bits)))


def _bits_key(b: float) -> float:
    return float(min(8.0, max(1.0, round(b))))


def bpw_curve_fit(train: pl.DataFrame) -> dict:
    t = train.with_columns(pl.col("nominal_bits").map_elements(_bits_key, return_dtype=pl.Float64).alias("_b"))
    by_cat = {(c, b): m for c, b, m in t.group_by("task_category", "_b").agg(pl.col("y").median()).iter_rows()}
    by_bits = {b: m for b, m in t.group_by("_b").agg(pl.col("y").median()).iter_rows()}
    return {"cat": by_cat, "bits": by_bits}


def bpw_curve_predict(curve: dict, df: pl.DataFrame) -> np.ndarray:
    out = []
    for c, b in df.select("task_category", "nominal_bits").iter_rows():
        k = _bits_key(b)
        v = curve["cat"].get((c, k))
        if v is None:
            v = curve["bits"].get(k)
        if v is None and curve["bits"]:  # nearest width seen in training
            near = min(curve["bits"], key=lambda x: abs(x - k))
            v = curve["bits"][near]
        out.append(0.0 if v is None else v)
    return np.array(out)


@dataclass
class CVResult:
    oof: dict[str, pl.DataFrame]  # scheme -> rows with y, predictions of every method, fold
    conformal: dict[str, float]
    summary: dict = field(default_factory=dict)


def _split(groups: np.ndarray) -> list[np.ndarray]:
    n = min(N_SPLITS, len(np.unique(groups)))
    gkf = GroupKFold(n_splits=n)
    return [test for _, test in gkf.split(np.zeros(len(groups)), groups=groups)]


def _conformal_q(scores: np.ndarray) -> float:
    n = len(scores)
    if n == 0:
        return 0.0
    k = min(n - 1, int(math.ceil((n + 1) * COVERAGE_TARGET)) - 1)
    return float(max(0.0, np.sort(scores)[k]))


def cross_validate(tables: Tables, *, progress=None) -> CVResult:
    b = tables.stage_b.with_row_index("_i")
    a = tables.stage_a
    oof: dict[str, pl.DataFrame] = {}
    conformal: dict[str, float] = {}
    for scheme, col in (("model", "model"), ("family", "family")):
        groups = b.get_column(col).to_numpy()
        n = len(b)
        preds = {m: np.zeros(n) for m in METHODS}
        lo, hi, fold = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
        for k, test in enumerate(_split(groups)):
            if progress:
                progress(f"cv {scheme} fold {k + 1}")
            test_mask = np.zeros(n, dtype=bool)
            test_mask[test] = True
            held = set(groups[test].tolist())
            train_rows = b.filter(pl.Series(~test_mask))
            test_rows = b.filter(pl.Series(test_mask))
            a_train = a.filter(~pl.col(col).is_in(list(held)))
            sa, sb = fit_predictor(tables, stage_a_rows=a_train, stage_b_rows=train_rows)
            lk = sa.predict(stage_a_matrix(test_rows.with_columns(pl.lit(0.0).alias("is_ppl"))))
            mid, l, h = sb.predict(stage_b_matrix(test_rows, lk))
            preds["model"][test], lo[test], hi[test], fold[test] = mid, l, h, k
            preds["bpw_curve"][test] = bpw_curve_predict(bpw_curve_fit(train_rows), test_rows)
            preds["folklore"][test] = [folklore_drop(c, nb) for c, nb in
                                       test_rows.select("task_category", "nominal_bits").iter_rows()]
        y = b.get_column("y").to_numpy()
        scores = np.maximum(lo - y, y - hi)
        # Cross-conformal, Mondrian by kind of row: each fold's widening comes from the other folds'
        # scores of the same kind (llama.cpp preset or not), so the llama.cpp rows, the kind every
        # prediction is, get an interval calibrated on their own misses.
        qk = np.zeros(n)
        gguf = b.get_column("is_gguf").to_numpy().astype(bool)
        for k in np.unique(fold):
            for kind in (gguf, ~gguf):
                qk[(fold == k) & kind] = _conformal_q(scores[(fold != k) & kind])
        conformal[scheme] = _conformal_q(scores[gguf])
        conformal[f"{scheme}_other_methods"] = _conformal_q(scores[~gguf])
        oof[scheme] = b.select("model", "family", "quant", "task", "task_category", "group", "bpw_eff", "noise_pp",
                               "nominal_bits", "is_gguf", "y").with_columns(
            *[pl.Series(f"pred_{m}", preds[m]) for m in METHODS],
            pl.Series("lo_raw", lo), pl.Series("hi_raw", hi),
            pl.Series("lo", lo - qk), pl.Series("hi", hi + qk), pl.Series("fold", fold))
    res = CVResult(oof, conformal)
    res.summary = summarize(res)
    res.summary["stage_a"] = cross_validate_stage_a(tables)
    res.summary["markdown"] += "\n" + res.summary["stage_a"]["markdown"]
    return res


def cross_validate_stage_a(tables: Tables) -> dict:
    """Stage A alone, whole models (then whole families) held out: error of ln(KLD) on the rows that
    measured KLD (mean |ln(pred/measured)|, i.e. a factor e^x), and the Spearman correlation of the
    predicted and measured KLD across the quants of each model."""
    from predictor.model.train import fit_stage_a

    a = tables.stage_a
    out: dict = {}
    lines = ["**Stage A (distortion) with whole models / families held out** — rows measuring KLD; "
             "error is mean |ln(predicted / measured KLD)| (0.69 = a factor 2)", "",
             "| held out | rows | models | mean abs ln error | median abs ln error | mean Spearman per model |",
             "|---|---|---|---|---|---|"]
    for scheme in ("model", "family"):
        groups = a.get_column(scheme).to_numpy()
        pred = np.zeros(a.height)
        for test in _split(groups):
            mask = np.zeros(a.height, dtype=bool)
            mask[test] = True
            sa = fit_stage_a(a.filter(pl.Series(~mask)))
            pred[test] = sa.predict(stage_a_matrix(a.filter(pl.Series(mask))))
        d = a.with_columns(pl.Series("pred", pred)).filter(pl.col("is_ppl") == 0.0)
        err = (d.get_column("pred") - d.get_column("y")).abs()
        rhos = [_spearman(g.get_column("pred").to_numpy(), g.get_column("y").to_numpy())
                for _, g in d.group_by("model", "dataset") if g.height >= 3]
        rhos = [r for r in rhos if not math.isnan(r)]
        out[scheme] = {"n_rows": d.height, "n_models": d.get_column("model").n_unique(),
                       "mae_ln_kld": float(err.mean()), "median_ae_ln_kld": float(err.median()),
                       "spearman_per_model": float(np.mean(rhos)) if rhos else None}
        o = out[scheme]
        lines.append(f"| whole {'families' if scheme == 'family' else 'models'} | {o['n_rows']} | {o['n_models']} | "
                     f"{_f(o['mae_ln_kld'])} | {_f(o['median_ae_ln_kld'])} | {_f(o['spearman_per_model'])} |")
    out["markdown"] = "\n".join(lines) + "\n"
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    ra = pl.Series(a).rank("average").to_numpy()
    rb = pl.Series(b).rank("average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def _pick(bpw: np.ndarray, drop: np.ndarray, tol: float) -> int | None:
    ok = np.flatnonzero(drop <= tol)
    if not len(ok):
        return None
    # smallest file; equal bits -> the smaller drop
    return int(ok[np.lexsort((drop[ok], bpw[ok]))[0]])


def ranking_metrics(df: pl.DataFrame, col: str, tol: float = REC_TOLERANCE) -> tuple[float, float, int, int]:
    """(mean Spearman over groups with >= 3 quants, recommendation agreement, n groups, n rec groups)."""
    rhos, agree, n_rec = [], 0, 0
    for _, g in df.group_by("group", maintain_order=True):
        if g.height < 2:
            continue
        y = g.get_column("y").to_numpy()
        p = g.get_column(col).to_numpy()
        bpw = g.get_column("bpw_eff").to_numpy()
        if g.height >= 3:
            r = _spearman(p, y)
            if not math.isnan(r):
                rhos.append(r)
            elif not np.all(y == y[0]):
                rhos.append(0.0)  # a constant prediction ranks nothing
        n_rec += 1
        pm, pp = _pick(bpw, y, tol), _pick(bpw, p, tol)
        same = (pm is None and pp is None) or (pm is not None and pp is not None and bpw[pm] == bpw[pp])
        agree += bool(same)
    return (float(np.mean(rhos)) if rhos else float("nan"), agree / n_rec if n_rec else float("nan"),
            len(rhos), n_rec)


def summarize(res: CVResult) -> dict:
    out: dict = {"schemes": {}, "tolerance_pct": REC_TOLERANCE, "n_splits": N_SPLITS}
    for scheme, df in res.oof.items():
        s: dict = {"n_rows": df.height, "methods": {}}
        for m in METHODS:
            col = f"pred_{m}"
            err = (df.get_column(col) - df.get_column("y")).abs()
            d = df.with_columns(err.alias("_e"))
            per_cat = {c: float(d.filter(pl.col("task_category") == c).get_column("_e").mean())
                       for c in TASK_CATEGORIES if d.filter(pl.col("task_category") == c).height}
            gg = d.filter(pl.col("is_gguf"))
            rho, agree, n_rho, n_rec = ranking_metrics(df, col)
            s["methods"][m] = {
                "mae_all": float(d.get_column("_e").mean()),
                "mae_by_category": per_cat,
                "mae_llama_cpp": float(gg.get_column("_e").mean()) if gg.height else None,
                "spearman": rho,
                "rec_agreement": agree,
            }
            s["n_rank_groups"], s["n_rec_groups"] = n_rho, n_rec
        s["coverage_raw"] = _coverage(df.with_columns(pl.col("lo_raw").alias("lo"), pl.col("hi_raw").alias("hi")))
        s["coverage"] = _coverage(df)
        gg = df.filter(pl.col("is_gguf"))
        s["coverage_llama_cpp"] = _coverage(gg)
        # Rows whose own standard errors put the measured drop's noise above 5 pp (our near-chance
        # ARC-Easy runs on SmolLM2) cannot be covered by an interval for the true drop; say so apart.
        s["coverage_llama_cpp_low_noise"] = _coverage(gg.filter(pl.col("noise_pp") <= 5.0))
        s["mean_interval_width"] = float((df.get_column("hi") - df.get_column("lo")).mean())
        # The model's own recommendation rule uses the interval's upper bound.
        hi_df = df.with_columns(pl.col("hi").alias("pred_hi"))
        s["rec_agreement_model_upper"] = ranking_metrics(hi_df, "pred_hi")[1]
        s["n_by_category"] = {c: int(df.filter(pl.col("task_category") == c).height) for c in TASK_CATEGORIES
                              if df.filter(pl.col("task_category") == c).height}
        s["n_llama_cpp"] = int(df.filter(pl.col("is_gguf")).height)
        out["schemes"][scheme] = s
    out["conformal_halfwidth_pp"] = res.conformal
    out["markdown"] = render_table(out)
    return out


def _coverage(df: pl.DataFrame) -> float | None:
    if not df.height:
        return None
    y = df.get_column("y")
    return float(((df.get_column("lo") <= y) & (y <= df.get_column("hi"))).mean())


def _f(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}"


def render_table(summary: dict) -> str:
    lines = []
    for scheme, s in summary["schemes"].items():
        cats = list(s["n_by_category"])
        lines.append(f"**Held out: whole {'families' if scheme == 'family' else 'models'}** ({s['n_rows']} rows, {N_SPLITS}-fold grouped CV; "
                     f"80% interval coverage {_f(s['coverage'])} after cross-conformal widening, "
                     f"{_f(s['coverage_raw'])} raw quantiles, {_f(s['coverage_llama_cpp'])} on llama.cpp rows, "
                     f"{_f(s.get('coverage_llama_cpp_low_noise'))} on those whose measurement noise is under 5 pp; "
                     f"mean width {_f(s['mean_interval_width'], 1)} pp)")
        lines.append("")
        head = ["method"] + [f"MAE {c} (n={s['n_by_category'][c]})" for c in cats] + [
            "MAE all", f"MAE llama.cpp (n={s['n_llama_cpp']})", f"Spearman ({s['n_rank_groups']} groups)",
            f"rec. agreement ({s['n_rec_groups']} groups, tol {summary['tolerance_pct']:g}%)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m, r in s["methods"].items():
            row = [m] + [_f(r["mae_by_category"].get(c)) for c in cats] + [
                _f(r["mae_all"]), _f(r["mae_llama_cpp"]), _f(r["spearman"]), _f(r["rec_agreement"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append(f"| model, recommending on the interval's upper bound |" + " |" * (len(cats) + 3)
                     + f" {_f(s['rec_agreement_model_upper'])} |")
        lines.append("")
    return "\n".join(lines)


def write_report(model_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "validation_report",
                 training_dir: str | os.PathLike | None = None, *, progress=None) -> Path:
    """Re-run grouped CV with the hyper-parameters of `model_dir` on `training_dir` and write
    REPORT.md plus PNG plots (predicted vs measured per task category; interval coverage)."""
    from predictor.model.train import load_model

    pred = load_model(model_dir)  # checks the directory is a valid model
    tables = build_tables(training_dir)
    res = cross_validate(tables, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(res, out)
    card_val = pred.card.get("validation") or {}
    lines = [
        f"# Validation report — model `{pred.card.get('name')}`",
        "",
        f"Training data hash `{tables.data_hash[:16]}…` ({tables.source_rows['stage_b_rows']} accuracy rows, "
        f"{tables.source_rows['stage_b_models']} models, {tables.source_rows['stage_b_families']} families; "
        f"{tables.source_rows['stage_a_rows']} distortion rows). The model card was trained on data hash "
        f"`{pred.card['training_data']['hash'][:16]}…`.",
        "",
        "Relative drop in percent of the baseline score (positive = worse). MAE in percentage points of that "
        "relative drop. Baselines are defined in `predictor/model/validate.py`: `no_drop` (0), `bpw_curve` "
        "(median drop per task category and nominal bits, fitted on the training folds), `folklore` "
        "(Q4: chat/knowledge/reasoning −2.5%, code −7.5%, math −17.5%, scaled by 4^(4 − bits)).",
        "",
        res.summary["markdown"],
        "",
    ]
    if card_val and card_val.get("markdown") and card_val["markdown"] != res.summary["markdown"]:
        lines += ["The model card's own figures differ (trained on other data):", "", card_val["markdown"], ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out


def _plots(res: CVResult, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (out / "PLOTS_MISSING.txt").write_text("matplotlib is not installed: pip install 'quantpredict[plot]'\n")
        return []
    paths = []
    for scheme, df in res.oof.items():
        cats = [c for c in TASK_CATEGORIES if df.filter(pl.col("task_category") == c).height]
        fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.4), squeeze=False)
        for ax, c in zip(axes[0], cats):
            d = df.filter(pl.col("task_category") == c)
            y, p = d.get_column("y").to_numpy(), d.get_column("pred_model").to_numpy()
            g = d.get_column("is_gguf").to_numpy()
            ax.scatter(y[~g], p[~g], s=6, alpha=0.35, label="integer methods")
            ax.scatter(y[g], p[g], s=14, alpha=0.9, color="C3", label="llama.cpp presets")
            lim = [min(-5, y.min(), p.min()), max(20, np.percentile(y, 99), p.max())]
            ax.plot(lim, lim, "k--", lw=0.8)
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            ax.set_title(f"{c} (n={d.height})")
            ax.set_xlabel("measured drop %")
        axes[0][0].set_ylabel("predicted drop %")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Predicted vs measured, whole {'families' if scheme == 'family' else 'models'} held out")
        fig.tight_layout()
        p = out / f"pred_vs_measured_{scheme}.png"
        fig.savefig(p, dpi=110, metadata={"Software": None})
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.38
    for i, (scheme, df) in enumerate(res.oof.items()):
        cats = [c for c in TASK_CATEGORIES if df.filter(pl.col("task_category") == c).height]
        cov = []
        for c in cats:
            d = df.filter(pl.col("task_category") == c)
            cov.append(float(((d["lo"] <= d["y"]) & (d["y"] <= d["hi"])).mean()))
        ax.bar(np.arange(len(cats)) + i * width, cov, width,
               label=f"{'families' if scheme == 'family' else 'models'} held out")
        ax.set_xticks(np.arange(len(cats)) + width / 2, cats)
    ax.axhline(COVERAGE_TARGET, color="k", ls="--", lw=0.8, label="target 0.8")
    ax.set_ylim(0, 1)
    ax.set_ylabel("80% interval coverage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "coverage.png"
    fig.savefig(p, dpi=110, metadata={"Software": None})
    plt.close(fig)
    paths.append(p)
    return paths
