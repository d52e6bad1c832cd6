"""One table of the family: training facts from the records, damage from `measure`'s tables.

Per model: parameters, tokens seen, tokens per parameter, learning rate, weight decay, train time,
final losses, outlier statistics; mean KLD on prose / code / GSM8K solutions at a few presets
(without imatrix), arithmetic exact match at the base and those presets, and measure time (sum of
the runs' quantize + eval seconds).

`predicted_kld_table` sets the predictor's weights-tier KLD beside the measured one: the family
models are GGUFs we can read, never seen by the predictor's training, so they check how well
`quantpredict MODEL.gguf` turns the simulated error of a model's own tensors into distortion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from predictor.errors import InputFileError

__all__ = ["build_family_table", "predicted_kld_table", "REPORT_PRESETS"]

REPORT_PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
_SETS = {"prose": "Project Gutenberg", "code": "Python 3.11", "gsm8k": "GSM8K"}


def _records(records_dir: Path) -> list[dict]:
    out = []
    for p in sorted(records_dir.glob("*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(p, f"not a JSON record ({e})", "rebuild it with quantpredict family train") from None
    return out


def build_family_table(records_dir: str | os.PathLike, measured_dir: str | os.PathLike | None = None,
                       *, imatrix: str = "no") -> pl.DataFrame:
    """Rows in record order (sorted by parameters, then tokens); measured columns are null where missing."""
    recs = _records(Path(records_dir))
    dist = meas = runs = None
    if measured_dir is not None:
        md = Path(measured_dir)
        if (md / "distortion.csv").is_file():
            dist = pl.read_csv(md / "distortion.csv", infer_schema_length=0).filter(
                (pl.col("metric") == "kld_mean") & (pl.col("imatrix") == imatrix))
        if (md / "measurements.csv").is_file():
            meas = pl.read_csv(md / "measurements.csv", infer_schema_length=0).filter(
                (pl.col("task") == "Arithmetic") & (pl.col("imatrix") == imatrix))
        if (md / "runs.csv").is_file():
            runs = pl.read_csv(md / "runs.csv", infer_schema_length=0)
    rows = []
    for r in sorted(recs, key=lambda r: (r["n_params"], r["tokens_seen"], r["name"])):
        t = r["config"]["train"]
        row = {"model": r["name"], "params_M": r["n_params"] / 1e6, "tokens_M": r["tokens_seen"] / 1e6,
               "tok_per_param": r["tokens_per_param"], "lr": t["lr"], "wd": t["weight_decay"],
               "train_s": r["train_seconds"], "train_loss": r["final_train_loss"]}
        row |= {f"val_{k}": v for k, v in r["final_val_loss"].items()}
        row |= {"w_max_over_rms": r["outliers"]["max_abs_over_rms"],
                "w_kurtosis": r["outliers"]["mean_excess_kurtosis"],
                "act_max_over_median": r["outliers"]["massive_activation_ratio"]}
        for short, prefix in _SETS.items():
            for q in REPORT_PRESETS:
                v = None
                if dist is not None:
                    hit = dist.filter((pl.col("model") == r["name"]) & (pl.col("quant") == q)
                                      & pl.col("dataset").str.starts_with(prefix))
                    v = float(hit["value"][0]) if hit.height else None
                row[f"kld_{short}_{q}"] = v
        base = None
        for q in REPORT_PRESETS:
            v = None
            if meas is not None:
                hit = meas.filter((pl.col("model") == r["name"]) & (pl.col("quant") == q))
                if hit.height:
                    v, base = float(hit["quant_score"][0]), float(hit["baseline_score"][0])
            row[f"arith_{q}"] = v
        row["arith_base"] = base
        if runs is not None:
            mine = runs.filter(pl.col("model") == r["name"])
            row["measure_s"] = float(mine["seconds_quantize"].cast(pl.Float64).sum()
                                     + mine["seconds_eval"].cast(pl.Float64).sum()) if mine.height else None
            row["n_runs"] = mine.height
        rows.append(row)
    return pl.DataFrame(rows)


def predicted_kld_table(records_dir: str | os.PathLike, runs_dir: str | os.PathLike, *, imatrix: str = "no",
                        imatrix_dir: str | os.PathLike | None = None, measured_dir: str | os.PathLike | None = None,
                        progress=None) -> pl.DataFrame:
    """Per model with RUNS/NAME/model.gguf: the predictor's KLD (weights tier; with imatrix="yes" the
    imatrix IMATRIX_DIR/NAME.imatrix.gguf) at REPORT_PRESETS, the measured prose KLD beside it, and
    the mean / sd over presets of ln(predicted / measured)."""
    import math

    from predictor.model.predict import predict

    measured = None
    if measured_dir is not None and (Path(measured_dir) / "distortion.csv").is_file():
        measured = pl.read_csv(Path(measured_dir) / "distortion.csv", infer_schema_length=0).filter(
            (pl.col("metric") == "kld_mean") & (pl.col("imatrix") == imatrix)
            & pl.col("dataset").str.starts_with(_SETS["prose"]))
    rows = []
    for r in sorted(_records(Path(records_dir)), key=lambda r: (r["n_params"], r["tokens_seen"], r["name"])):
        gguf = Path(runs_dir) / r["name"] / "model.gguf"
        imat = Path(imatrix_dir) / f"{r['name']}.imatrix.gguf" if imatrix == "yes" and imatrix_dir else None
        if not gguf.is_file() or (imatrix == "yes" and (imat is None or not imat.is_file())):
            continue
        if progress:
            progress(r["name"])
        res = predict(gguf, task="knowledge", imatrix=imat, train_tokens=r["tokens_seen"] / 1e12,
                      presets=list(REPORT_PRESETS))
        pred = {p.preset: p.kld for p in res.predictions}
        row: dict = {"model": r["name"], "tier": res.tier}
        logs = []
        for q in REPORT_PRESETS:
            row[f"pred_kld_{q}"] = pred.get(q)
            m = None
            if measured is not None:
                hit = measured.filter((pl.col("model") == r["name"]) & (pl.col("quant") == q))
                m = float(hit["value"][0]) if hit.height else None
            row[f"kld_prose_{q}"] = m
            if m and pred.get(q):
                logs.append(math.log(pred[q] / m))
        row["log_ratio_mean"] = sum(logs) / len(logs) if logs else None
        row["log_ratio_sd"] = (math.sqrt(sum((x - row["log_ratio_mean"]) ** 2 for x in logs) / len(logs))
                               if logs else None)
        rows.append(row)
    return pl.DataFrame(rows)
