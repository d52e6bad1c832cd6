"""Grouped cross-validation of the predictor against baselines, and the validation report.

Two splits, both 5-fold and deterministic (scikit-learn's GroupKFold):
- **model**: every row of a held-out model is unseen (its siblings, e.g. the -Base of an -Instruct,
  may be in training);
- **family**: every model of a held-out family (llama2, qwen3, ...) is unseen — the honest figure for
  a model from a family we have no measurements of.

In each fold both stages are refitted without the held-out rows (Stage A too), and the held-out rows
are predicted from Stage A's distortion (never their own measured KLD), as a user's model would be.
Baselines that learn anything are refitted too:
- `no_drop`: predicts 0 everywhere;
- `bpw_curve`: median measured drop per (task category, nominal bits) on the training folds;
- `global_kld_curve`: one dose-response curve in the same predicted KLD for every task;
- `folklore`: "at 4 bits chat −2.5%, code −7.5%, math −17.5%", scaled by 4^(4 − bits).

Intervals: the out-of-fold residuals calibrate `IntervalModel`s (per scheme, llama.cpp rows apart
from the integer methods' rows), cross-conformally: each fold's interval comes from the other folds'
residuals. Reported: coverage and mean width of the true-drop interval and of the benchmark
interval (the row's own noise), by noise stratum and on llama.cpp rows of models of 6B and up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.model_selection import GroupKFold

from predictor.model.estimator import IntervalModel
from predictor.model.features import TASK_CATEGORIES, Tables, build_tables
from predictor.model.train import (
    COVERAGE,
    INTERVAL_KINDS,
    fit_curve,
    fit_predictor,
    fit_stage_a,
    stage_a_matrix,
    stage_b_doses,
)

N_SPLITS = 5
REC_TOLERANCE = 3.0  # % relative drop used for the recommendation-agreement metric
FOLKLORE_Q4 = {"chat": 2.5, "code": 7.5, "math": 17.5, "knowledge": 2.5, "reasoning": 2.5, "creative": 2.5}
METHODS = ("model", "no_drop", "bpw_curve", "global_kld_curve", "folklore")
NOISE_STRATA = ((0.0, 2.0), (2.0, 5.0), (5.0, math.inf))


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
    oof: dict[str, pl.DataFrame]  # scheme -> rows with y, predictions of every method, intervals, fold
    intervals: dict[str, IntervalModel]  # "<scheme>/<kind>", fitted on all out-of-fold residuals
    summary: dict = field(default_factory=dict)


def _split(groups: np.ndarray) -> list[np.ndarray]:
    n = min(N_SPLITS, len(np.unique(groups)))
    gkf = GroupKFold(n_splits=n)
    return [test for _, test in gkf.split(np.zeros(len(groups)), groups=groups)]


def _kind(df: pl.DataFrame) -> np.ndarray:
    return np.where(df.get_column("is_gguf").to_numpy().astype(bool), INTERVAL_KINDS[0], INTERVAL_KINDS[1])


def _predict_rows(sa, curve, rows: pl.DataFrame) -> np.ndarray:
    x, x_ref = stage_b_doses(sa, rows, measured=False)
    return curve.predict(x, rows.get_column("task_category").to_list(), rows.get_column("task").to_list(), x_ref)


def cross_validate(tables: Tables, *, progress=None) -> CVResult:
    b = tables.stage_b
    a = tables.stage_a
    oof: dict[str, pl.DataFrame] = {}
    intervals: dict[str, IntervalModel] = {}
    n = b.height
    y = b.get_column("y").to_numpy()
    noise = np.nan_to_num(b.get_column("noise_pp").to_numpy(), nan=0.0)
    kinds = _kind(b)
    for scheme in ("model", "family"):
        groups = b.get_column(scheme).to_numpy()
        preds = {m: np.zeros(n) for m in METHODS}
        fold = np.zeros(n, dtype=np.int64)
        for k, test in enumerate(_split(groups)):
            if progress:
                progress(f"cv {scheme} fold {k + 1}")
            test_mask = np.zeros(n, dtype=bool)
            test_mask[test] = True
            held = set(groups[test].tolist())
            train_rows, test_rows = b.filter(pl.Series(~test_mask)), b.filter(pl.Series(test_mask))
            sa, curve = fit_predictor(tables, stage_a_rows=a.filter(~pl.col(scheme).is_in(list(held))),
                                      stage_b_rows=train_rows)
            preds["model"][test], fold[test] = _predict_rows(sa, curve, test_rows), k
            x, x_ref = stage_b_doses(sa, train_rows, measured=True)
            flat = fit_curve(train_rows, x, x_ref, per_category=False, per_task=False)
            preds["global_kld_curve"][test] = _predict_rows(sa, flat, test_rows)
            preds["bpw_curve"][test] = bpw_curve_predict(bpw_curve_fit(train_rows), test_rows)
            preds["folklore"][test] = [folklore_drop(c, nb) for c, nb in
                                       test_rows.select("task_category", "nominal_bits").iter_rows()]
        point = preds["model"]
        resid = y - point
        true_hw, bench_hw = np.zeros(n), np.zeros(n)
        # Cross-conformal, Mondrian by kind of row: each fold's interval comes from the other folds'
        # residuals of the same kind (llama.cpp preset or integer method).
        for k in np.unique(fold):
            for kind in INTERVAL_KINDS:
                cal, sel = (fold != k) & (kinds == kind), (fold == k) & (kinds == kind)
                if sel.any() and cal.sum() >= 10:
                    im = IntervalModel(coverage=COVERAGE).fit(point[cal], resid[cal], noise[cal])
                    true_hw[sel] = im.q_ * im.scale(point[sel])
                    bench_hw[sel] = im.q_ * im.total_scale(point[sel], noise[sel])
        for kind in INTERVAL_KINDS:
            sel = kinds == kind
            intervals[f"{scheme}/{kind}"] = IntervalModel(coverage=COVERAGE).fit(point[sel], resid[sel], noise[sel])
        oof[scheme] = b.select("model", "family", "quant", "ref_quant", "task", "task_category", "group", "bpw_eff",
                               "noise_pp", "nominal_bits", "is_gguf", "params_b", "y").with_columns(
            *[pl.Series(f"pred_{m}", preds[m]) for m in METHODS],
            pl.Series("true_lo", point - true_hw), pl.Series("true_hi", point + true_hw),
            pl.Series("lo", point - bench_hw), pl.Series("hi", point + bench_hw), pl.Series("fold", fold))
    res = CVResult(oof, intervals)
    res.summary = summarize(res)
    res.summary["stage_a"] = cross_validate_stage_a(tables)
    res.summary["markdown"] += "\n" + res.summary["stage_a"]["markdown"]
    res.summary["weaknesses"] = weaknesses(res.summary, tables)
    return res


def in_sample_intervals(tables: Tables, sa, curve) -> dict[str, IntervalModel]:
    """Intervals from training residuals (only for `train --no-validate`: too narrow, and the card says so)."""
    b = tables.stage_b
    point = _predict_rows(sa, curve, b)
    resid = b.get_column("y").to_numpy() - point
    noise = np.nan_to_num(b.get_column("noise_pp").to_numpy(), nan=0.0)
    kinds = _kind(b)
    return {f"{s}/{k}": IntervalModel(coverage=COVERAGE).fit(point[kinds == k], resid[kinds == k], noise[kinds == k])
            for s in ("model", "family") for k in INTERVAL_KINDS}


def cross_validate_stage_a(tables: Tables) -> dict:
    """Stage A alone, whole models (then whole families) held out: error of ln(KLD) on the rows that
    measured KLD (mean |ln(pred/measured)|, i.e. a factor e^x), and the Spearman correlation of the
    predicted and measured KLD across the quants of each model; published rows (other people's
    models, the llama.cpp tables) apart from our own measured ones."""
    a = tables.stage_a
    out: dict = {}
    lines = ["**Stage A (distortion) with whole models / families held out** — rows measuring KLD; "
             "error is mean |ln(predicted / measured KLD)| (0.69 = a factor 2)", "",
             "| held out | rows | models | mean abs ln error | median abs ln error | mean Spearman per model | "
             "published rows: n / mean abs ln error | ours: n / mean abs ln error |",
             "|---|---|---|---|---|---|---|---|"]
    for scheme in ("model", "family"):
        groups = a.get_column(scheme).to_numpy()
        pred = np.zeros(a.height)
        for test in _split(groups):
            mask = np.zeros(a.height, dtype=bool)
            mask[test] = True
            sa = fit_stage_a(a.filter(pl.Series(~mask)))
            pred[test] = sa.predict(stage_a_matrix(a.filter(pl.Series(mask))))
        d = a.with_columns(pl.Series("pred", pred)).filter(pl.col("is_ppl") == 0.0).with_columns(
            (pl.col("pred") - pl.col("y")).abs().alias("_e"))
        rhos = [_spearman(g.get_column("pred").to_numpy(), g.get_column("y").to_numpy())
                for _, g in d.group_by("model", "dataset", "imatrix") if g.height >= 3]
        rhos = [r for r in rhos if not math.isnan(r)]
        pub, own = d.filter(pl.col("src") == "published"), d.filter(pl.col("src") == "measured")
        out[scheme] = {"n_rows": d.height, "n_models": d.get_column("model").n_unique(),
                       "mae_ln_kld": float(d["_e"].mean()), "median_ae_ln_kld": float(d["_e"].median()),
                       "spearman_per_model": float(np.mean(rhos)) if rhos else None,
                       "n_published": pub.height, "mae_ln_kld_published": float(pub["_e"].mean()) if pub.height else None,
                       "n_measured": own.height, "mae_ln_kld_measured": float(own["_e"].mean()) if own.height else None}
        o = out[scheme]
        lines.append(f"| whole {'families' if scheme == 'family' else 'models'} | {o['n_rows']} | {o['n_models']} | "
                     f"{_f(o['mae_ln_kld'])} | {_f(o['median_ae_ln_kld'])} | {_f(o['spearman_per_model'])} | "
                     f"{o['n_published']} / {_f(o['mae_ln_kld_published'])} | {o['n_measured']} / {_f(o['mae_ln_kld_measured'])} |")
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


def _interval_stats(df: pl.DataFrame) -> dict:
    """Coverage / mean width of the true-drop and the benchmark interval on `df`."""
    if not df.height:
        return {"n": 0}
    y = df.get_column("y")
    return {
        "n": df.height,
        "true_coverage": float(((df["true_lo"] <= y) & (y <= df["true_hi"])).mean()),
        "true_width": float((df["true_hi"] - df["true_lo"]).mean()),
        "bench_coverage": float(((df["lo"] <= y) & (y <= df["hi"])).mean()),
        "bench_width": float((df["hi"] - df["lo"]).mean()),
    }


def interval_table(df: pl.DataFrame) -> dict:
    gg = df.filter(pl.col("is_gguf"))
    out = {"all rows": _interval_stats(df), "llama.cpp rows": _interval_stats(gg),
           "llama.cpp rows, models >= 6B": _interval_stats(gg.filter(pl.col("params_b") >= 6.0))}
    for lo, hi in NOISE_STRATA:
        label = f"noise {lo:g}-{hi:g} pp" if math.isfinite(hi) else f"noise >= {lo:g} pp"
        out[label] = _interval_stats(df.filter((pl.col("noise_pp") >= lo) & (pl.col("noise_pp") < hi)))
        out[f"llama.cpp, {label}"] = _interval_stats(gg.filter((pl.col("noise_pp") >= lo) & (pl.col("noise_pp") < hi)))
    return out


def summarize(res: CVResult) -> dict:
    out: dict = {"schemes": {}, "tolerance_pct": REC_TOLERANCE, "n_splits": N_SPLITS}
    for scheme, df in res.oof.items():
        s: dict = {"n_rows": df.height, "methods": {}}
        cat_mask = {c: df.get_column("task_category") == c for c in TASK_CATEGORIES}
        gguf = df.get_column("is_gguf")
        big = gguf & (df.get_column("params_b") >= 6.0)
        quiet = gguf & (df.get_column("noise_pp").fill_nan(0.0) < 5.0)
        for m in METHODS:
            e = (df.get_column(f"pred_{m}") - df.get_column("y")).abs()
            rho, agree, n_rho, n_rec = ranking_metrics(df, f"pred_{m}")
            s["methods"][m] = {
                "mae_all": float(e.mean()),
                "mae_by_category": {c: float(e.filter(mk).mean()) for c, mk in cat_mask.items() if mk.any()},
                "mae_llama_cpp": float(e.filter(gguf).mean()) if gguf.any() else None,
                "mae_llama_cpp_ge6b": float(e.filter(big).mean()) if big.any() else None,
                "mae_llama_cpp_low_noise": float(e.filter(quiet).mean()) if quiet.any() else None,
                "mae_llama_cpp_math": float(e.filter(gguf & cat_mask["math"]).mean()) if (gguf & cat_mask["math"]).any() else None,
                "spearman": rho,
                "rec_agreement": agree,
            }
            s["n_rank_groups"], s["n_rec_groups"] = n_rho, n_rec
        s["intervals"] = interval_table(df)
        s["n_by_category"] = {c: int(mk.sum()) for c, mk in cat_mask.items() if mk.any()}
        s["n_llama_cpp"], s["n_llama_cpp_ge6b"], s["n_llama_cpp_low_noise"] = int(gguf.sum()), int(big.sum()), int(quiet.sum())
        out["schemes"][scheme] = s
    out["intervals"] = {k: v.to_dict() for k, v in res.intervals.items()}
    out["markdown"] = render_table(out)
    return out


def weaknesses(summary: dict, tables: Tables) -> list[str]:
    """Plain statements of where the model is weak, from the measured numbers (card and README)."""
    m, f = summary["schemes"]["model"], summary["schemes"]["family"]
    out = []
    for scheme, s in (("models", m), ("families", f)):
        mm, bp = s["methods"]["model"]["mae_by_category"], s["methods"]["bpw_curve"]["mae_by_category"]
        worse = [c for c in mm if c in bp and mm[c] > bp[c]]
        if worse:
            out.append(f"with whole {scheme} held out it loses to the bits-per-weight lookup on "
                       f"{', '.join(worse)} (MAE " + ", ".join(f"{mm[c]:.1f} vs {bp[c]:.1f}" for c in worse) + " pp)")
    ll, nd = m["methods"]["model"]["mae_llama_cpp"], m["methods"]["no_drop"]["mae_llama_cpp"]
    lq, nq = m["methods"]["model"]["mae_llama_cpp_low_noise"], m["methods"]["no_drop"]["mae_llama_cpp_low_noise"]
    if ll > nd or lq > nq:
        out.append(f"on llama.cpp rows it does not beat predicting no drop (MAE {ll:.2f} vs {nd:.2f} pp; rows with "
                   f"under 5 pp noise {lq:.2f} vs {nq:.2f}): most of those rows are small drops at 4 bits and up, "
                   "and it over-predicts the big drops of models it has no distortion data for (Qwen3-8B at Q2_K)")
    out.append(f"llama.cpp rows are few ({m['n_llama_cpp']} rows, {m['n_llama_cpp_ge6b']} of them on models of 6B "
               f"and up): MAE {ll:.2f} pp with models held out, {f['methods']['model']['mae_llama_cpp']:.2f} with "
               "families held out")
    n_math = m["n_by_category"].get("math", 0)
    out.append(f"math has {n_math} rows, most of them integer methods (RTN/GPTQ/AWQ) rather than llama.cpp presets")
    out.append("creative writing has no measurements at all: it is predicted as chat")
    iv = m["intervals"]["llama.cpp rows"]
    out.append(f"the true-drop interval cannot be checked directly; on llama.cpp rows the benchmark interval covers "
               f"{iv['bench_coverage']:.2f} (target 0.80), and its width there is set by small, noisy benchmarks (150-item ARC "
               "on 135M/270M models, single 100-problem Project-Euler runs)")
    sa = summary["stage_a"]["model"]
    out.append(f"Stage A has measured KLD for only {tables.source_rows['stage_a_models']} models; held-out error is a "
               f"factor {math.exp(sa['mae_ln_kld']):.1f} on average (published rows: factor "
               f"{math.exp(sa['mae_ln_kld_published'] or 0):.1f})")
    out.append("an unseen family gets the leave-family-out intervals; a model outside the calibrated size range is "
               "clipped to it and its intervals doubled")
    return out


def _f(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}"


def render_table(summary: dict) -> str:
    lines = []
    for scheme, s in summary["schemes"].items():
        cats = list(s["n_by_category"])
        lines.append(f"**Held out: whole {'families' if scheme == 'family' else 'models'}** ({s['n_rows']} rows, "
                     f"{N_SPLITS}-fold grouped CV). MAE in pp of relative drop.")
        lines.append("")
        head = ["method"] + [f"{c} (n={s['n_by_category'][c]})" for c in cats] + [
            "all", f"llama.cpp (n={s['n_llama_cpp']})", f"llama.cpp, noise < 5 pp (n={s['n_llama_cpp_low_noise']})",
            f"llama.cpp ≥6B (n={s['n_llama_cpp_ge6b']})",
            "llama.cpp math", f"Spearman ({s['n_rank_groups']} groups)",
            f"rec. agreement ({s['n_rec_groups']} groups, tol {summary['tolerance_pct']:g}%)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m, r in s["methods"].items():
            row = [f"**{m}**" if m == "model" else m] + [_f(r["mae_by_category"].get(c)) for c in cats] + [
                _f(r["mae_all"]), _f(r["mae_llama_cpp"]), _f(r["mae_llama_cpp_low_noise"]), _f(r["mae_llama_cpp_ge6b"]),
                _f(r["mae_llama_cpp_math"]),
                _f(r["spearman"]), _f(r["rec_agreement"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("80% intervals (cross-conformal): coverage / mean width (pp) of the true-drop interval and of "
                     "the benchmark interval at each row's own noise")
        lines.append("")
        lines.append("| rows | n | true: coverage | true: width | benchmark: coverage | benchmark: width |")
        lines.append("|---|---|---|---|---|---|")
        for label, st in s["intervals"].items():
            if st["n"]:
                lines.append(f"| {label} | {st['n']} | {_f(st['true_coverage'])} | {_f(st['true_width'], 1)} | "
                             f"{_f(st['bench_coverage'])} | {_f(st['bench_width'], 1)} |")
        lines.append("")
    return "\n".join(lines)


def write_report(model_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "validation_report",
                 training_dir: str | os.PathLike | None = None, *, progress=None) -> Path:
    """Re-run grouped CV on `training_dir` and write REPORT.md plus PNG plots (predicted vs measured
    per task category; interval coverage)."""
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
        "Relative drop in percent of the baseline score (positive = worse). Baselines are defined in "
        "`predictor/model/validate.py`: `no_drop` (0), `bpw_curve` (median drop per task category and nominal "
        "bits), `global_kld_curve` (one dose-response curve for all tasks), `folklore` (Q4: chat −2.5%, code "
        "−7.5%, math −17.5%, scaled by 4^(4 − bits)).",
        "",
        "## Where the model is weak",
        "",
        *[f"- {w}" for w in res.summary["weaknesses"]],
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
        cov = [_interval_stats(df.filter(pl.col("task_category") == c))["bench_coverage"] for c in cats]
        ax.bar(np.arange(len(cats)) + i * width, cov, width,
               label=f"{'families' if scheme == 'family' else 'models'} held out")
        ax.set_xticks(np.arange(len(cats)) + width / 2, cats)
    ax.axhline(COVERAGE, color="k", ls="--", lw=0.8, label="target 0.8")
    ax.set_ylim(0, 1)
    ax.set_ylabel("80% benchmark-interval coverage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "coverage.png"
    fig.savefig(p, dpi=110, metadata={"Software": None})
    plt.close(fig)
    paths.append(p)
    return paths
