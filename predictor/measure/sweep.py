"""`measure`: quantize a base model with each preset, run every file with llama.cpp, record the damage.

Layout of one measurement (resumable: a finished run is never redone):

    OUT/measurements.csv, OUT/distortion.csv   rows in the schema of the published tables (upserted by row_id)
    OUT/ablations.csv                          distortion rows of per-role / per-block ablations (+2 columns)
    OUT/runs.csv                               one row per measured file: type mix, size, hashes, timings
    OUT/runs/<model-slug>/<run>.json           everything a run measured, with per-tensor types
    WORK/<model-slug>/                         big files: F32 base, base log-probs, quantized GGUFs, cache
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from predictor.data.rows import add_reason, flag_near_chance, relative_drop, row_id
from predictor.errors import UsageError
from predictor.measure.engine import Engine, engine_version, load_llama_cpp
from predictor.measure.evaluate import evaluate_base, evaluate_quant
from predictor.measure.tasks import DATASET_NAMES, TASK_NAMES, distortion_only, get_suite
from predictor.measure.writer import open_base_gguf, plan_tensor_types, sha256_file, write_f32_base, write_gguf
from predictor.quant.recipes import STANDARD_PRESETS, get_preset, is_quantizable, layer_of, shape_fallback, tensor_role
from predictor.quant.types import get_type
from predictor.schema import DISTORTION_COLUMNS, MEASUREMENT_COLUMNS

__all__ = ["MeasureConfig", "measure", "ablation_groups", "plan_runs", "Run"]

FLOAT_DTYPES = ("F32", "F16", "BF16")
_DIST_ID_FIELDS = ("model", "quant", "method", "imatrix", "imatrix_note", "metric", "dataset", "context_length",
                   "source", "source_location")
_MEAS_ID_FIELDS = ("model", "quant", "method", "imatrix", "task", "metric", "metric_filter", "n_shot", "source",
                   "source_location")
ABLATION_EXTRA = ("ablation_group", "ablation_type")
RUN_COLUMNS = ("run", "model", "quant", "imatrix", "ablation_group", "ablation_type", "suite", "n_ctx",
               "gguf_file", "gguf_sha256", "bits_per_weight", "tensor_bytes", "type_counts", "base_origin",
               "base_sha256", "imatrix_file", "imatrix_sha256", "engine", "threads", "tokens_evaluated",
               "seconds_quantize", "seconds_eval", "measured_at")
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_CHANCE = {"arc_easy": 25.0, "arc_challenge": 25.0, "hellaswag": 25.0, "mmlu": 25.0}
# Exact-match tasks have no chance level; under this baseline a handful of items decides the drop.
MIN_EXACT_MATCH_BASELINE_PCT = 10.0
_CATEGORY = {"arc_easy": "reasoning", "arc_challenge": "reasoning", "hellaswag": "reasoning", "mmlu": "knowledge",
             "arithmetic": "math"}


@dataclass
class MeasureConfig:
    base: str
    out_dir: str
    presets: list[str] = field(default_factory=lambda: list(STANDARD_PRESETS))
    imatrix: str | None = None
    without_imatrix: bool = True  # with an imatrix, also measure each preset without it
    suite: str = "standard"
    ablate: list[str] = field(default_factory=list)  # group names, or ["all"]
    ablation_type: str = "Q4_0"
    work_dir: str | None = None
    model_id: str | None = None
    base_note: str = ""  # where the base weights came from (recorded on every row)
    threads: int = 1
    keep_gguf: bool = False
    items_dir: str | None = None
    make_imatrix: bool = False  # no --imatrix: compute our own (predictor.measure.imatrix) and use it
    imatrix_text: str | None = None  # calibration text for make_imatrix (default: held-out eval passages)


@dataclass(frozen=True)
class Run:
    key: str
    preset: str | None  # None for an ablation
    imatrix: bool
    group: str | None = None  # ablation group


def _read_checked_imatrix(path: str, model):
    from predictor.io.imatrix import read_imatrix

    imat = read_imatrix(path)
    imat.check_against(model.tensors)
    return imat


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def ablation_groups(base) -> dict[str, list[str]]:
    """Tensor groups for ablations: each role, and the layers in thirds (blocks)."""
    quantizable = [t for t in base.tensors if is_quantizable(t.name, t.ne)]
    groups: dict[str, list[str]] = {}
    for t in quantizable:
        groups.setdefault(tensor_role(t.name), []).append(t.name)
    n_layers = base.metadata.n_layers or 0
    if n_layers >= 3:
        cuts = [0, n_layers // 3, 2 * n_layers // 3, n_layers]
        for a, b in zip(cuts, cuts[1:]):
            names = [t.name for t in quantizable if layer_of(t.name) is not None and a <= layer_of(t.name) < b]
            groups[f"layers_{a}-{b - 1}"] = names
    groups.pop("other", None)
    return groups


def plan_runs(cfg: MeasureConfig, groups: dict[str, list[str]]) -> list[Run]:
    """Presets without the imatrix first, then the ablations, then presets with the imatrix."""
    names = [get_preset(p).name for p in cfg.presets]
    runs = []
    if cfg.imatrix is None or cfg.without_imatrix:
        runs += [Run(name, name, False) for name in names]
    wanted = list(groups) if cfg.ablate == ["all"] else cfg.ablate
    for g in wanted:
        if g not in groups:
            raise UsageError(f"unknown ablation group {g!r}; this model has: {', '.join(groups)} (or 'all')")
        runs.append(Run(f"ablate-{g}-{cfg.ablation_type}", None, False, g))
    if cfg.imatrix is not None:
        runs += [Run(f"{name}-imatrix", name, True) for name in names]
    return runs


def _quant_family(preset: str | None) -> str:
    if preset is None:
        return "gguf-mixed"
    if preset.startswith("IQ"):
        return "gguf-i"
    return "gguf-legacy" if preset in _LEGACY else "gguf-k"


def _nominal_bits(preset: str) -> float | None:
    m = re.match(r"I?Q(\d)", preset)
    return float(m.group(1)) if m else None


def _log(msg: str) -> None:
    print(f"[measure {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- tables ---------------------------------------------------------------------------------------

def _upsert(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Replace rows with the same key (first column) and append the rest; atomic, and locked so that
    two sweeps writing into the same folder do not lose each other's rows."""
    if not rows:
        return
    import fcntl
    import hashlib
    import tempfile

    # the lock lives outside OUT so that no stray file lands in the results folder
    key = hashlib.sha256(os.fspath(path.parent.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"quantpredict-measure-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _upsert_locked(path, rows, columns)


def _upsert_locked(path: Path, rows: list[dict], columns: list[str]) -> None:
    schema = {c: pl.String for c in columns}
    new = pl.DataFrame([{c: (None if r.get(c) is None else _fmt(r.get(c))) for c in columns} for r in rows],
                       schema=schema)
    if path.exists():
        old = pl.read_csv(path, schema=schema)
        key = columns[0]
        old = old.filter(~pl.col(key).is_in(new[key].to_list()))
        new = pl.concat([old, new])
    tmp = path.with_name(path.name + ".part")
    new.write_csv(tmp)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


ORIGIN_GRID_FLAG = 0.5  # share of weights written in the type the origin GGUF already had


def origin_grid_share(src, tensor_types: dict[str, str]) -> float:
    """Share of the quantizable weights (by element count) that a plan stores in the very type the
    source GGUF had: requantizing those lands on the origin's own grid and loses (almost) nothing.
    token_embd is left out: most presets keep it in the type the origin gave it (Gemma-3-270M's is
    63% of the model), which would mark every preset of such a model; its type is in the row's mix."""
    total = same = 0
    for t in src.tensors:
        if not is_quantizable(t.name, t.ne) or t.name == "token_embd.weight":
            continue
        n = int(np.prod(t.ne))
        total += n
        if t.dtype not in FLOAT_DTYPES and get_type(tensor_types.get(t.name, t.dtype)).name == t.dtype:
            same += n
    return same / total if total else 0.0


def _flag_origin_grid(row: dict, share: float | None) -> None:
    if share is not None and share >= ORIGIN_GRID_FLAG:
        add_reason(row, f"lands on the origin's grid: {100 * share:.0f}% of the weights keep the quantized type "
                        "the base GGUF was made from, so it loses less than it would from 16-bit weights")


def reflag_origin_grid(out_dir: str | os.PathLike, model_id: str, origin_gguf: str | os.PathLike) -> int:
    """Set the origin-grid flag on the already written preset rows of `model_id` (runs measured before
    the flag existed); returns how many rows it changed. The plan is recomputed from the origin GGUF."""
    out = Path(out_dir)
    src = open_base_gguf(origin_gguf)
    runs = pl.read_csv(out / "runs.csv", infer_schema=False).filter(
        (pl.col("model") == model_id) & pl.col("ablation_group").is_null())
    share = {}
    for quant, imat, run in runs.select("quant", "imatrix", "run").iter_rows():
        share[run.split("/", 1)[1]] = origin_grid_share(src, plan_tensor_types(src, quant, has_imatrix=imat == "yes"))
    changed = 0
    for name in ("distortion.csv", "measurements.csv"):
        path = out / name
        df = pl.read_csv(path, infer_schema=False)
        rows = df.to_dicts()
        for r in rows:
            key = (r.get("source_location") or "").rsplit("; run ", 1)[-1]
            if r["model"] == model_id and key in share:
                before = (r["unreliable"], r["unreliable_reason"])
                r["unreliable"] = r["unreliable"] == "true"
                _flag_origin_grid(r, share[key])
                r["unreliable"] = "true" if r["unreliable"] else "false"
                changed += (r["unreliable"], r["unreliable_reason"]) != before
        _upsert(path, rows, df.columns)
    return changed


def _common(cfg: MeasureConfig, ctx: dict, run: Run, quant: str) -> dict:
    row = {
        "origin": "measured",
        "model": ctx["model_id"],
        "model_as_published": ctx["model_name"],
        "family": None,
        "quant": quant,
        "quant_as_published": quant,
        "quant_family": _quant_family(run.preset),
        "method": "llama.cpp",
        "weight_bits": _nominal_bits(run.preset) if run.preset else None,
        "group_size": None,
        "bits_per_weight": ctx["bpw"],
        "imatrix": "yes" if run.imatrix else "no",
        "imatrix_note": ctx["imatrix_note"] if run.imatrix else None,
        "secondhand": False,
        "unreliable": False,
        "unreliable_reason": None,
        "source": f"local run: quantpredict measure ({ctx['engine']}, CPU)",
        "source_location": f"suite {ctx['suite'].name}; run {run.key}",
        "source_file": ctx["gguf_file"],
        "source_sha256": ctx["gguf_sha256"],
        "source_row": None,
        "ingested_at": ctx["date"],
    }
    _flag_origin_grid(row, ctx.get("origin_grid_share"))
    return row


def _distortion_rows(cfg, ctx, run: Run, result: dict, quant: str) -> list[dict]:
    rows = []
    for name, s in result["sets"].items():
        if not s.get("n_tokens"):
            continue
        note = (f"{s['n_tokens']} scored tokens in {s['n_sequences']} sequences; {ctx['provenance']}")
        metrics = [("kld_mean", s["kld_mean"], s["kld_mean_stderr"]), ("kld_median", s["kld_median"], None),
                   ("kld_p99", s["kld_p99"], None), ("kld_max", s["kld_max"], None),
                   ("same_top_p_pct", s["same_top_p_pct"], s["same_top_p_pct_stderr"]),
                   ("ppl", s["ppl"], s["ppl_stderr"]), ("delta_ppl", s["delta_ppl"], None),
                   ("ln_ppl_ratio", s["ln_ppl_ratio"], s["ln_ppl_ratio_stderr"])]
        for metric, value, stderr in metrics:
            r = _common(cfg, ctx, run, quant)
            r.update({"metric": metric, "value": value, "value_stderr": stderr,
                      "baseline": s["ppl_base"] if metric == "ppl" else None,
                      "baseline_stderr": s["ppl_base_stderr"] if metric == "ppl" else None,
                      "baseline_precision": ctx["base_precision"],
                      "relative_change_pct": relative_drop(s["ppl_base"], s["ppl"], False) if metric == "ppl" else None,
                      "dataset": DATASET_NAMES[name], "context_length": ctx["suite"].n_ctx,
                      "approximate": False, "note": note})
            r["row_id"] = row_id(r, _DIST_ID_FIELDS)
            rows.append(r)
    return rows


def _measurement_rows(cfg, ctx, run: Run, result: dict, quant: str) -> list[dict]:
    rows = []
    items = [(task, metric, st) for task, m in result.get("mc", {}).items() for metric, st in m.items()
             if isinstance(st, dict)]
    if "arith" in result:
        items.append(("arithmetic", "exact_match", result["arith"]["exact_match"]))
    for task, metric, st in items:
        if not st.get("n"):
            continue
        r = _common(cfg, ctx, run, quant)
        r.update({
            "task": TASK_NAMES[task], "task_category": _CATEGORY[task], "metric": metric, "metric_filter": None,
            "n_shot": 3 if task == "arithmetic" else 0, "higher_is_better": True, "score_unit": "percent",
            "baseline_score": st["base"], "quant_score": st["quant"], "baseline_stderr": st["base_stderr"],
            "quant_stderr": st["quant_stderr"], "baseline_precision": ctx["base_precision"],
            "relative_drop_pct": relative_drop(st["base"], st["quant"], True),
            "note": (f"n={st['n']} items, paired delta {st['delta']:+.2f} ± {st['delta_stderr_paired']:.2f} points "
                     f"(base-only correct {st['n_base_only']}, quant-only {st['n_quant_only']}); "
                     f"{'greedy exact match read from teacher-forced top-1; ' if task == 'arithmetic' else 'log-likelihood scoring; '}"
                     f"{ctx['provenance']}"),
        })
        flag_near_chance(r, _CHANCE.get(task))
        if task == "arithmetic":
            flag_low_exact_match(r)
        r["row_id"] = row_id(r, _MEAS_ID_FIELDS)
        rows.append(r)
    return rows


def flag_low_exact_match(row: dict) -> None:
    """Flag an exact-match row whose baseline is too low for its relative drop to mean anything."""
    if row.get("baseline_score") is not None and row["baseline_score"] < MIN_EXACT_MATCH_BASELINE_PCT:
        add_reason(row, f"baseline exact match {row['baseline_score']:g}% is under "
                        f"{MIN_EXACT_MATCH_BASELINE_PCT:g}%: a few items decide the relative drop")


# -- the sweep ------------------------------------------------------------------------------------

def measure(cfg: MeasureConfig, *, log: Callable[[str], None] = _log) -> dict:
    """Run every planned measurement not already in OUT; returns {'done': [...], 'skipped': [...]}."""
    load_llama_cpp()  # fail early, before any work, if the engine is missing
    suite = get_suite(cfg.suite)
    for p in cfg.presets:
        get_preset(p)
    abl_type = get_type(cfg.ablation_type).name
    out = Path(cfg.out_dir)
    src = open_base_gguf(cfg.base)
    if cfg.imatrix is not None:
        _read_checked_imatrix(cfg.imatrix, src)  # fail before any work
    model_name = str(src.kv.get("general.name") or Path(cfg.base).stem)
    model_id = cfg.model_id or model_name
    slug = _slug(model_id)
    work = Path(cfg.work_dir or out / "work") / slug
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs" / slug
    runs_dir.mkdir(parents=True, exist_ok=True)

    # The base: float files are used as they are; quantized ones are dequantized to F32 first.
    src_types = {t.dtype for t in src.tensors if is_quantizable(t.name, t.ne)}
    src_sha = sha256_file(cfg.base)
    if src_types <= set(FLOAT_DTYPES):
        base_path, base_precision = Path(cfg.base), "/".join(sorted(src_types)).lower() or "f32"
        origin = f"base {Path(cfg.base).name} used as is"
    else:
        base_path, base_precision = work / "base-f32.gguf", "f32"
        origin = (f"base = F32 dequantization of {Path(cfg.base).name} (stored as "
                  f"{'/'.join(sorted(src_types))}, sha256 {src_sha[:16]})")
        if not base_path.exists():
            log(f"writing the F32 base {base_path}")
            write_f32_base(src, base_path)
    if cfg.base_note:
        origin = f"{origin}; {cfg.base_note}"
    if cfg.make_imatrix and cfg.imatrix is None:
        cfg = replace(cfg, imatrix=os.fspath(out / "imatrix" / f"{slug}.imatrix.gguf"))
        if not Path(cfg.imatrix).exists():
            from predictor.measure.imatrix import make_imatrix

            Path(cfg.imatrix).parent.mkdir(parents=True, exist_ok=True)
            log(f"computing our own imatrix for {model_id} -> {cfg.imatrix}")
            text = Path(cfg.imatrix_text).read_text(encoding="utf-8") if cfg.imatrix_text else None
            dataset = Path(cfg.imatrix_text).name if cfg.imatrix_text else None
            make_imatrix(base_path, cfg.imatrix, text=text, **({"dataset": dataset} if dataset else {}),
                         progress=lambda k, n: log(f"  imatrix chunk {k + 1}/{n}"))
    imat = _read_checked_imatrix(cfg.imatrix, src) if cfg.imatrix is not None else None
    base = open_base_gguf(base_path)
    base_sha = src_sha if base_path == Path(cfg.base) else sha256_file(base_path)
    src.close()
    groups = ablation_groups(base)
    runs = plan_runs(cfg, groups)
    n_ctx = suite.n_ctx + 8

    # The base pass (cached per suite and base file).
    base_json = work / "base.json"
    base_result = json.loads(base_json.read_text()) if base_json.exists() else None
    if base_result is None or base_result.get("suite") != suite.as_dict() or base_result.get("base_sha256") != base_sha:
        log(f"base pass: {base_path.name}, suite {suite.name}")
        with Engine(base_path, n_ctx=n_ctx, n_threads=cfg.threads) as eng:
            base_result = evaluate_base(eng, suite, work, items_dir=cfg.items_dir,
                                        progress=lambda m: log(f"  {m}"))
        base_result["base_sha256"] = base_sha
        base_json.write_text(json.dumps(base_result))
        log(f"base pass done: {base_result['tokens_evaluated']} tokens in {base_result['seconds']:.0f} s")

    eng_version = engine_version()
    imatrix_note = None
    if imat is not None:
        ds = ", ".join(imat.datasets) if imat.datasets else "unknown data"
        imatrix_note = f"{Path(cfg.imatrix).name} ({ds}; {imat.chunk_count} chunks of {imat.chunk_size} tokens)"
    done, skipped = [], []
    for k, run in enumerate(runs):
        run_json = runs_dir / f"{run.key}.json"
        if run_json.exists():
            prev = json.loads(run_json.read_text())
            if prev.get("suite") == (distortion_only(suite) if run.group else suite).as_dict() and prev.get("base_sha256") == base_sha:
                skipped.append(run.key)
                continue
        log(f"[{k + 1}/{len(runs)}] {run.key}")
        t0 = time.perf_counter()
        if run.group is None:
            types = plan_tensor_types(base, run.preset, has_imatrix=run.imatrix)
            file_type = get_preset(run.preset).ftype
            quant = run.preset
            run_suite = suite
        else:
            members = set(groups[run.group])
            types = {t.name: (shape_fallback(abl_type, t.name, t.ne[0]) if t.name in members else t.dtype)
                     for t in base.tensors}
            file_type = 0
            quant = f"{abl_type}@{run.group}"
            run_suite = distortion_only(suite)
        gguf_path = work / f"{run.key}.gguf"
        extra_kv = {}
        if run.imatrix:
            extra_kv = {"quantize.imatrix.file": (Path(cfg.imatrix).name, "STRING"),
                        "quantize.imatrix.entries_count": (len(imat), "INT32")}
            if imat.chunk_count is not None:
                extra_kv["quantize.imatrix.chunks_count"] = (int(imat.chunk_count), "INT32")
        written = write_gguf(base, gguf_path, types, file_type=file_type, imatrix=imat if run.imatrix else None,
                             extra_kv=extra_kv, cache_dir=work / "cache")
        gguf_sha = sha256_file(gguf_path)
        t_quant = time.perf_counter() - t0
        with Engine(gguf_path, n_ctx=n_ctx, n_threads=cfg.threads) as eng:
            result = evaluate_quant(eng, run_suite, work, base_result, items_dir=cfg.items_dir,
                                    progress=lambda m: log(f"  {run.key}: {m}"))
        counts = ", ".join(f"{t}×{n}" for t, n in sorted(written.type_counts.items(), key=lambda kv: -kv[1]))
        ctx = {
            "model_id": model_id, "model_name": model_name, "bpw": written.bits_per_weight,
            "imatrix_note": imatrix_note, "engine": eng_version, "suite": run_suite, "date": _dt.date.today().isoformat(),
            "gguf_file": gguf_path.name, "gguf_sha256": gguf_sha, "base_precision": base_precision,
            "provenance": f"tensor types {counts}; {origin}; base sha256 {base_sha[:16]}",
            "origin_grid_share": origin_grid_share(src, types) if run.group is None else None,
        }
        dist_rows = _distortion_rows(cfg, ctx, run, result, quant)
        meas_rows = _measurement_rows(cfg, ctx, run, result, quant)
        record = {
            "run": run.key, "model": model_id, "preset": run.preset, "imatrix": run.imatrix,
            "ablation_group": run.group, "ablation_type": abl_type if run.group else None,
            "ablation_tensors": sorted(groups[run.group]) if run.group else None,
            "suite": run_suite.as_dict(), "base_sha256": base_sha, "base_origin": origin,
            "gguf_file": gguf_path.name, "gguf_sha256": gguf_sha, "bits_per_weight": written.bits_per_weight,
            "tensor_bytes": written.n_bytes, "type_counts": written.type_counts, "tensor_types": written.tensor_types,
            "engine": eng_version, "threads": cfg.threads, "seconds_quantize": t_quant, "result": result,
            "base": {"sets": {k: {"ppl": v["ppl"], "n_tokens": v["n_tokens"]} for k, v in base_result["sets"].items()}},
            "imatrix_file": cfg.imatrix if run.imatrix else None,
            "rows": {"distortion": dist_rows, "measurements": meas_rows},
        }
        if run.group is None:
            _upsert(out / "distortion.csv", dist_rows, ["row_id"] + [c.name for c in DISTORTION_COLUMNS if c.name != "row_id"])
            _upsert(out / "measurements.csv", meas_rows, ["row_id"] + [c.name for c in MEASUREMENT_COLUMNS if c.name != "row_id"])
        else:
            for r in dist_rows:
                r["ablation_group"], r["ablation_type"] = run.group, abl_type
                add = f"ablation: only {run.group} ({len(groups[run.group])} tensors) stored as {abl_type}, the rest as in the base"
                r["note"] = f"{add}; {r['note']}"
            cols = ["row_id"] + [c.name for c in DISTORTION_COLUMNS if c.name != "row_id"] + list(ABLATION_EXTRA)
            _upsert(out / "ablations.csv", dist_rows, cols)
        _upsert(out / "runs.csv", [{
            "run": f"{slug}/{run.key}", "model": model_id, "quant": quant, "imatrix": "yes" if run.imatrix else "no",
            "ablation_group": run.group, "ablation_type": abl_type if run.group else None, "suite": run_suite.name,
            "n_ctx": run_suite.n_ctx, "gguf_file": gguf_path.name, "gguf_sha256": gguf_sha,
            "bits_per_weight": written.bits_per_weight, "tensor_bytes": written.n_bytes,
            "type_counts": json.dumps(written.type_counts, sort_keys=True), "base_origin": origin,
            "base_sha256": base_sha, "imatrix_file": Path(cfg.imatrix).name if run.imatrix else None,
            "imatrix_sha256": sha256_file(cfg.imatrix) if run.imatrix else None, "engine": eng_version,
            "threads": cfg.threads, "tokens_evaluated": result["tokens_evaluated"], "seconds_quantize": t_quant,
            "seconds_eval": result["seconds"], "measured_at": ctx["date"],
        }], list(RUN_COLUMNS))
        tmp = run_json.with_name(run_json.name + ".part")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, run_json)
        if not cfg.keep_gguf:
            gguf_path.unlink(missing_ok=True)
        kld = result["sets"].get("prose", {}).get("kld_mean")
        log(f"  {run.key}: {written.bits_per_weight:.2f} bpw, prose KLD {kld if kld is None else round(kld, 5)}, "
            f"{result['tokens_evaluated']} tokens in {result['seconds']:.0f} s")
        done.append(run.key)
    base.close()
    return {"done": done, "skipped": skipped, "out_dir": os.fspath(out), "work_dir": os.fspath(work)}
