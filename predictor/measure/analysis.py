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


def run_weight_errors(base_path, tensor_types: dict[str, str], imatrix, *, cache: dict | None = None,
                      quantized_with=None, quant_cache_dir=None) -> dict:
    """Exact weighted and unweighted relative errors of one run's tensor types (cached per tensor/type).

    `imatrix` weights the error; `quantized_with` is the imatrix the run was quantized with (None:
    without). `quant_cache_dir`: the sweep's cache of quantized tensors, reused when present."""
    import hashlib

    cache = {} if cache is None else cache
    tag = "none"
    if quantized_with is not None:
        tag = hashlib.sha256(Path(quantized_with.path).read_bytes()).hexdigest()[:12]
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
            use = quantized_with is not None and t.name in quantized_with
            key = (t.name, qt, tag if use else "none")
            if key not in cache:
                x = base.read_tensor(t.name).reshape(t.rows, t.cols)
                w = imatrix.vector(t.name) if t.name in imatrix else None
                stored = Path(quant_cache_dir) / f"{t.name}.{qt}.{key[2]}.npy" if quant_cache_dir else None
                if stored is not None and stored.exists():
                    raw = np.load(stored).reshape(t.rows, -1)
                else:
                    raw = quant.quantize(x, qt, imatrix=quantized_with.vector(t.name) if use else None)
                q = quant.dequantize(raw, qt, cols=t.cols)
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


def compare(out_dir, slug: str, base_path, imatrix_path, *, dataset_keys=("prose", "code", "gsm8k"),
            quant_cache_dir=None) -> dict:
    """Exact weight error vs measured KLD for every run of one model (presets with and without the
    imatrix, and ablations); the error is always weighted by `imatrix_path`."""
    imatrix = read_imatrix(imatrix_path)
    cache: dict = {}
    rows = []
    for path in sorted((Path(out_dir) / "runs" / slug).glob("*.json")):
        r = json.loads(path.read_text())
        sets = r["result"]["sets"]
        n = sum(sets[k]["n_tokens"] for k in dataset_keys if k in sets)
        kld = sum(sets[k]["kld_mean"] * sets[k]["n_tokens"] for k in dataset_keys if k in sets) / n
        errs = run_weight_errors(base_path, r["tensor_types"], imatrix, cache=cache,
                                 quantized_with=imatrix if r.get("imatrix") else None, quant_cache_dir=quant_cache_dir)
        kind = "ablation" if r.get("ablation_group") else ("preset+imatrix" if r.get("imatrix") else "preset")
        rows.append({"run": r["run"], "kind": kind,
                     "kld_mean": kld, "bits_per_weight": r["bits_per_weight"], **errs})
    return {"rows": rows, "summary": _summaries(rows)}


def _summaries(rows: list[dict]) -> dict:
    out = {}
    for kind in ("preset", "preset+imatrix", "ablation", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        sel_w = [r for r in sel if r.get("weighted_rel_rmse")]
        out[kind] = {
            "n": len(sel),
            "spearman_weighted": spearman([r["weighted_rel_rmse"] for r in sel_w], [r["kld_mean"] for r in sel_w]),
            "spearman_unweighted": spearman([r["rel_rmse"] for r in sel], [r["kld_mean"] for r in sel]),
            "spearman_bits_per_weight": spearman([-r["bits_per_weight"] for r in sel], [r["kld_mean"] for r in sel])
            if all(r.get("bits_per_weight") for r in sel) else float("nan"),
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
    lines += ["| runs | n | Spearman (imatrix-weighted error) | Spearman (unweighted error) | Spearman (fewer bits/weight) | log-log slope (weighted) | median / max factor (weighted) | median / max factor (unweighted) |",
              "|---|---|---|---|---|---|---|---|"]
    groups = [(k, summ[k]) for k in ("preset", "preset+imatrix", "ablation", "all")]
    if inspect_result and inspect_result.get("summary"):
        groups.append(("inspect, imatrix presets", inspect_result["summary"]["all"]))
    for name, s in groups:
        fw, fu = s.get("fit_weighted", {}), s.get("fit_unweighted", {})
        nan = float("nan")
        lines.append(f"| {name} | {s['n']} | {s['spearman_weighted']:.3f} | {s['spearman_unweighted']:.3f} | "
                     f"{s.get('spearman_bits_per_weight', nan):.3f} | {fw.get('slope', nan):.2f} | "
                     f"{fw.get('median_factor', nan):.2f} / {fw.get('max_factor', nan):.2f} | "
                     f"{fu.get('median_factor', nan):.2f} / {fu.get('max_factor', nan):.2f} |")
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


def write_report(out_dir, models: list[tuple[str, str, str, str | None]], path) -> None:
    """ANALYSIS.md: one section per (slug, base F32 GGUF, imatrix, quantized-tensor cache dir)."""
    parts = [
        "# Simulated weight error vs measured KLD",
        "",
        "Generated by `python -m predictor.measure.analysis` from `runs/*/*.json` (see the module docstring",
        "for the definitions). KLD is the token-weighted mean over the prose, code and GSM8K-solution",
        "texts of each run. Weight errors are exact (every row), computed from the F32 base and the run's",
        "per-tensor types; they equal `quantpredict inspect --exact` to all printed digits. The",
        "imatrix-weighted error covers only tensors the imatrix has entries for (not token_embd/output).",
        "`median / max factor`: how far the log-log fit's KLD is from the measured one.",
        "",
    ]
    for slug, base, imat, cache_dir in models:
        res = compare(out_dir, slug, base, imat, quant_cache_dir=cache_dir)
        parts.append(render_markdown(slug, res))
    Path(path).write_text("\n".join(parts))


if __name__ == "__main__":
    import sys

    # python -m predictor.measure.analysis OUT_DIR REPORT.md SLUG:BASE_F32:IMATRIX[:CACHE_DIR] ...
    out_dir, report = sys.argv[1:3]
    specs = []
    for arg in sys.argv[3:]:
        bits = arg.split(":")
        specs.append((bits[0], bits[1], bits[2], bits[3] if len(bits) > 3 else None))
    write_report(out_dir, specs, report)
