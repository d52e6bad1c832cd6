"""Reader for lm-evaluation-harness v0.4 results JSON (`lm_eval ... --output_path`).

Layout read here:

    {"results":  {"gsm8k": {"alias": "gsm8k",
                            "exact_match,strict-match": 0.75, "exact_match_stderr,strict-match": 0.012,
                            "exact_match,flexible-extract": 0.77, ...}, ...},
     "group_subtasks": {"mmlu": ["mmlu_humanities", ...], ...},   # children are skipped
     "configs":  {"gsm8k": {"num_fewshot": 5, ...}},
     "versions": {"gsm8k": 3.0}, "n-shot": {"gsm8k": 5},
     "higher_is_better": {"gsm8k": {"exact_match": true}},
     "lm_eval_version": "0.4.8", "date": 1712345678.0, "model_name": "...", "config": {"model_args": ...}}

Metric keys are "<metric>,<filter>"; the standard error is the sibling "<metric>_stderr,<filter>"
(a number or "N/A").
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from predictor.data.rows import sha256_file
from predictor.data.store import read_capped_bytes
from predictor.errors import InputFileError

MAX_RESULTS_BYTES = 64 * 1024 * 1024  # results files are KBs; per-sample logs are separate files
FIX = "pass the results_*.json that `lm_eval --output_path` writes (lm-evaluation-harness v0.4)"


@dataclass(frozen=True)
class LmEvalScore:
    task_id: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    n_shot: int | None
    higher_is_better: bool | None
    version: str | None


@dataclass(frozen=True)
class LmEvalRun:
    path: Path
    sha256: str
    scores: tuple[LmEvalScore, ...]
    model_name: str | None
    lm_eval_version: str | None
    date: str | None


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _children(data: dict) -> set[str]:
    """Tasks that belong to a group: the group's aggregate row stands for them."""
    out: set[str] = set()
    gs = data.get("group_subtasks")
    if isinstance(gs, dict):
        for kids in gs.values():
            if isinstance(kids, list):
                out.update(k for k in kids if isinstance(k, str))
        return out
    # Early 0.4 releases have "groups" but no "group_subtasks": subtasks are named <group>_<name>.
    groups = data.get("groups") if isinstance(data.get("groups"), dict) else {}
    results = data.get("results") if isinstance(data.get("results"), dict) else {}
    for task in results:
        if any(task != g and task.startswith(f"{g}_") for g in groups):
            out.add(task)
    return out


def _n_shot(data: dict, task: str) -> int | None:
    ns = data.get("n-shot")
    if isinstance(ns, dict) and isinstance(ns.get(task), int) and not isinstance(ns.get(task), bool):
        return ns[task]
    cfg = data.get("configs", {}).get(task) if isinstance(data.get("configs"), dict) else None
    if isinstance(cfg, dict) and isinstance(cfg.get("num_fewshot"), int) and not isinstance(cfg.get("num_fewshot"), bool):
        return cfg["num_fewshot"]
    return None


def _model_name(data: dict) -> str | None:
    if isinstance(data.get("model_name"), str) and data["model_name"].strip():
        return data["model_name"].strip()
    cfg = data.get("config")
    args = cfg.get("model_args") if isinstance(cfg, dict) else None
    if isinstance(args, str):
        m = re.search(r"(?:pretrained|model)=([^,]+)", args)
        if m:
            return m.group(1).strip()
    return None


def read_lm_eval_results(path: str | os.PathLike) -> LmEvalRun:
    """Parse one results JSON. Malformed input raises InputFileError (one line: file, problem, fix)."""
    path = Path(path)
    raw = read_capped_bytes(path, MAX_RESULTS_BYTES, "an lm-eval results file", FIX)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(path, "is not UTF-8 text", FIX) from None
    except json.JSONDecodeError as exc:
        raise InputFileError(path, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", FIX) from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise InputFileError(path, "has no 'results' object — not an lm-evaluation-harness results file", FIX)
    if not data["results"]:
        raise InputFileError(path, "'results' is empty — the run produced no scores", FIX)
    skip = _children(data)
    hib_all = data.get("higher_is_better") if isinstance(data.get("higher_is_better"), dict) else {}
    versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    scores: list[LmEvalScore] = []
    for task, entry in data["results"].items():
        if not isinstance(entry, dict):
            raise InputFileError(path, f"results[{task!r}] is not an object", FIX)
        if task in skip:
            continue
        keyed = [k for k in entry if "," in k]
        numeric_plain = [k for k in entry if "," not in k and _number(entry[k]) is not None]
        if not keyed and numeric_plain:
            raise InputFileError(path, f"results[{task!r}] has metric keys without ',<filter>' — this is the "
                                 "lm-eval v0.3 layout", "re-run with lm-evaluation-harness v0.4 or later")
        hib = hib_all.get(task) if isinstance(hib_all.get(task), dict) else {}
        for key in keyed:
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            value = entry[key]
            if value is None or value == "N/A":
                continue
            num = _number(value)
            if num is None:
                raise InputFileError(path, f"results[{task!r}][{key!r}] = {value!r} is not a finite number", FIX)
            stderr = _number(entry.get(f"{metric}_stderr,{filt}"))
            h = hib.get(metric)
            version = versions.get(task)
            scores.append(LmEvalScore(task, metric, filt, num, stderr, _n_shot(data, task),
                                      h if isinstance(h, bool) else None,
                                      None if version is None else str(version)))
    if not scores:
        raise InputFileError(path, "contains no numeric '<metric>,<filter>' scores", FIX)
    date = data.get("date")
    date_text = None
    if _number(date) is not None:
        import datetime as _dt

        try:
            date_text = _dt.datetime.fromtimestamp(float(date), _dt.timezone.utc).date().isoformat()
        except (OverflowError, OSError, ValueError):
            date_text = None
    version = data.get("lm_eval_version") if isinstance(data.get("lm_eval_version"), str) else None
    return LmEvalRun(path, sha256_file(path), tuple(scores), _model_name(data), version, date_text)
