"""Build the curated training_data/ tables from the raw published CSVs.

    python -m predictor.data.curate                # rebuild training_data/ in place
    python -m predictor.data.curate --out /tmp/td  # somewhere else

Curating means: map every model name to a registry id, normalise quant, task and metric names,
convert fractions to percent, compute the relative drop, flag rows that are second-hand or unreliable
as targets, de-duplicate, move distortion metrics (PPL, KLD, ...) into their own table, and record
every raw row that was left out, with the reason, in excluded.csv. Rows added later by
`quantpredict ingest` (origin = ingested) are kept across rebuilds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from predictor.data.quant_names import (
    IMATRIX_REQUIRED,
    QuantInfo,
    integer_name,
    parse_quant_name,
    preset_info,
)
from predictor.data.registry import alias_map, registry_row
from predictor.data.rows import (
    DISTORTION_ID_FIELDS,
    MEASUREMENT_ID_FIELDS,
    add_note,
    add_reason,
    flag_format_failures,
    flag_near_chance,
    frame,
    relative_drop,
    row_id,
    sha256_file,
)
from predictor.data.store import empty_table, read_table, validate_frame, write_tables_atomic
from predictor.data.tasks import task_by_name
from predictor.errors import SchemaError
from predictor.schema import render_schema_markdown

# Date the raw published CSVs were copied into training_data/raw/published (their ingested_at).
PUBLISHED_SNAPSHOT_DATE = "2026-11-28"
RAW_MEASUREMENTS = "measurements.csv"
RAW_DISTORTION = "kld_ppl.csv"
# Later additions: a sub-folder of the raw folder with its own richer format and copy date.
ADDITIONS_DIR = "additions-2026-12"
ADDITIONS_SNAPSHOT_DATE = "2026-12-04"
ADDITIONS_MEASUREMENTS = f"{ADDITIONS_DIR}/measurements.csv"
ADDITIONS_DISTORTION = f"{ADDITIONS_DIR}/distortion.csv"
# llama.cpp presets a source may use as its reference instead of a 16-bit model. Such rows are real
# preset-vs-preset differences: kept (not flagged for this reason), baseline_precision = the preset.
QUANT_REFERENCES = ("Q8_0", "Q5_K_M")


def reference_note(precision: str) -> str:
    return (f"baseline is the source's {precision} run, not a 16-bit model: the drop is {precision} -> quant, "
            f"a difference between two llama.cpp presets (use as a pair with the {precision} drop)")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Quant labels as published -> QuantInfo. Ordered rules; the first match wins.


def _rule_autoround_acc(m: re.Match, method: str) -> QuantInfo:
    # intel/auto-round acc.md: W4G128_GPTQ, W4G-1_RTN, W2G128_AutoRound, W3G128_GPTQ*
    bits, group, algo = float(m.group(1)), int(m.group(2)), m.group(3)
    table = {"RTN": ("rtn", "rtn", "RTN"), "GPTQ": ("gptq", "gptq", "GPTQ"), "GPTQ*": ("gptq", "gptq", "GPTQ"),
             "AWQ": ("awq", "awq", "AWQ"), "AUTOROUND": ("autoround", "autoround", "AUTOROUND"),
             "HQQ": ("hqq", "hqq", "HQQ"), "OMNIQUANT": ("omniquant", "omniquant", "OMNIQUANT")}
    fam, meth, prefix = table[algo.upper()]
    note = "source row 'GPTQ*' (a second GPTQ configuration in the source table)" if algo.endswith("*") else None
    return QuantInfo(integer_name(prefix, bits, group), fam, meth, bits, group, note)


def _rule_wa16(m: re.Match, method: str) -> QuantInfo:
    # Qwen3 paper: 'W4A16 g128 AWQ', 'W1.06A16 g128 Bi-LLM'
    bits, group, algo = float(m.group(1)), int(m.group(2)), m.group(3)
    if algo == "Bi-LLM":
        return QuantInfo(integer_name("BILLM", bits, group), "binarization", "bi-llm", bits, group)
    fam = algo.lower()
    return QuantInfo(integer_name(algo.upper(), bits, group), fam, fam, bits, group)


def _rule_plain_g(m: re.Match, method: str) -> QuantInfo:
    # qllm-eval 'W4_g128' (RTN, asym) and junsu 'W4g128' (method from the raw method column)
    bits, group = float(m.group(1)), int(m.group(2))
    fam = {"rtn": "rtn", "gptq": "gptq", "awq": "awq"}[method]
    return QuantInfo(integer_name(fam.upper(), bits, group), fam, fam, bits, group,
                     "asymmetric RTN (qllm-eval default)" if fam == "rtn" else None)


def _rule_perchannel(m: re.Match, method: str) -> QuantInfo:
    bits = float(m.group(1))
    return QuantInfo(integer_name("RTN", bits, -1), "rtn", "rtn", bits, -1,
                     f"symmetric absmax per output channel; the repository labels it {m.group(2)} but it is not llama.cpp's block format")


def _rule_opt_rtn(m: re.Match, method: str) -> QuantInfo:
    # auto-round opt_rtn.md: 'W2A16G64 RTN (...)', 'W4A16 OPT (...)' (default group 128)
    bits = float(m.group(1))
    group = int(m.group(2)) if m.group(2) else 128
    if m.group(3) == "OPT":
        return QuantInfo(integer_name("AUTOROUND-RTN", bits, group), "autoround", "autoround-rtn", bits, group,
                         "AutoRound optimised RTN (iters=0)")
    return QuantInfo(integer_name("RTN", bits, group), "rtn", "rtn", bits, group, "auto-round's plain RTN (iters=0)")


def _rule_fp4(m: re.Match, method: str) -> QuantInfo:
    fmt, label = m.group(1).upper(), m.group(2)
    group = 32 if fmt == "MXFP4" else 16  # OCP MX block of 32; NVFP4 block of 16
    meth = "autoround-rtn" if label.startswith("OPT") else "rtn"
    return QuantInfo(fmt, "fp4", meth, 4.0, group, f"source row '{label}'")


def _rule_gguf_autoround(m: re.Match, method: str) -> QuantInfo:
    base = preset_info(m.group(1))
    meth = "autoround-alg-ext" if m.group(2) else "autoround"
    return QuantInfo(base.quant, base.quant_family, meth, base.weight_bits, None,
                     "AutoRound-tuned weights in the GGUF format" + (" (+alg_ext)" if m.group(2) else ""))


def autoround_rtn_gguf(quant: QuantInfo) -> QuantInfo:
    """A llama.cpp preset layout whose weights auto-round's own RTN chose (iters 0), not llama-quantize."""
    return QuantInfo(quant.quant, quant.quant_family, "autoround-rtn", quant.weight_bits, None,
                     "AutoRound optimised RTN (iters 0) in the GGUF k-quant format, no imatrix")


def _rule_autoscheme(m: re.Match, method: str) -> QuantInfo:
    # intel/auto-round auto_scheme_acc.md: 'AutoScheme 2.5b mixed[q2,q3,q4] lm_head Q6K', '... iters 200'
    bpw, types, lm_head, iters = m.group(1), m.group(2), m.group(3), m.group(4)
    name = f"AUTOSCHEME-{'+'.join(t.upper() for t in types.split(','))}-{float(bpw):g}bpw"
    note = f"AutoRound AutoScheme per-layer mix of {types.replace(',', '/')} GGUF types at {float(bpw):g} bits average"
    if lm_head:
        name += "-lmhead_Q6_K"
        note += ", lm_head in Q6_K"
    if iters:
        name += f"-iters{iters}"
        return QuantInfo(name, "gguf-mixed", "autoround", None, None, note + f", tuned ({iters} iterations)")
    return QuantInfo(name, "gguf-mixed", "autoround-rtn", None, None, note + ", RTN (iters 0)")


def _fixed(info: QuantInfo) -> Callable[[re.Match, str], QuantInfo]:
    return lambda m, method: info


_RULES: list[tuple[re.Pattern, Callable[[re.Match, str], QuantInfo]]] = [
    (re.compile(r"^W(\d)G(-?\d+)_(RTN|GPTQ\*?|AWQ|AutoRound|HQQ|Omniquant)$"), _rule_autoround_acc),
    (re.compile(r"^W(\d(?:\.\d+)?)A16 g(\d+) (AWQ|GPTQ|Bi-LLM)$"), _rule_wa16),
    (re.compile(r"^W(\d)_?g(\d+)$"), _rule_plain_g),
    (re.compile(r"^W(\d) per-channel sym RTN \(repo label (Q\d_0)\)$"), _rule_perchannel),
    (re.compile(r"^W(\d)A16(?:G(\d+))? (RTN|OPT) \(auto-round iters=0"), _rule_opt_rtn),
    (re.compile(r"^(MXFP4|NVFP4) (RTN|OPT-RTN\(-1,1\)|orig-RTN) \("), _rule_fp4),
    (re.compile(r"^(Q\d_K_[SML])_AutoRound(\+alg_ext)?$"), _rule_gguf_autoround),
    (re.compile(r"^GPTQ-Int(\d)$"), lambda m, _: QuantInfo(integer_name("GPTQ", float(m.group(1)), 128), "gptq", "gptq",
                                                          float(m.group(1)), 128, "official Qwen GPTQ checkpoint")),
    (re.compile(r"^AWQ \(4-bit, g128\)$"), _fixed(QuantInfo("AWQ-W4-g128", "awq", "awq", 4.0, 128, "official Qwen AWQ checkpoint"))),
    (re.compile(r"^GPTQ W4A16 g128 \(llm-compressor"), _fixed(QuantInfo("GPTQ-W4-g128", "gptq", "gptq", 4.0, 128,
                                                                        "llm-compressor, SFT-style calibration"))),
    (re.compile(r"^W4A16-INT \(GPTQ g128\)$"), _fixed(QuantInfo("GPTQ-W4-g128", "gptq", "gptq", 4.0, 128))),
    (re.compile(r"^W4A16-INT \(GPTQ\)$|^4-bit GPTQ$"), _fixed(QuantInfo("GPTQ-W4", "gptq", "gptq", 4.0, None, "group size not stated"))),
    (re.compile(r"^INT4 AutoRound \(W4A16, LM-head not quantized\)$"),
     _fixed(QuantInfo("AUTOROUND-W4", "autoround", "autoround", 4.0, None, "LM head not quantized; group size not stated"))),
    (re.compile(r"^DQ3_K_M \(UnicomAI dynamic 3-bit\)$"),
     _fixed(QuantInfo("DQ3_K_M", "gguf-mixed", "unicom-dynamic", 3.0, None, "UnicomAI dynamic 3-bit GGUF mix"))),
    (re.compile(r"^UD-Q2_K_XL \(Unsloth dynamic\)$"),
     _fixed(QuantInfo("UD-Q2_K_XL", "gguf-mixed", "unsloth-dynamic", 2.0, None, "Unsloth dynamic GGUF mix"))),
    (re.compile(r"^AutoScheme (\d(?:\.\d+)?) ?(?:b|bits) mixed\[([q0-9,]+)\]( lm_head Q6K)?(?: (?:tuning )?iters (\d+))?$"),
     _rule_autoscheme),
    (re.compile(r"^UD-(I?Q(\d)[A-Z0-9_]*)$"), lambda m, _: QuantInfo(m.group(0), "gguf-mixed", "unsloth-dynamic", float(m.group(2)),
                                                                    None, "Unsloth dynamic GGUF mix")),
    (re.compile(r"^Q2_K_L$"), _fixed(QuantInfo("Q2_K_L", "gguf-mixed", "llama.cpp", 2.0, None,
                                               "community variant of Q2_K with 8-bit token embedding / output tensors"))),
    (re.compile(r"^mixed Q2_K_S/Q4_K_S avg 3\.5 bpw \(AutoScheme"),
     _fixed(QuantInfo("AUTOSCHEME-Q2_K_S+Q4_K_S-3.5bpw", "gguf-mixed", "autoround-rtn", None, None,
                      "AutoRound AutoScheme per-layer mix of Q2_K_S and Q4_K_S, RTN (iters 0)"))),
    (re.compile(r"^IQ2_XXS \(2\.0625 bpw type; ~100 GB file\)$"),
     _fixed(QuantInfo("IQ2_XXS", "gguf-i", "llama.cpp", 2.0, None, "~100 GB file"))),
    (re.compile(r"^IQ4_XS \(imatrix, (?:--leave-output-tensor|output tensor kept)\)$"),
     _fixed(QuantInfo("IQ4_XS", "gguf-i", "llama.cpp", 4.0, None, "output tensor left unquantized (--leave-output-tensor)"))),
    (re.compile(r"^Q4_K_M \(no imatrix, output tensor kept\)$"),
     _fixed(QuantInfo("Q4_K_M", "gguf-k", "llama.cpp", 4.0, None, "output tensor left unquantized (--leave-output-tensor)"))),
    (re.compile(r"^IQ2_KS \(ik_llama\.cpp\)$"), _fixed(QuantInfo("IQ2_KS", "gguf-ik", "ik_llama.cpp", 2.0, None))),
    (re.compile(r"^exl2_(\d+(?:\.\d+)?)bpw$"), lambda m, _: QuantInfo(f"EXL2-{float(m.group(1)):g}bpw", "exl2", "exllamav2",
                                                                       float(m.group(1)), None)),
    (re.compile(r"^bnb_(nf4|fp4|int8)$"), lambda m, _: QuantInfo(f"BNB-{m.group(1).upper()}", "bnb", "bitsandbytes",
                                                                 8.0 if m.group(1) == "int8" else 4.0, None)),
    (re.compile(r"^mlx-lm 4bit \(affine"), _fixed(QuantInfo("MLX-W4", "mlx", "mlx-affine", 4.0, None, "mlx-lm affine 4-bit"))),
    (re.compile(r"^oQ4 \("), _fixed(QuantInfo("OQ4", "mlx", "omlx-oq", 4.0, None, "oMLX imatrix-aware 4-bit (MLX format)"))),
    (re.compile(r"^4bit \(format not stated\)$"), _fixed(QuantInfo("UNKNOWN-W4", "other", "unknown", 4.0, None, "format not stated"))),
]


def published_quant(raw: str, raw_method: str = "") -> QuantInfo:
    """Normalise a quant label as written in the published CSVs. Unknown labels are an error, so a new
    raw row cannot slip into the curated data with an unnormalised name."""
    raw = raw.strip()
    for pattern, build in _RULES:
        m = pattern.match(raw)
        if m:
            return build(m, raw_method)
    info = preset_info(raw)
    if info is not None:
        return info
    try:
        return parse_quant_name(raw)
    except Exception:
        raise SchemaError(f"published quant label {raw!r} has no normalisation rule — add one to predictor/data/curate.py") from None


# ---------------------------------------------------------------------------------------------
# Metrics as published -> (metric, filter, score unit, note)


def _measurement_metric(raw_metric: str, task_raw: str, category: str) -> tuple[str, str | None, str, str | None]:
    m = raw_metric.strip()
    t = task_raw.lower()
    if m.startswith("recovery_pct"):
        return "recovery_pct", None, "recovery_pct", None
    if m == "gpt4_score_1to10":
        return "llm_judge_1to10:gpt-4", None, "judge_1to10", None
    jm = re.match(r"LLM-judge score 1-10 \(judge (.+)\)$", m)
    if jm:
        return f"llm_judge_1to10:{jm.group(1)}", None, "judge_1to10", None
    if "ifeval" in t:
        if "inst" in t:
            return "inst_level_strict_acc", None, "percent", None
        if "prompt" in t or m == "strict prompt-level acc":
            return "prompt_level_strict_acc", None, "percent", None
        if m == "avg strict/loose as reported":
            return "avg_strict_loose_acc", None, "percent", None
        return "score", None, "percent", "score as quoted, metric variant not stated"
    if "gsm8k" in t:
        filt = "strict-match" if "strict" in t else None
        return "exact_match", filt, "percent", None
    if category == "code":
        return "pass@1", None, "percent", None
    if m == "acc (micro-avg)":
        return "acc", None, "percent", "micro-average over MMLU questions"
    return "acc", None, "percent", None


_DIST_METRICS = {
    "PPL": "ppl", "PPL (seq 2048)": "ppl", "dPPL": "delta_ppl", "KLD_mean": "kld_mean",
    "KLD_mean (approx, as stated)": "kld_mean", "KLD_median": "kld_median", "KLD_q99": "kld_p99",
    "mean_dp_pct": "mean_dp_pct", "RMS_dp_pct": "rms_dp_pct", "same_top_p_pct": "same_top_p_pct",
    "top_token_differ_frac": "same_top_p_pct", "ln_PPL_ratio": "ln_ppl_ratio",
}


# ---------------------------------------------------------------------------------------------


@dataclass
class Curated:
    measurements: pl.DataFrame
    distortion: pl.DataFrame
    excluded: pl.DataFrame
    n_format_flags: int = 0
    notes: list[str] = field(default_factory=list)


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    t = text.strip().lstrip("~")
    if not t:
        return None
    try:
        return float(t)
    except ValueError:
        return None


def _read_raw(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class _Excluder:
    def __init__(self, raw_table: str, quant_key: str = "quant"):
        self.raw_table = raw_table
        self.quant_key = quant_key  # raw column holding the quant label as published
        self.rows: list[dict[str, Any]] = []

    def add(self, i: int, raw: dict[str, str], what: str, code: str, reason: str) -> None:
        self.rows.append({
            "raw_table": self.raw_table, "source_row": i, "model_as_published": raw.get("model"),
            "quant_as_published": raw.get(self.quant_key), "what": what, "reason_code": code, "reason": reason,
            "source": raw.get("source"), "raw_json": json.dumps(raw, ensure_ascii=False, sort_keys=True),
        })


def _imatrix(raw: str, quant: QuantInfo) -> tuple[str, str | None]:
    """'yes (WT 10m wikitext tokens)' -> ('yes', 'WT 10m wikitext tokens'); llama.cpp presets that cannot
    be made without an imatrix become 'yes' when the source leaves it open."""
    raw = (raw or "").strip()
    value, note = raw, None
    m = re.match(r"^(yes|no|unknown)\s*\((.*)\)$", raw)
    if m:
        value, note = m.group(1), m.group(2)
    if note is not None and note.startswith("likely"):
        value, note = "unknown", f"source says yes ({note})"
    if value not in ("yes", "no", "unknown"):
        raise SchemaError(f"raw imatrix value {raw!r} not understood — extend predictor/data/curate.py _imatrix")
    if value == "unknown" and quant.method == "llama.cpp" and quant.quant in IMATRIX_REQUIRED:
        value = "yes"
        note = "; ".join(x for x in (note, "llama-quantize refuses this type without an imatrix") if x)
    return value, note


def _baseline_precision(where: str, source: str) -> str:
    w = f"{where} {source}"
    if "FP8" in w:
        return "fp8"
    if "BF16" in w:
        return "bf16"
    if re.search(r"\bf(p)?16\b", w, re.I):
        return "fp16"
    return "16-bit (unspecified)"


def _model_fields(model: str | None, registry: pl.DataFrame) -> dict[str, Any]:
    row = registry_row(model, registry) if model else None
    if row is None:
        return {"family": None, "params_b": None, "train_tokens_t": None}
    return {"family": row["family"], "params_b": row["n_params_b"], "train_tokens_t": row["train_tokens_t"]}


def curate_measurements(raw_path: Path, registry: pl.DataFrame, source_file: str) -> tuple[list[dict], _Excluder]:
    aliases = alias_map(registry)
    sha = sha256_file(raw_path)
    raws = _read_raw(raw_path)
    ex = _Excluder(RAW_MEASUREMENTS)

    # Scores given as fractions (every value of a source/metric <= 1) are converted to percent.
    groups: dict[tuple[str, str], float] = {}
    for r in raws:
        vals = [v for v in (_num(r["baseline_score"]), _num(r["quant_score"])) if v is not None]
        k = (r["source"], r["metric"])
        groups[k] = max([groups.get(k, 0.0), *vals])
    fraction_groups = {k for k, v in groups.items() if v <= 1.0}

    # Quantized references named by the source itself (no 16-bit score given).
    reference_quants = {
        ("Meta-Llama-3-70B-Instruct", "MMLU"): "Q5_K_M",  # matt-c1: 'use Q5_K_M as reference'
        ("Codestral-22B-v0.1", "HumanEval"): "Q8_0",  # human3090: 'only reference is Q8_0'
    }
    reference_scores = {}
    for r in raws:
        ref = reference_quants.get((r["model"], r["task"]))
        if ref and r["quant"] == ref:
            reference_scores[(r["model"], r["task"])] = _num(r["quant_score"])

    rows: list[dict] = []
    for i, raw in enumerate(raws, start=1):
        what = f"{raw['task']} / {raw['metric']}"
        src, where = raw["source"], raw["where"]
        if raw["model"].startswith("Llama-3.1 family"):
            ex.add(i, raw, what, "aggregate_model", "score aggregated over 8B/70B/405B: no single model whose "
                   "weights the features could describe (second-hand, relative only)")
            continue
        model = aliases.get(raw["model"].strip().casefold())
        if model is None:
            raise SchemaError(f"{raw_path} row {i}: model {raw['model']!r} is not in training_data/registry.csv — add it or an alias")
        task = task_by_name(raw["task"])
        if task is None:
            raise SchemaError(f"{raw_path} row {i}: task {raw['task']!r} is unknown — add it to predictor/data/tasks.py")
        if task.name == "avg6 commonsense":
            ex.add(i, raw, what, "aggregate_of_kept_rows", "mean of the six commonsense tasks whose per-task rows "
                   "from the same table are kept")
            continue
        if raw["metric"] == "acc (macro-avg)":
            ex.add(i, raw, what, "alternative_aggregate", "same run also reported as a micro-average (question-"
                   "weighted, lm-eval's MMLU group default); the micro-average row is kept")
            continue
        quant = published_quant(raw["quant"], raw["method"])
        if "row 'Optimized RTN'" in where:  # auto-round's own RTN into the GGUF k-quant layout, not llama-quantize
            quant = autoround_rtn_gguf(quant)
        metric, filt, unit, metric_note = _measurement_metric(raw["metric"], raw["task"], task.category)
        base, qs = _num(raw["baseline_score"]), _num(raw["quant_score"])
        if (src, raw["metric"]) in fraction_groups and unit == "percent":
            base = None if base is None else round(base * 100.0, 6)
            qs = None if qs is None else round(qs * 100.0, 6)
        precision = _baseline_precision(f"{where} {raw['metric']}", src)
        ref = reference_quants.get((raw["model"], raw["task"]))
        if base is None and ref:
            if quant.quant == ref:
                ex.add(i, raw, what, "reference_row", f"this row is the source's reference ({ref}); its drop "
                       "against itself is zero by construction")
                continue
            base, precision = reference_scores[(raw["model"], raw["task"])], ref
        if unit == "recovery_pct":
            drop, base, qs = 100.0 - qs, None, None
        elif base is None:
            ex.add(i, raw, what, "no_baseline", "the source gives no unquantized score for this model and task, "
                   "so no relative drop can be computed (source: " + (where[:120] if where else "n/a") + ")")
            continue
        else:
            drop = relative_drop(base, qs, True)
        imatrix, imatrix_note = _imatrix(raw["imatrix"], quant)
        n_shot = int(raw["n_shot"]) if raw["n_shot"].strip() else (5 if "5-shot" in raw["task"] else None)
        row: dict[str, Any] = {
            "origin": "published", "model": model, "model_as_published": raw["model"],
            **_model_fields(model, registry),
            "quant": quant.quant, "quant_as_published": raw["quant"], "quant_family": quant.quant_family,
            "method": quant.method, "weight_bits": quant.weight_bits, "group_size": quant.group_size,
            "bits_per_weight": _num(raw["bits_per_weight"]), "imatrix": imatrix, "imatrix_note": imatrix_note,
            "task": task.name, "task_category": task.category, "metric": metric, "metric_filter": filt,
            "n_shot": n_shot, "higher_is_better": True, "score_unit": unit,
            "baseline_score": base, "quant_score": qs, "baseline_stderr": None, "quant_stderr": None,
            "baseline_precision": precision, "relative_drop_pct": drop,
            "secondhand": "secondhand" in src.lower(), "unreliable": False, "unreliable_reason": None, "note": None,
            "source": src, "source_location": where, "source_file": source_file, "source_sha256": sha,
            "source_row": i, "ingested_at": PUBLISHED_SNAPSHOT_DATE,
        }
        add_note(row, quant.note)
        add_note(row, metric_note)
        if raw["metric"] not in ("acc", metric):
            add_note(row, f"metric as published: {raw['metric']}")
        if raw["task"] != task.name:
            add_note(row, f"task as published: {raw['task']}")
        if raw["task_category"] != task.category:
            add_note(row, f"category as published: {raw['task_category']}")
        if "repeating layers only" in where:
            add_note(row, "bits_per_weight counts repeating layers only")
        if precision in QUANT_REFERENCES:
            add_note(row, reference_note(precision))
        if row["secondhand"]:
            add_reason(row, "second-hand number (quoted by a notes file, original table not read)")
        if "NOT weight-only" in where:
            add_reason(row, "activations likely also quantized (not weight-only)")
        if "demo data" in where:
            add_reason(row, "values from a plot-script demo file (source: treat with caution)")
        if "different serving stack" in where:
            add_reason(row, "baseline ran on a different serving stack (FP8 API) than the quantized runs")
        if "harness parity not guaranteed" in where:
            add_reason(row, "baseline and quant were evaluated with different runtimes")
        flag_near_chance(row, task.chance_pct)
        row["row_id"] = row_id(row, MEASUREMENT_ID_FIELDS)
        rows.append(row)
    return rows, ex


def dedupe(rows: list[dict], ex: _Excluder, raws_by_row: dict[int, dict], fields: tuple[str, ...], what: Callable[[dict], str]) -> list[dict]:
    """Keep the first of rows that repeat the same measurement (same identity and values)."""
    seen: dict[tuple, int] = {}
    kept = []
    for r in rows:
        key = tuple(r.get(f) for f in fields)
        if key in seen:
            ex.add(r["source_row"], raws_by_row[r["source_row"]], what(r), "duplicate",
                   f"same measurement as raw row {seen[key]} (identical model, quant, task/metric and values)")
            continue
        seen[key] = r["source_row"]
        kept.append(r)
    return kept


MEASUREMENT_DUP_FIELDS = ("model", "quant", "method", "imatrix", "task", "metric", "metric_filter", "n_shot",
                          "baseline_score", "quant_score")
DISTORTION_DUP_FIELDS = ("model", "quant", "method", "imatrix", "imatrix_note", "metric", "dataset", "context_length",
                         "value", "baseline")


def curate_distortion(raw_path: Path, registry: pl.DataFrame, source_file: str) -> tuple[list[dict], _Excluder]:
    aliases = alias_map(registry)
    sha = sha256_file(raw_path)
    raws = _read_raw(raw_path)
    ex = _Excluder(RAW_DISTORTION)

    # Values needed across rows: dPPL (to derive a missing PPL baseline) and stated bits per weight.
    def key(r):
        return (r["model"], r["quant"], r["imatrix"], r["source"])

    dppl = {key(r): _num(r["value"]) for r in raws if r["metric"] == "dPPL"}
    bpw = {key(r): _num(r["value"]) for r in raws if r["metric"] == "bits_per_weight"}
    last_dataset: dict[str, str] = {}

    rows: list[dict] = []
    for i, raw in enumerate(raws, start=1):
        src, where, metric_raw = raw["source"], raw["where"], raw["metric"]
        what = f"{metric_raw} / {raw['dataset']}"
        dataset = raw["dataset"].strip()
        if dataset == "same":
            dataset = last_dataset.get(src, dataset)
        else:
            last_dataset[src] = dataset
        if metric_raw == "bits_per_weight":
            ex.add(i, raw, what, "folded_into_column", "bits per weight is a property of the quant, not a distortion "
                   "metric: its value is stored in bits_per_weight of the other rows of this model and quant")
            continue
        model = aliases.get(raw["model"].strip().casefold())
        if model is None:
            raise SchemaError(f"{raw_path} row {i}: model {raw['model']!r} is not in training_data/registry.csv — add it or an alias")
        quant = published_quant(raw["quant"])
        metric = _DIST_METRICS.get(metric_raw)
        if metric is None:
            raise SchemaError(f"{raw_path} row {i}: metric {metric_raw!r} has no mapping — extend _DIST_METRICS")
        imatrix, imatrix_note = _imatrix(raw["imatrix"], quant)
        value = _num(raw["value"])
        approximate = raw["value"].strip().startswith("~")
        row: dict[str, Any] = {
            "origin": "published", "model": model, "model_as_published": raw["model"],
            "family": _model_fields(model, registry)["family"],
            "quant": quant.quant, "quant_as_published": raw["quant"], "quant_family": quant.quant_family,
            "method": quant.method, "weight_bits": quant.weight_bits, "group_size": quant.group_size,
            "bits_per_weight": bpw.get(key(raw)), "imatrix": imatrix, "imatrix_note": imatrix_note,
            "metric": metric, "value": value, "value_stderr": None, "baseline": None, "baseline_stderr": None,
            "baseline_precision": None, "relative_change_pct": None, "dataset": dataset,
            "context_length": None, "approximate": approximate,
            "secondhand": "secondhand" in src.lower(), "unreliable": False, "unreliable_reason": None, "note": None,
            "source": src, "source_location": where, "source_file": source_file, "source_sha256": sha,
            "source_row": i, "ingested_at": PUBLISHED_SNAPSHOT_DATE,
        }
        add_note(row, quant.note)
        if metric_raw != metric:
            add_note(row, f"metric as published: {metric_raw}")
        if metric_raw == "top_token_differ_frac":
            row["value"] = round((1.0 - value) * 100.0, 6)
            add_note(row, f"converted from the fraction of tokens whose top token differs ({value:g})")
        m = re.search(r"\bbpw (\d+(?:\.\d+)?)", where)
        if row["bits_per_weight"] is None and m:
            row["bits_per_weight"] = float(m.group(1))
        m = re.search(r"ctx (\d+)", dataset) or re.search(r"seq (\d+)", metric_raw)
        if m:
            row["context_length"] = int(m.group(1))
        if metric == "ppl":
            base_text = raw["baseline"].strip()
            base = _num(base_text.split(" (")[0]) if base_text else None
            precision = _baseline_precision(f"{where} {base_text}", src)
            if "q8_0 reference" in base_text:
                precision = "Q8_0"
            elif base is None and key(raw) in dppl and value is not None:
                base = round(value - dppl[key(raw)], 6)
                add_note(row, "baseline derived as PPL - ΔPPL of the same table row")
            elif base is None and (qm := re.search(r"QError\s*(?:=\s*PPL\(Q\)/PPL\(fp16\)-1)?\s*=\s*(\d+(?:\.\d+)?)%", where)):
                base, precision = round(value / (1.0 + float(qm.group(1)) / 100.0), 4), "fp16"
                add_note(row, "baseline derived from the stated QError = PPL(Q)/PPL(fp16) - 1 (rounded to 0.01%)")
            elif base is None:
                precision = None
            row["baseline"], row["baseline_precision"] = base, precision
            if base is not None and value is not None:
                row["relative_change_pct"] = relative_drop(base, value, higher_is_better=False)
        elif metric.startswith(("kld", "delta_ppl", "ln_ppl", "mean_dp", "rms_dp", "same_top")):
            row["baseline_precision"] = "fp16" if ("FP16" in where or "f16" in where.lower() or "README" in src) else None
        if approximate:
            add_reason(row, "value given only approximately ('~') from a ~500-token evaluation")
        if row["secondhand"]:
            add_reason(row, "second-hand quote; verify against the original discussion")
        if "(v0.1 base presumably)" in raw["model"]:
            add_note(row, "model release presumed by the source")
        row["row_id"] = row_id(row, DISTORTION_ID_FIELDS)
        rows.append(row)
    return rows, ex


# ---------------------------------------------------------------------------------------------
# additions-2026-12: richer raw format (hf_id, quant_as_published, quant_publisher, n, stderrs, flag,
# baseline_precision, note). Same rules as above, reusing the helpers; only the format differs.

_ADDITION_METRICS: dict[str, tuple[str, str | None]] = {  # raw metric -> (metric, lm-eval filter)
    "acc (lm-eval default)": ("acc", None),
    "accuracy (EvalScope)": ("acc", None),
    "accuracy": ("acc", None),
    "rescored accuracy (generation, regex letter extraction)": ("acc", None),
    "truthfulness (free-form answer matched to references by string/keyword match)": ("string_match", None),
    "difficulty-weighted solve score (sum of points of solved problems / 100; points = participants/solved_by)":
        ("weighted_solve_score", None),
    "exact match on final number (last number in output vs number after ####)": ("exact_match", None),
    "exact_match flexible-extract (greedy)": ("exact_match", "flexible-extract"),
    "prompt_level_strict_acc": ("prompt_level_strict_acc", None),
    "pass@1 (temperature 0, n=1)": ("pass@1", None),
    "numeric_match": ("numeric_match", None),
}

# Raw `flag` items ('; '-separated) -> what they mean for the curated row: a curation note, a reason
# to flag the row unreliable, or 'handled' (the rule lives elsewhere: Q8_0 references, missing baselines).
_ADDITION_FLAGS: dict[str, tuple[str, str | None]] = {
    "not a llama.cpp preset: auto-round AutoScheme per-layer mix": ("note", None),
    "publisher mix: Q2_K with larger embedding/output tensors ('_L' variant)": ("note", None),
    "Unsloth Dynamic mix": ("note", None),
    "GGUF made by auto-round, not llama-quantize": ("note", None),
    "baseline is Q8_0 (no 16-bit run)": ("handled", None),
    "baseline_is_Q8_0_not_16bit": ("handled", None),
    "single run": ("note", "single run (noise from the item count only)"),
    "score dominated by rarely solved problems": ("note", None),
    "quant_score_from_stated_diff": ("note", "quant score is the baseline plus the difference stated by the source"),
    "small_n": ("note", "small item count"),
    "floor_effect": ("note", "floor effect: both scores at 0"),
    "non_standard_task": ("note", "non-standard task"),
    "outside_requested_categories": ("note", None),
    "n=50, report calls the trend noise": ("reason", "n=50 free-form answers scored by string match; the source "
                                                    "report itself calls the trend noise"),
    "suspect_baseline": ("reason", "the FP16 baseline may have run through a different serving path or thinking "
                                   "setting than the quantized runs (the source's own caveat)"),
    "ik_llama.cpp-only type (gguf-ik), not in mainline llama.cpp": ("note", None),
    "no f16 PPL in this table (baseline left empty; not derived)": ("handled", None),
    "ffn_down falls back to Q4_0 (columns not a multiple of 256)": ("note", None),
    "IQ2_XXS file effectively 2.77 bpw, IQ2_XS 2.94 bpw": ("note", None),
}


def _apply_addition_flags(row: dict[str, Any], flag: str, where: str) -> None:
    for item in (x.strip() for x in re.split(r";(?![^()]*\))", flag or "")):  # ';' outside parentheses
        if not item:
            continue
        if item not in _ADDITION_FLAGS:
            raise SchemaError(f"{where}: flag {item!r} has no curation rule — extend _ADDITION_FLAGS in predictor/data/curate.py")
        kind, text = _ADDITION_FLAGS[item]
        if kind == "note":
            add_note(row, text or item)
        elif kind == "reason":
            add_reason(row, text)


def _lead_num(text: str | None) -> float | None:
    """'3.9 (as published, approx.)' -> 3.9; '' -> None."""
    m = re.match(r"^\s*~?(\d+(?:\.\d+)?)", text or "")
    return float(m.group(1)) if m else None


def binomial_stderr(score_pct: float, n: int) -> float:
    """Standard error (percent points) of a proportion score_pct/100 measured on n items."""
    p = min(max(score_pct / 100.0, 0.0), 1.0)
    return round(math.sqrt(p * (1.0 - p) / n) * 100.0, 6)


def _addition_precision(text: str, where: str) -> str:
    t = (text or "").strip()
    for q in QUANT_REFERENCES:
        if t.startswith(q):
            return q
    if re.match(r"^BF16\b", t, re.I):
        return "bf16"
    if re.match(r"^FP?16\b", t, re.I):
        return "fp16"
    raise SchemaError(f"{where}: baseline precision {text!r} not understood — extend _addition_precision")


def _addition_model(raw: dict[str, str], aliases: dict[str, str], where: str) -> str:
    for name in (raw["model"], raw.get("hf_id") or ""):
        model = aliases.get(name.strip().casefold()) if name.strip() else None
        if model:
            return model
    raise SchemaError(f"{where}: model {raw['model']!r} is not in training_data/registry.csv — add it or an alias")


def _addition_quant(raw: dict[str, str], where: str) -> QuantInfo:
    label, method = raw["quant"].strip(), raw["method"].strip()
    if method.startswith("autoround-autoscheme"):
        quant = published_quant(label)
        if quant.quant_family != "gguf-mixed" or ("tuning" in method) != (quant.method == "autoround"):
            raise SchemaError(f"{where}: AutoScheme label {label!r} disagrees with method {method!r}")
        return quant
    if method.startswith("autoround-rtn"):
        return autoround_rtn_gguf(published_quant(label))
    if method.startswith(("llama.cpp", "GGUF quant ladder", "ik_llama.cpp")):
        quant = published_quant(label)
        if label.startswith("UD-") and quant.method == "llama.cpp":
            raise SchemaError(f"{where}: Unsloth dynamic label {label!r} fell through to a preset rule")
        return quant
    raise SchemaError(f"{where}: method {method!r} has no curation rule — extend _addition_quant")


def _addition_imatrix(raw: dict[str, str], quant: QuantInfo) -> tuple[str, str | None]:
    value, note = _imatrix(raw["imatrix"], quant)
    own = (raw.get("imatrix_note") or "").strip() or None
    return value, "; ".join(x for x in (own, note) if x) or None


def curate_additions_measurements(raw_path: Path, registry: pl.DataFrame, source_file: str) -> tuple[list[dict], _Excluder]:
    aliases = alias_map(registry)
    sha = sha256_file(raw_path)
    raws = _read_raw(raw_path)
    ex = _Excluder(ADDITIONS_MEASUREMENTS, quant_key="quant_as_published")
    rows: list[dict] = []
    for i, raw in enumerate(raws, start=1):
        loc = f"{raw_path} row {i}"
        what = f"{raw['task']} / {raw['metric']}"
        src, where = raw["source"], raw["where"]
        model = _addition_model(raw, aliases, loc)
        task = task_by_name(raw["task"])
        if task is None:
            raise SchemaError(f"{loc}: task {raw['task']!r} is unknown — add it to predictor/data/tasks.py")
        if raw["metric"] not in _ADDITION_METRICS:
            raise SchemaError(f"{loc}: metric {raw['metric']!r} has no mapping — extend _ADDITION_METRICS")
        metric, filt = _ADDITION_METRICS[raw["metric"]]
        quant = _addition_quant(raw, loc)
        base, qs = _num(raw["baseline_score"]), _num(raw["quant_score"])
        if base is None or qs is None:
            ex.add(i, raw, what, "no_baseline" if base is None else "no_score",
                   "the row lacks the baseline or the quantized score, so no relative drop can be computed")
            continue
        precision = _addition_precision(raw["baseline_precision"], loc)
        imatrix, imatrix_note = _addition_imatrix(raw, quant)
        row: dict[str, Any] = {
            "origin": "published", "model": model, "model_as_published": raw["model"],
            **_model_fields(model, registry),
            "quant": quant.quant, "quant_as_published": raw["quant_as_published"], "quant_family": quant.quant_family,
            "method": quant.method, "weight_bits": quant.weight_bits, "group_size": quant.group_size,
            "bits_per_weight": _lead_num(raw["bits_per_weight"]), "imatrix": imatrix, "imatrix_note": imatrix_note,
            "task": task.name, "task_category": task.category, "metric": metric, "metric_filter": filt,
            "n_shot": int(raw["n_shot"]) if raw["n_shot"].strip() else None, "higher_is_better": True,
            "score_unit": "percent", "baseline_score": base, "quant_score": qs,
            "baseline_stderr": _num(raw["baseline_stderr"]), "quant_stderr": _num(raw["quant_stderr"]),
            "baseline_precision": precision, "relative_drop_pct": relative_drop(base, qs, True),
            "secondhand": "secondhand" in src.lower(), "unreliable": False, "unreliable_reason": None, "note": None,
            "source": src, "source_location": where, "source_file": source_file, "source_sha256": sha,
            "source_row": i, "ingested_at": ADDITIONS_SNAPSHOT_DATE,
        }
        add_note(row, quant.note)
        if raw["quant_publisher"].strip():
            add_note(row, f"GGUF publisher: {raw['quant_publisher'].strip()}")
        if raw["method"].strip() not in ("llama.cpp", quant.method):
            add_note(row, f"runtime/method as published: {raw['method'].strip()}")
        if raw["score_unit"] != "percent":
            add_note(row, f"score unit as published: {raw['score_unit']}, written x100 (a difficulty-weighted "
                          "score, not a proportion of items)")
        if raw["metric"] != metric:
            add_note(row, f"metric as published: {raw['metric']}")
        if raw["task"] != task.name:
            add_note(row, f"task as published: {raw['task']}")
        if raw["task_category"] != task.category:
            add_note(row, f"category as published: {raw['task_category']}")
        if precision in QUANT_REFERENCES:
            add_note(row, reference_note(precision))
        if raw["baseline_precision"].strip() != precision:
            add_note(row, f"baseline as published: {raw['baseline_precision'].strip()}")
        if raw["bits_per_weight"].strip() and "(" in raw["bits_per_weight"]:
            add_note(row, f"bits per weight as published: {raw['bits_per_weight'].strip()}")
        # Noise: the row's own standard errors; else a binomial one from the row's item count.
        n_items = int(_lead_num(raw["n"])) if _lead_num(raw["n"]) else None
        if n_items and raw["n"].strip() != str(n_items):
            add_note(row, f"n as published: {raw['n'].strip()}")
        imputed = []
        if n_items:
            for side, score in (("baseline", base), ("quant", qs)):
                if row[f"{side}_stderr"] is None:
                    row[f"{side}_stderr"] = binomial_stderr(score, n_items)
                    imputed.append(side)
        if len(imputed) == 2:
            add_note(row, f"stderr imputed as binomial from n={n_items} items")
        elif imputed:
            add_note(row, f"{imputed[0]} stderr imputed as binomial from n={n_items} items (the other as published)")
        if imputed and metric == "weighted_solve_score":
            add_note(row, "the score is difficulty-weighted, so the binomial standard error is an approximation")
        add_note(row, raw["note"].strip() or None)
        _apply_addition_flags(row, raw["flag"], loc)
        flag_near_chance(row, task.chance_pct)
        row["row_id"] = row_id(row, MEASUREMENT_ID_FIELDS)
        rows.append(row)
    return rows, ex


def curate_additions_distortion(raw_path: Path, registry: pl.DataFrame, source_file: str) -> tuple[list[dict], _Excluder]:
    aliases = alias_map(registry)
    sha = sha256_file(raw_path)
    raws = _read_raw(raw_path)
    ex = _Excluder(ADDITIONS_DISTORTION, quant_key="quant_as_published")
    rows: list[dict] = []
    for i, raw in enumerate(raws, start=1):
        loc = f"{raw_path} row {i}"
        src, where, metric_raw = raw["source"], raw["where"], raw["metric"]
        model = _addition_model(raw, aliases, loc)
        quant = _addition_quant(raw, loc)
        imatrix, imatrix_note = _addition_imatrix(raw, quant)
        value = _num(raw["value"])
        precision = _addition_precision(raw["baseline_precision"], loc) if raw["baseline_precision"].strip() else None
        row: dict[str, Any] = {
            "origin": "published", "model": model, "model_as_published": raw["model"],
            "family": _model_fields(model, registry)["family"],
            "quant": quant.quant, "quant_as_published": raw["quant_as_published"], "quant_family": quant.quant_family,
            "method": quant.method, "weight_bits": quant.weight_bits, "group_size": quant.group_size,
            "bits_per_weight": _lead_num(raw["bits_per_weight"]), "imatrix": imatrix, "imatrix_note": imatrix_note,
            "metric": "ppl", "value": value, "value_stderr": _num(raw["value_stderr"]), "baseline": _num(raw["baseline"]),
            "baseline_stderr": None, "baseline_precision": precision, "relative_change_pct": None,
            "dataset": raw["dataset"].strip(), "context_length": int(raw["context"]) if raw["context"].strip().isdigit() else None,
            "approximate": False, "secondhand": "secondhand" in src.lower(), "unreliable": False,
            "unreliable_reason": None, "note": None,
            "source": src, "source_location": where, "source_file": source_file, "source_sha256": sha,
            "source_row": i, "ingested_at": ADDITIONS_SNAPSHOT_DATE,
        }
        add_note(row, quant.note)
        if raw["method"].strip() not in (quant.method,):
            add_note(row, f"runtime/method as published: {raw['method'].strip()}")
        if metric_raw.startswith("qerr_pct"):
            # Only Qerr = PPL(Q)/PPL(f16) - 1 is published: the baseline is derived from it, with both
            # perplexities expressed relative to PPL(f16) = 1 (absolute values are not given).
            qerr = value
            row["value"], row["baseline"] = round(1.0 + qerr / 100.0, 8), 1.0
            add_note(row, f"only Qerr = PPL(Q)/PPL(f16) - 1 = {qerr:g}% is published: value and baseline are "
                          "perplexities normalised to PPL(f16) = 1 (baseline derived from Qerr)")
        elif metric_raw != "PPL":
            raise SchemaError(f"{loc}: metric {metric_raw!r} has no mapping — extend curate_additions_distortion")
        if row["baseline"] is not None and row["value"] is not None:
            row["relative_change_pct"] = relative_drop(row["baseline"], row["value"], higher_is_better=False)
        else:
            row["baseline_precision"] = None
            add_reason(row, "no 16-bit perplexity in the source table: no baseline, so no relative change")
        add_note(row, raw["note"].strip() or None)
        _apply_addition_flags(row, raw["flag"], loc)
        row["row_id"] = row_id(row, DISTORTION_ID_FIELDS)
        rows.append(row)
    return rows, ex


def curate_published(raw_dir: Path, registry: pl.DataFrame) -> Curated:
    raw_dir = Path(raw_dir)
    root = repo_root()

    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return p.name

    mpath, dpath = raw_dir / RAW_MEASUREMENTS, raw_dir / RAW_DISTORTION
    mrows, mex = curate_measurements(mpath, registry, rel(mpath))
    n_flags = flag_format_failures(mrows)
    mraw = {i: r for i, r in enumerate(_read_raw(mpath), start=1)}
    mrows = dedupe(mrows, mex, mraw, MEASUREMENT_DUP_FIELDS, lambda r: f"{r['task']} / {r['metric']}")
    drows, dex = curate_distortion(dpath, registry, rel(dpath))
    draw = {i: r for i, r in enumerate(_read_raw(dpath), start=1)}
    drows = dedupe(drows, dex, draw, DISTORTION_DUP_FIELDS, lambda r: f"{r['metric']} / {r['dataset']}")
    excluded_rows = mex.rows + dex.rows
    add_dir = raw_dir / ADDITIONS_DIR
    if add_dir.is_dir():  # later additions in their own format; row numbers refer to their own files
        apath, bpath = raw_dir / ADDITIONS_MEASUREMENTS, raw_dir / ADDITIONS_DISTORTION
        arows, aex = curate_additions_measurements(apath, registry, rel(apath))
        n_flags += flag_format_failures(arows)
        araw = {i: r for i, r in enumerate(_read_raw(apath), start=1)}
        mrows += dedupe(arows, aex, araw, MEASUREMENT_DUP_FIELDS, lambda r: f"{r['task']} / {r['metric']}")
        brows, bex = curate_additions_distortion(bpath, registry, rel(bpath))
        braw = {i: r for i, r in enumerate(_read_raw(bpath), start=1)}
        drows += dedupe(brows, bex, braw, DISTORTION_DUP_FIELDS, lambda r: f"{r['metric']} / {r['dataset']}")
        excluded_rows += aex.rows + bex.rows
    excluded = pl.DataFrame(excluded_rows, schema=empty_table("excluded").schema)
    return Curated(frame(mrows, "measurements"), frame(drows, "distortion"), excluded, n_flags)


# ---------------------------------------------------------------------------------------------


def summary_markdown(measurements: pl.DataFrame, distortion: pl.DataFrame, excluded: pl.DataFrame,
                     registry: pl.DataFrame) -> str:
    def table(df: pl.DataFrame, by: str, title: str) -> list[str]:
        counts = df.group_by(by).agg(pl.len().alias("rows"), pl.col("unreliable").sum().alias("flagged unreliable"))
        counts = counts.sort(["rows", by], descending=[True, False])
        out = [f"| {title} | rows | flagged unreliable |", "|---|---|---|"]
        out += [f"| {k} | {n} | {u} |" for k, n, u in counts.iter_rows()]
        return out

    from predictor.schema import TASK_CATEGORIES

    cats = measurements.group_by("task_category").agg(pl.len().alias("rows"), pl.col("unreliable").sum().alias("u"))
    cat_counts = {k: (n, u) for k, n, u in cats.iter_rows()}
    lines = [
        f"- measurements: **{measurements.height}** rows "
        f"({measurements.filter(pl.col('origin') == 'published').height} published, "
        f"{measurements.filter(pl.col('origin') == 'ingested').height} ingested; "
        f"{int(measurements['unreliable'].sum())} flagged unreliable, {int(measurements['secondhand'].sum())} second-hand), "
        f"{measurements['model'].n_unique()} models",
        f"- distortion: **{distortion.height}** rows, {distortion['model'].n_unique()} models",
        f"- registry: **{registry.height}** models",
        f"- excluded: **{excluded.height}** raw rows",
        "",
        "| task category | rows | flagged unreliable |", "|---|---|---|",
    ]
    lines += [f"| {c} | {cat_counts.get(c, (0, 0))[0]} | {cat_counts.get(c, (0, 0))[1]} |" for c in TASK_CATEGORIES]
    lines.append("")
    lines += table(measurements, "quant_family", "quant family (measurements)")
    lines.append("")
    lines += table(distortion, "quant_family", "quant family (distortion)")
    lines.append("")
    ex = excluded.group_by("raw_table", "reason_code").agg(pl.len().alias("rows")).sort(["raw_table", "rows"], descending=[False, True])
    lines += ["| raw table | excluded because | rows |", "|---|---|---|"]
    lines += [f"| {t} | {c} | {n} |" for t, c, n in ex.iter_rows()]
    return "\n".join(lines) + "\n"


def _replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN {name} (generated by python -m predictor.data.curate) -->", f"<!-- END {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SchemaError(f"README has no '{begin}' ... '{end}' block — restore it")
    return pattern.sub(lambda _: f"{begin}\n{body}{end}", text)


def update_readme(readme: Path, measurements, distortion, excluded, registry) -> None:
    text = readme.read_text(encoding="utf-8")
    text = _replace_block(text, "schema", render_schema_markdown())
    text = _replace_block(text, "summary", summary_markdown(measurements, distortion, excluded, registry))
    readme.write_text(text, encoding="utf-8")


def build_training_data(raw_dir: str | Path | None = None, out_dir: str | Path | None = None,
                        registry_path: str | Path | None = None) -> Curated:
    """Rebuild measurements.csv, distortion.csv and excluded.csv in `out_dir` from the raw published
    CSVs, keeping rows previously added by `quantpredict ingest`. The registry is read (and validated)
    from `registry_path` (default: registry.csv next to the output, else the repository's)."""
    root = repo_root()
    out = Path(out_dir) if out_dir else root / "training_data"
    raw = Path(raw_dir) if raw_dir else root / "training_data" / "raw" / "published"
    reg_path = Path(registry_path) if registry_path else (out / "registry.csv" if (out / "registry.csv").exists()
                                                          else root / "training_data" / "registry.csv")
    registry = read_table(reg_path, "registry")
    alias_map(registry)  # fails on ambiguous aliases
    cur = curate_published(raw, registry)
    frames = {"measurements": cur.measurements, "distortion": cur.distortion, "excluded": cur.excluded}
    for name in ("measurements", "distortion"):
        path = out / f"{name}.csv"
        if path.exists():
            kept = read_table(path, name).filter(pl.col("origin") == "ingested")
            if kept.height:
                frames[name] = pl.concat([frames[name], kept], how="vertical")
    if reg_path.resolve() != (out / "registry.csv").resolve():
        frames["registry"] = registry
    frames = {k: validate_frame(v, k, f"{out}/{k}.csv") for k, v in frames.items()}
    write_tables_atomic(out, frames)
    readme = out / "README.md"
    if readme.exists():
        update_readme(readme, frames["measurements"], frames["distortion"], frames["excluded"], registry)
    return Curated(frames["measurements"], frames["distortion"], frames["excluded"], cur.n_format_flags)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m predictor.data.curate", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", help="folder with the raw published CSVs (default training_data/raw/published)")
    p.add_argument("--out", help="training-data folder to (re)build (default training_data/)")
    args = p.parse_args(argv)
    try:
        cur = build_training_data(args.raw, args.out)
    except (SchemaError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"measurements: {cur.measurements.height} rows, distortion: {cur.distortion.height} rows, "
          f"excluded: {cur.excluded.height} raw rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
