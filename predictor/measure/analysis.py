"""Does simulated weight error track measured damage? Compare per run:

  * the exact imatrix-weighted relative weight error of the file that was measured,
        sqrt( sum_t sum_c w_c * sum_r (q - x)^2  /  sum_t sum_c w_c * sum_r x^2 )
    over the tensors the imatrix covers (w = imatrix column means), recomputed from the base and
    the run's per-tensor types with our quantizers (the same bytes the GGUF held), and its
    unweighted counterpart over every quantized tensor (token_embd/output included);
  * `inspect`'s sampled estimate (predictor.api.inspect_model, with the imatrix) for preset runs;
against the measured mean KLD. Reported: Spearman rank correlation, and the ratio error of a
log-log fit  log KLD = a + b log err  (the factor by which the fitted KLD misses the measured one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from predictor import quant
from predictor.io.gguf import open_gguf
from predictor.io.imatrix import read_imatrix
from predictor.quant.recipes import is_quantizable

__all__ = ["spearman", "loglog_fit", "run_weight_errors", "compare"]


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3:
        return float("nan")
    ra, rb = _rank(a), _rank(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def loglog_fit(err, kld) -> dict:
    """Least-squares fit of log KLD on log err; the median and worst factor between fit and measurement."""
    e, k = np.asarray(err, dtype=np.float64), np.asarray(kld, dtype=np.float64)
    keep = (e > 0) & (k > 0)  # an exact requantization (zero error) has no logarithm
    x, y = np.log(e[keep]), np.log(k[keep])
    if len(x) < 3:
        return {"n": len(x)}
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    return {"n": len(x), "slope": float(b), "intercept": float(a),
            "median_factor": float(math.exp(np.median(np.abs(resid)))), "max_factor": float(math.exp(np.abs(resid).max()))}


def run_weight_errors(base_path, tensor_types: dict[str, str], imatrix, *, cache: dict | None = None) -> dict:
    """Exact weighted and unweighted relative errors of one run's tensor types (cached per tensor/type)."""
    cache = {} if cache is None else cache
    num_w = den_w = num = den = 0.0
    with open_gguf(base_path) as base:
        for t in base.tensors:
            qt = tensor_types.get(t.name, t.dtype)
            if len(t.shape) < 2 or not is_quantizable(t.name, t.ne):
                continue
            if qt == t.dtype or qt in ("F32", "F16", "BF16"):  # kept at base precision: signal, no error
                key = (t.name, "signal")
                if key not in cache:
                    x = base.read_tensor(t.name).reshape(t.rows, t.cols).astype(np.float64)
                    x2 = (x ** 2).sum(0)
                    w = imatrix.vector(t.name) if t.name in imatrix else None
                    cache[key] = (float((w * x2).sum()) if w is not None else None, float(x2.sum()))
                sw, s = cache[key]
                if sw is not None:
                    den_w += sw
                den += s
                continue
            key = (t.name, qt)
            if key not in cache:
                x = base.read_tensor(t.name).reshape(t.rows, t.cols)
                w = imatrix.vector(t.name) if t.name in imatrix else None
                # types measured without the imatrix were quantized without it; the error is weighted anyway
                q = quant.dequantize(quant.quantize(x, qt), qt, cols=t.cols)
                e2 = ((q - x).astype(np.float64) ** 2).sum(0)
                x2 = (x.astype(np.float64) ** 2).sum(0)
                cache[key] = (float((w * e2).sum()) if w is not None else None,
                              float((w * x2).sum()) if w is not None else None, float(e2.sum()), float(x2.sum()))
            ew, sw, e, s = cache[key]
            if ew is not None:
                num_w += ew
                den_w += sw
            num += e
            den += s
    return {"weighted_rel_rmse": math.sqrt(num_w / den_w) if den_w else None,
            "rel_rmse": math.sqrt(num / den) if den else None}


def compare(out_dir, slug: str, base_path, imatrix_path, *, dataset_keys=("prose", "code", "gsm8k")) -> dict:
    """Weight error vs measured KLD for every run of one model without an imatrix (preset and ablation runs).

    Runs made with the imatrix are compared in `compare_inspect`, where inspect's estimate applies."""
    imatrix = read_imatrix(imatrix_path)
    cache: dict = {}
    rows = []
    for path in sorted((Path(out_dir) / "runs" / slug).glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("imatrix"):
            continue
        sets = r["result"]["sets"]
        n = sum(sets[k]["n_tokens"] for k in dataset_keys if k in sets)
        kld = sum(sets[k]["kld_mean"] * sets[k]["n_tokens"] for k in dataset_keys if k in sets) / n
        errs = run_weight_errors(base_path, r["tensor_types"], imatrix, cache=cache)
        rows.append({"run": r["run"], "kind": "ablation" if r.get("ablation_group") else "preset",
                     "kld_mean": kld, "bits_per_weight": r["bits_per_weight"], **errs})
    return {"rows": rows, "summary": _summaries(rows)}


def _summaries(rows: list[dict]) -> dict:
    out = {}
    for kind in ("preset", "ablation", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        sel_w = [r for r in sel if r.get("weighted_rel_rmse")]
        out[kind] = {
            "n": len(sel),
            "spearman_weighted": spearman([r["weighted_rel_rmse"] for r in sel_w], [r["kld_mean"] for r in sel_w]),
            "spearman_unweighted": spearman([r["rel_rmse"] for r in sel], [r["kld_mean"] for r in sel]),
            "fit_weighted": loglog_fit([r["weighted_rel_rmse"] for r in sel_w], [r["kld_mean"] for r in sel_w]),
            "fit_unweighted": loglog_fit([r["rel_rmse"] for r in sel], [r["kld_mean"] for r in sel]),
        }
    return out


def compare_inspect(out_dir, slug: str, base_path, imatrix_path, *, dataset_keys=("prose", "code", "gsm8k")) -> dict:
    """inspect's sampled imatrix-weighted error (quantized with the imatrix) vs KLD of the imatrix runs."""
    from predictor.api import inspect_model

    runs = {}
    for path in sorted((Path(out_dir) / "runs" / slug).glob("*-imatrix.json")):
        r = json.loads(path.read_text())
        sets = r["result"]["sets"]
        n = sum(sets[k]["n_tokens"] for k in dataset_keys if k in sets)
        runs[r["preset"]] = sum(sets[k]["kld_mean"] * sets[k]["n_tokens"] for k in dataset_keys if k in sets) / n
    if not runs:
        return {"rows": [], "summary": {}}
    rep = inspect_model(base_path, imatrix=imatrix_path, presets=sorted(runs))
    rows = [{"run": p.preset, "kind": "preset", "kld_mean": runs[p.preset], "weighted_rel_rmse": p.errors["overall"].weighted_rel_rmse,
             "rel_rmse": p.errors["overall"].rel_rmse} for p in rep.presets if p.errors]
    return {"rows": rows, "summary": _summaries(rows)}


def render_markdown(title: str, result: dict, inspect_result: dict | None = None) -> str:
    """A markdown section: per-run table and the rank/ratio summaries."""
    lines = [f"## {title}", ""]
    summ = result["summary"]
    lines += ["| runs | n | Spearman (imatrix-weighted error) | Spearman (unweighted) | log-log slope (weighted) | median / max factor (weighted) |",
              "|---|---|---|---|---|---|"]
    groups = [(k, summ[k]) for k in ("preset", "ablation", "all")]
    if inspect_result and inspect_result.get("summary"):
        groups.append(("inspect, imatrix presets", inspect_result["summary"]["all"]))
    for name, s in groups:
        fw = s.get("fit_weighted", {})
        lines.append(f"| {name} | {s['n']} | {s['spearman_weighted']:.3f} | {s['spearman_unweighted']:.3f} | "
                     f"{fw.get('slope', float('nan')):.2f} | {fw.get('median_factor', float('nan')):.2f} / "
                     f"{fw.get('max_factor', float('nan')):.2f} |")
    lines += ["", "| run | kind | bits/weight | KLD mean | weighted rel. RMSE | rel. RMSE |", "|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["kind"], -r["kld_mean"])):
        w = r.get("weighted_rel_rmse")
        lines.append(f"| {r['run']} | {r['kind']} | {r.get('bits_per_weight', float('nan')):.2f} | {r['kld_mean']:.5f} | "
                     f"{'' if w is None else f'{w:.5f}'} | {r['rel_rmse']:.5f} |")
    if inspect_result and inspect_result.get("rows"):
        lines += ["", "inspect (sampled, quantized with the imatrix) vs the imatrix runs:", "",
                  "| preset | KLD mean | inspect weighted rel. RMSE |", "|---|---|---|"]
        for r in sorted(inspect_result["rows"], key=lambda r: -r["kld_mean"]):
            lines.append(f"| {r['run']} | {r['kld_mean']:.5f} | {r['weighted_rel_rmse']:.5f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    out_dir, slug, base, imat = sys.argv[1:5]
    res = compare(out_dir, slug, base, imat)
    ins = compare_inspect(out_dir, slug, base, imat)
    print(render_markdown(slug, res, ins))
