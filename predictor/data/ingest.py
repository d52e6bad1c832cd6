"""Append new measurements to a training-data directory.

Three input kinds, recognised by content (not by file extension):

- lm-evaluation-harness v0.4 results JSON: a baseline run plus one run per quant -> measurement rows;
- llama-perplexity logs (plain PPL, or the --kl-divergence summary) -> distortion rows;
- a CSV whose columns are a subset of the measurements or distortion schema -> rows of that table.

Everything is parsed and validated before anything is written; the tables are then written to
temporary files and renamed into place, so a malformed input changes nothing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from predictor.data.lm_eval import LmEvalRun, read_lm_eval_results
from predictor.data.llama_perplexity import PerplexityLog, read_perplexity_log
from predictor.data.quant_names import IMATRIX_REQUIRED, parse_quant_name
from predictor.data.registry import alias_map, registry_row
from predictor.data.rows import (
    DISTORTION_ID_FIELDS,
    MEASUREMENT_ID_FIELDS,
    add_note,
    flag_format_failures,
    flag_near_chance,
    frame,
    relative_drop,
    row_id,
    sha256_file,
)
from predictor.data.store import TABLE_FILES, empty_table, read_table, validate_frame, write_tables_atomic
from predictor.data.tasks import task_by_lm_eval_id, task_by_name
from predictor.errors import InputFileError, MismatchError, SchemaError, UsageError
from predictor.schema import DISTORTION_COLUMNS, IMATRIX_VALUES, MEASUREMENT_COLUMNS, TASK_CATEGORIES

MAX_INPUT_BYTES = 64 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024


@dataclass
class IngestReport:
    directory: Path
    added: dict[str, int]  # table -> rows appended
    duplicates: dict[str, int]  # table -> rows already present (skipped)
    new_rows: dict[str, pl.DataFrame]
    warnings: list[str] = field(default_factory=list)
    written: bool = False


# ---------------------------------------------------------------------------------------------
# Input recognition


def detect_kind(path: str | os.PathLike) -> str:
    """'lm_eval', 'perplexity' or 'csv', from the first bytes of the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror})", "check the path") from None
    if b"\x00" in head:
        raise InputFileError(path, "is a binary file", "pass an lm-eval results JSON, a llama-perplexity log or a CSV")
    text = head.decode("utf-8", errors="replace")
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        return "lm_eval"
    first = stripped.splitlines()[0] if stripped else ""
    names = {c.name for c in MEASUREMENT_COLUMNS} | {c.name for c in DISTORTION_COLUMNS}
    header = [h.strip() for h in next(csv.reader([first]), [])] if first else []
    if header and sum(h in names for h in header) >= 2:
        return "csv"
    tail = ""
    size = path.stat().st_size
    if size > _SNIFF_BYTES:  # the final statistics are at the end of a long log
        with open(path, "rb") as f:
            f.seek(size - _SNIFF_BYTES)
            tail = f.read().decode("utf-8", errors="replace")
    if any(s in text + tail for s in ("Final estimate: PPL", "====== Perplexity statistics", "perplexity: calculating",
                                      "perplexity: tokenizing", "kl_divergence: computing")):
        return "perplexity"
    raise InputFileError(path, "is neither an lm-eval results JSON, a llama-perplexity log nor a CSV with schema columns",
                         "see training_data/README.md for the accepted formats")


def split_label(arg: str) -> tuple[str | None, str]:
    """'Q4_K_M=q4km.json' -> ('Q4_K_M', 'q4km.json'); a path that exists as given is never split."""
    if "=" in arg and not Path(arg).exists():
        label, _, path = arg.partition("=")
        if label.strip() and path.strip():
            return label.strip(), path.strip()
    return None, arg


# ---------------------------------------------------------------------------------------------


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


class _Context:
    """What every row needs: registry lookups, provenance defaults, options."""

    def __init__(self, registry: pl.DataFrame, *, imatrix: str, imatrix_note: str | None, source: str | None,
                 today: str, baseline_precision: str | None, task_categories: dict[str, str]):
        self.registry = registry
        self.aliases = alias_map(registry)
        self.imatrix = imatrix
        self.imatrix_note = imatrix_note
        self.source = source
        self.today = today
        self.baseline_precision = baseline_precision
        self.task_categories = task_categories
        self.warnings: list[str] = []
        self._warned: set[str] = set()

    def model_fields(self, name: str) -> dict[str, Any]:
        model = self.aliases.get(name.strip().casefold())
        row = registry_row(model, self.registry) if model else None
        if row is None:
            if name not in self._warned:
                self._warned.add(name)
                self.warnings.append(f"model {name!r} is not in registry.csv: family, parameters and training "
                                     "tokens are left empty — add it (with its aliases) to training_data/registry.csv")
            return {"model": name.strip(), "model_as_published": name, "family": None, "params_b": None,
                    "train_tokens_t": None}
        return {"model": model, "model_as_published": name, "family": row["family"], "params_b": row["n_params_b"],
                "train_tokens_t": row["train_tokens_t"]}

    def quant_fields(self, label: str) -> dict[str, Any]:
        q = parse_quant_name(label)
        imatrix, note = self.imatrix, self.imatrix_note
        if imatrix == "unknown" and q.method == "llama.cpp" and q.quant in IMATRIX_REQUIRED:
            imatrix, note = "yes", "; ".join(x for x in (note, "llama-quantize refuses this type without an imatrix") if x)
        return {"quant": q.quant, "quant_as_published": label, "quant_family": q.quant_family, "method": q.method,
                "weight_bits": q.weight_bits, "group_size": q.group_size, "imatrix": imatrix, "imatrix_note": note,
                "_quant_note": q.note}

    def task(self, task_id: str, path: Path):
        t = task_by_lm_eval_id(task_id) or task_by_name(task_id)
        if t is not None:
            return t.name, t.category, t.chance_pct
        cat = self.task_categories.get(task_id)
        if cat is None:
            raise UsageError(f"{path}: lm-eval task {task_id!r} has no known category — pass "
                             f"--task-category {task_id}=CATEGORY (one of {', '.join(TASK_CATEGORIES)})")
        return task_id, cat, None


_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"}


def _percent(metric: str, higher: bool | None, a: float, b: float) -> tuple[bool, bool]:
    """(is_percent, higher_is_better) for an lm-eval metric: fractions of higher-is-better metrics become percent."""
    if higher is False or metric in _LOWER_IS_BETTER or metric.endswith("perplexity"):
        return False, False
    return (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0), True


def lm_eval_rows(baseline: LmEvalRun, runs: list[tuple[str, LmEvalRun]], model: str, ctx: _Context) -> list[dict]:
    base_scores = {(s.task_id, s.metric, s.filter): s for s in baseline.scores}
    rows: list[dict] = []
    for label, run in runs:
        qf = ctx.quant_fields(label)
        matched, unmatched = 0, []
        for s in run.scores:
            b = base_scores.get((s.task_id, s.metric, s.filter))
            if b is None:
                unmatched.append(f"{s.task_id} {s.metric},{s.filter}")
                continue
            if b.n_shot is not None and s.n_shot is not None and b.n_shot != s.n_shot:
                raise MismatchError(f"{run.path}: {s.task_id} ran {s.n_shot}-shot but the baseline "
                                    f"{baseline.path.name} ran {b.n_shot}-shot — compare runs with the same settings")
            matched += 1
            name, category, chance = ctx.task(s.task_id, run.path)
            is_pct, higher = _percent(s.metric, s.higher_is_better if s.higher_is_better is not None else b.higher_is_better,
                                      b.value, s.value)
            k = 100.0 if is_pct else 1.0

            def scaled(v):
                return None if v is None else round(v * k, 10)

            row = {
                "origin": "ingested", **ctx.model_fields(model), **qf,
                "task": name, "task_category": category, "metric": s.metric, "metric_filter": s.filter,
                "n_shot": s.n_shot if s.n_shot is not None else b.n_shot, "higher_is_better": higher,
                "score_unit": "percent" if is_pct else "raw",
                "baseline_score": scaled(b.value), "quant_score": scaled(s.value),
                "baseline_stderr": scaled(b.stderr), "quant_stderr": scaled(s.stderr),
                "baseline_precision": ctx.baseline_precision or "unknown",
                "relative_drop_pct": relative_drop(b.value, s.value, higher),
                "secondhand": False, "unreliable": False, "unreliable_reason": None, "note": None,
                "source": ctx.source or f"lm-evaluation-harness {run.lm_eval_version or 'v0.4'} run",
                "source_location": f"results[{s.task_id!r}][{s.metric + ',' + s.filter!r}] vs baseline "
                                   f"{baseline.path.name} (sha256 {baseline.sha256[:12]})",
                "source_file": run.path.name, "source_sha256": run.sha256, "source_row": None,
                "ingested_at": ctx.today,
            }
            add_note(row, qf["_quant_note"])
            if name != s.task_id:
                add_note(row, f"lm-eval task {s.task_id}")
            if run.date:
                add_note(row, f"run date {run.date}")
            flag_near_chance(row, chance)
            rows.append(row)
        if unmatched and matched:
            ctx.warnings.append(f"{run.path.name}: {len(unmatched)} score(s) have no baseline counterpart and were "
                                f"skipped: {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
        if matched == 0:
            raise MismatchError(f"{run.path}: no task/metric in common with the baseline {baseline.path.name} — "
                                "pass results of the same tasks")
    flag_format_failures(rows)
    return rows


def perplexity_rows(runs: list[tuple[str | None, PerplexityLog]], baseline: PerplexityLog | None, model: str,
                    ctx: _Context, dataset: str | None) -> list[dict]:
    rows: list[dict] = []
    for label, log in runs:
        if label is None:
            if log.file_type is None:
                raise UsageError(f"{log.path}: the log does not name its quant type — label it, e.g. Q4_K_M={log.path}")
            label = log.file_type
        qf = ctx.quant_fields(label)
        if baseline is not None and baseline.n_ctx and log.n_ctx and baseline.n_ctx != log.n_ctx:
            raise MismatchError(f"{log.path}: n_ctx={log.n_ctx} but the baseline {baseline.path.name} used "
                                f"n_ctx={baseline.n_ctx} — perplexities are only comparable at the same context")

        def base_row(metric: str, value: float, unc: float | None) -> dict:
            row = {
                "origin": "ingested", **{k: v for k, v in ctx.model_fields(model).items()
                                         if k not in ("params_b", "train_tokens_t")}, **qf,
                "metric": metric, "value": value, "value_stderr": unc, "baseline": None, "baseline_stderr": None,
                "baseline_precision": None, "relative_change_pct": None,
                "dataset": dataset or "not stated", "context_length": log.n_ctx, "approximate": False,
                "secondhand": False, "unreliable": False, "unreliable_reason": None, "note": None,
                "source": ctx.source or ("llama-perplexity --kl-divergence run" if log.kld_run else "llama-perplexity run"),
                "source_location": None, "source_file": log.path.name, "source_sha256": log.sha256,
                "source_row": None, "ingested_at": ctx.today,
            }
            add_note(row, qf["_quant_note"])
            return row

        ppl = base_row("ppl", log.ppl, log.ppl_stderr)
        if log.kld_run:
            b, bu = log.stats["ppl_base"]
            ppl.update(baseline=b, baseline_stderr=bu, baseline_precision=ctx.baseline_precision or "logits of --kl-divergence-base")
            ppl["source_location"] = "Perplexity statistics: Mean PPL(Q), Mean PPL(base)"
        elif baseline is not None:
            ppl.update(baseline=baseline.ppl, baseline_stderr=baseline.ppl_stderr,
                       baseline_precision=ctx.baseline_precision or "unknown")
            ppl["source_location"] = (f"Final estimate vs baseline {baseline.path.name} "
                                      f"(sha256 {baseline.sha256[:12]})")
        else:
            ppl["source_location"] = "Final estimate"
        if ppl["baseline"] is not None:
            ppl["relative_change_pct"] = relative_drop(ppl["baseline"], ppl["value"], higher_is_better=False)
        rows.append(ppl)
        if log.kld_run:
            for metric, (value, unc) in log.stats.items():
                if metric in ("ppl", "ppl_base"):
                    continue
                r = base_row(metric, value, unc)
                r["source_location"] = "KL-divergence summary"
                r["baseline_precision"] = ctx.baseline_precision or "logits of --kl-divergence-base"
                rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# CSV in the documented schema


def _read_csv_rows(path: Path) -> tuple[str, list[dict[str, str]]]:
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise InputFileError(path, f"{size} bytes is too large to ingest", "split the CSV")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputFileError(path, "is not UTF-8 text", "save the CSV as UTF-8") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = []
        for i, r in enumerate(reader, start=1):
            if None in r:
                raise InputFileError(path, f"data row {i} has more fields than the header", "fix the row")
            rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()})
    except csv.Error as exc:
        raise InputFileError(path, f"is not a valid CSV ({exc})", "fix the quoting") from None
    meas = {c.name for c in MEASUREMENT_COLUMNS}
    dist = {c.name for c in DISTORTION_COLUMNS}
    table = "measurements" if "task" in header else ("distortion" if "value" in header else None)
    if table is None:
        raise SchemaError(f"{path}: a CSV to ingest needs a 'task' column (measurements) or a 'value' column "
                          "(distortion) — see training_data/README.md")
    cols = MEASUREMENT_COLUMNS if table == "measurements" else DISTORTION_COLUMNS
    allowed = meas if table == "measurements" else dist
    required = [c.name for c in cols if c.required_in_csv_ingest]
    missing = [c for c in required if c not in header]
    extra = [c for c in header if c not in allowed]
    if missing or extra:
        parts = ([f"missing required columns {missing}"] if missing else []) + ([f"extra columns {extra}"] if extra else [])
        raise SchemaError(f"{path}: {table} CSV has {'; '.join(parts)} — use the columns documented in training_data/README.md")
    if not rows:
        raise InputFileError(path, "has a header but no data rows", "add rows")
    return table, rows


_DERIVED = {"row_id", "origin", "ingested_at", "source_file", "source_sha256", "source_row", "family", "params_b",
            "train_tokens_t", "model_as_published", "quant_as_published"}


def csv_rows(path: Path, ctx: _Context) -> tuple[str, list[dict]]:
    table, raws = _read_csv_rows(path)
    cols = MEASUREMENT_COLUMNS if table == "measurements" else DISTORTION_COLUMNS
    typed = {c.name: c.dtype for c in cols}
    sha = sha256_file(path)
    out = []
    for i, raw in enumerate(raws, start=1):
        where = f"{path} row {i}"
        vals: dict[str, Any] = {}
        for name, text in raw.items():
            if name in _DERIVED or text in (None, ""):
                continue
            dtype = typed[name]
            try:
                if dtype == pl.Float64:
                    vals[name] = float(text)
                elif dtype == pl.Int64:
                    vals[name] = int(text)
                elif dtype == pl.Boolean:
                    if text.lower() not in ("true", "false"):
                        raise ValueError
                    vals[name] = text.lower() == "true"
                else:
                    vals[name] = text
            except ValueError:
                raise SchemaError(f"{where}: {name} = {text!r} is not a valid {dtype}") from None
        for name in (c.name for c in cols if c.required_in_csv_ingest):
            if vals.get(name) is None:
                raise SchemaError(f"{where}: required column {name} is empty")
        label = vals.pop("quant")
        try:
            qf = ctx.quant_fields(label)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        qnote = qf.pop("_quant_note")
        if vals.get("imatrix") is not None and vals["imatrix"] not in IMATRIX_VALUES:
            raise SchemaError(f"{where}: imatrix = {vals['imatrix']!r} — allowed: {list(IMATRIX_VALUES)}")
        row: dict[str, Any] = {"origin": "ingested", **ctx.model_fields(vals.pop("model")), **qf}
        row.update({k: v for k, v in vals.items() if v is not None})
        row.setdefault("secondhand", False)
        row["unreliable"] = bool(vals.get("unreliable", False))
        row["source"] = vals.get("source") or ctx.source or f"ingested CSV {path.name}"
        row.update(source_file=path.name, source_sha256=sha, source_row=i, ingested_at=ctx.today)
        add_note(row, qnote)
        if table == "measurements":
            t = task_by_name(vals["task"])
            if t is not None:
                row["task"] = t.name
                row.setdefault("task_category", t.category)
                chance = t.chance_pct
            else:
                chance = None
                if "task_category" not in row:
                    raise SchemaError(f"{where}: task {vals['task']!r} is unknown — give its task_category "
                                      f"(one of {', '.join(TASK_CATEGORIES)})")
            row.setdefault("higher_is_better", True)
            row.setdefault("score_unit", "percent")
            if row.get("relative_drop_pct") is None:
                row["relative_drop_pct"] = relative_drop(row["baseline_score"], row["quant_score"], row["higher_is_better"])
            flag_near_chance(row, chance)
        else:
            row.setdefault("approximate", False)
            if row["metric"] == "ppl" and row.get("baseline") is not None and row.get("relative_change_pct") is None:
                row["relative_change_pct"] = relative_drop(row["baseline"], row["value"], higher_is_better=False)
        out.append(row)
    if table == "measurements":
        flag_format_failures(out)
    return table, out


# ---------------------------------------------------------------------------------------------


def _load_or_empty(directory: Path, table: str) -> pl.DataFrame:
    path = directory / TABLE_FILES[table]
    return read_table(path, table) if path.exists() else empty_table(table)


def _default_registry() -> pl.DataFrame:
    from predictor.data import default_training_dir

    path = default_training_dir() / TABLE_FILES["registry"]
    return read_table(path, "registry") if path.exists() else empty_table("registry")


def ingest(
    inputs: Iterable[str],
    *,
    out_dir: str | os.PathLike | None = None,
    model: str | None = None,
    baseline: str | os.PathLike | None = None,
    imatrix: str = "unknown",
    imatrix_note: str | None = None,
    source: str | None = None,
    dataset: str | None = None,
    baseline_precision: str | None = None,
    task_categories: dict[str, str] | None = None,
    dry_run: bool = False,
    today: str | None = None,
) -> IngestReport:
    """Parse `inputs` ('LABEL=path' for lm-eval JSON and perplexity logs, plain paths for CSVs or
    self-describing logs) and append their rows to the tables in `out_dir` (default training_data/).
    Nothing is written if any input is malformed, or when `dry_run`."""
    from predictor.data import default_training_dir

    directory = Path(out_dir) if out_dir is not None else default_training_dir()
    if directory.exists() and not directory.is_dir():
        raise InputFileError(directory, "is not a directory", "pass a training-data folder with -o")
    if imatrix not in IMATRIX_VALUES:
        raise UsageError(f"--imatrix {imatrix!r} — use one of {list(IMATRIX_VALUES)}")
    for task, cat in (task_categories or {}).items():
        if cat not in TASK_CATEGORIES:
            raise UsageError(f"--task-category {task}={cat}: category must be one of {', '.join(TASK_CATEGORIES)}")
    inputs = list(inputs)
    if not inputs:
        raise UsageError("nothing to ingest — give QUANT=FILE pairs (with --baseline) or CSV files")

    existing = {t: _load_or_empty(directory, t) for t in ("measurements", "distortion", "excluded", "registry")}
    registry = existing["registry"] if existing["registry"].height else _default_registry()
    ctx = _Context(registry, imatrix=imatrix, imatrix_note=imatrix_note, source=source, today=today or _today(),
                   baseline_precision=baseline_precision, task_categories=dict(task_categories or {}))

    labelled = [split_label(a) for a in inputs]
    kinds = [(label, Path(p), detect_kind(p)) for label, p in labelled]
    base_kind = detect_kind(baseline) if baseline is not None else None
    new: dict[str, list[dict]] = {"measurements": [], "distortion": []}

    lm = [(label, p) for label, p, k in kinds if k == "lm_eval"]
    logs = [(label, p) for label, p, k in kinds if k == "perplexity"]
    csvs = [(label, p) for label, p, k in kinds if k == "csv"]
    for label, p in csvs:
        if label is not None:
            raise UsageError(f"{label}={p}: a CSV carries its own quant column — pass the path without a label")
    if base_kind == "csv":
        raise UsageError(f"--baseline {baseline}: must be an lm-eval results JSON or a llama-perplexity log")
    if baseline is not None and not lm and not logs:
        raise UsageError("--baseline is only used with QUANT=FILE inputs (lm-eval JSON or llama-perplexity logs)")

    if lm:
        if base_kind != "lm_eval":
            raise UsageError("lm-eval results need --baseline BASE.json (the unquantized run of the same tasks)")
        base_run = read_lm_eval_results(baseline)
        runs = []
        for label, p in lm:
            if label is None:
                raise UsageError(f"{p}: label the quant, e.g. Q4_K_M={p}")
            runs.append((label, read_lm_eval_results(p)))
        name = model or base_run.model_name
        if not name:
            raise UsageError("--model NAME is required (the results file does not name the model)")
        new["measurements"] += lm_eval_rows(base_run, runs, name, ctx)
    if logs:
        if not model:
            raise UsageError("--model NAME is required for llama-perplexity logs")
        base_log = None
        if base_kind == "perplexity":
            base_log = read_perplexity_log(baseline)
        elif base_kind is not None and not lm:
            raise UsageError(f"--baseline {baseline}: a llama-perplexity log is needed as baseline for logs")
        parsed = [(label, read_perplexity_log(p)) for label, p in logs]
        new["distortion"] += perplexity_rows(parsed, base_log, model, ctx, dataset)
    for _, p in csvs:
        table, rows = csv_rows(p, ctx)
        new[table] += rows

    frames: dict[str, pl.DataFrame] = {}
    added, dups, new_frames = {}, {}, {}
    for table, rows in new.items():
        fields = MEASUREMENT_ID_FIELDS if table == "measurements" else DISTORTION_ID_FIELDS
        seen = set(existing[table].get_column("row_id").to_list())
        fresh, n_dup = [], 0
        for r in rows:
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            r["row_id"] = row_id(r, fields)
            if r["row_id"] in seen:
                n_dup += 1
                continue
            seen.add(r["row_id"])
            fresh.append(r)
        df = validate_frame(frame(fresh, table), table, f"new {table} rows")
        added[table], dups[table], new_frames[table] = df.height, n_dup, df
        if df.height:
            frames[table] = pl.concat([existing[table], df], how="vertical")
    report = IngestReport(directory, added, dups, new_frames, ctx.warnings)
    if dry_run or not frames:
        return report
    # A folder that started empty gets every table (the registry copied), so load_training_data() works on it.
    for table in ("measurements", "distortion", "excluded", "registry"):
        if table not in frames and not (directory / TABLE_FILES[table]).exists():
            frames[table] = registry if table == "registry" else existing[table]
    write_tables_atomic(directory, frames)
    report.written = True
    _refresh_readme(directory)
    return report


def _refresh_readme(directory: Path) -> None:
    """Keep the generated row counts of a training-data README in step with the tables."""
    readme = directory / "README.md"
    if not readme.exists() or "<!-- BEGIN summary" not in readme.read_text(encoding="utf-8"):
        return
    from predictor.data.curate import update_readme

    tables = {t: read_table(directory / TABLE_FILES[t], t) for t in ("measurements", "distortion", "excluded", "registry")}
    update_readme(readme, tables["measurements"], tables["distortion"], tables["excluded"], tables["registry"])
