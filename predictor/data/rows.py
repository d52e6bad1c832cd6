"""Helpers shared by curation and ingestion: row ids, relative drops, flag rules, file hashes."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import polars as pl

from predictor.schema import DISTORTION_COLUMNS, MEASUREMENT_COLUMNS

MEASUREMENT_ID_FIELDS = ("model", "quant", "method", "imatrix", "imatrix_note", "task", "metric", "metric_filter",
                         "n_shot", "source", "source_location", "source_sha256", "source_row")
DISTORTION_ID_FIELDS = ("model", "quant", "method", "imatrix", "imatrix_note", "metric", "dataset", "context_length",
                        "source", "source_location", "source_sha256", "source_row")

# Rows whose baseline lies this close to (or below) the chance score have no meaningful relative drop.
CHANCE_MARGIN_PCT = 5.0
# A strict-format score below this fraction of the flexible score of the same run is a format failure.
STRICT_FLEXIBLE_RATIO = 0.5


def row_id(row: dict[str, Any], fields: Iterable[str]) -> str:
    key = "\x1f".join("" if row.get(f) is None else str(row.get(f)) for f in fields)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = 0
        while chunk := f.read(1 << 20):
            n += len(chunk)
            if limit is not None and n > limit:
                raise ValueError("file larger than the limit")
            h.update(chunk)
    return h.hexdigest()


def relative_drop(baseline: float | None, quant: float | None, higher_is_better: bool = True) -> float | None:
    """(base - quant) / base x 100 for higher-is-better metrics, (quant - base) / base x 100 otherwise.
    Positive = worse. None when a score is missing or the baseline is zero."""
    if baseline is None or quant is None or baseline == 0:
        return None
    d = (baseline - quant) if higher_is_better else (quant - baseline)
    return d / abs(baseline) * 100.0


def add_reason(row: dict[str, Any], reason: str) -> None:
    """Mark a row unreliable, appending to (not replacing) earlier reasons."""
    row["unreliable"] = True
    old = row.get("unreliable_reason")
    if not old:
        row["unreliable_reason"] = reason
    elif reason not in old.split("; "):
        row["unreliable_reason"] = f"{old}; {reason}"


def add_note(row: dict[str, Any], note: str | None) -> None:
    if not note:
        return
    old = row.get("note")
    row["note"] = note if not old else (old if note in old.split("; ") else f"{old}; {note}")


def flag_near_chance(row: dict[str, Any], chance_pct: float | None) -> None:
    if chance_pct is None or row.get("score_unit") != "percent" or row.get("baseline_score") is None:
        return
    if row["baseline_score"] < chance_pct + CHANCE_MARGIN_PCT:
        add_reason(row, f"baseline {row['baseline_score']:g}% is within {CHANCE_MARGIN_PCT:g} points of chance "
                        f"({chance_pct:g}%): the relative drop is noise")


def flag_format_failures(rows: list[dict[str, Any]]) -> int:
    """Flag strict-format scores far below the flexible score of the same run.

    lm-eval reports e.g. GSM8K as exact_match with a 'strict-match' and a 'flexible-extract' filter. A
    strict score under half the flexible one means the model's answers were right but badly formatted —
    a prompt/template problem, not quantization damage. Returns how many rows were flagged.
    """
    run_key = ("model", "quant", "method", "imatrix", "task", "metric", "n_shot", "source", "source_sha256",
               "source_file")
    flexible = {}
    for r in rows:
        if (r.get("metric_filter") or "").startswith("flexible"):
            flexible[tuple(r.get(k) for k in run_key)] = r
    n = 0
    for r in rows:
        if not (r.get("metric_filter") or "").startswith("strict"):
            continue
        f = flexible.get(tuple(r.get(k) for k in run_key))
        if f is None:
            continue
        for side in ("baseline_score", "quant_score"):
            s, fl = r.get(side), f.get(side)
            if s is not None and fl is not None and fl > 0 and s < STRICT_FLEXIBLE_RATIO * fl:
                add_reason(r, f"strict-format {side.split('_')[0]} score {s:g} is far below the flexible-extract "
                              f"score {fl:g} of the same run (answer-format failure, not quantization damage)")
                n += 1
                break
    return n


def frame(rows: list[dict[str, Any]], table: str) -> pl.DataFrame:
    cols = MEASUREMENT_COLUMNS if table == "measurements" else DISTORTION_COLUMNS
    schema = pl.Schema([(c.name, c.dtype) for c in cols])
    data = {c.name: [r.get(c.name) for r in rows] for c in cols}
    return pl.DataFrame(data, schema=schema)

