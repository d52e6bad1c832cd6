"""Reader for llama.cpp `llama-perplexity` output (tools/perplexity/perplexity.cpp).

Plain perplexity runs end with

    Final estimate: PPL = 6.4071 +/- 0.03912

Runs with `--kl-divergence` (against logits saved by `--kl-divergence-base`) end with three blocks:

    ====== Perplexity statistics ======
    Mean PPL(Q)                   :   6.407115 ±   0.039119
    Mean PPL(base)                :   6.233160 ±   0.037828
    Cor(ln(PPL(Q)), ln(PPL(base))):  99.30%
    Mean ln(PPL(Q)/PPL(base))     :   0.027530 ±   0.000850
    Mean PPL(Q)/PPL(base)         :   1.027912 ±   0.000873
    Mean PPL(Q)-PPL(base)         :   0.173955 ±   0.005616

    ====== KL divergence statistics ======
    Mean    KLD:   0.031273 ±   0.000238
    Maximum KLD:  10.124340
    99.9%   KLD:   1.543210        (also 99.0, 95.0, 90.0, Median, 10.0, 5.0, 1.0, 0.1, Minimum)

    ====== Token probability statistics ======
    Mean    Δp: -0.596 ± 0.014 %
    Maximum Δp: 64.218%            (also 99.9 ... 75.0, Median, 25.0 ... 0.1, Minimum)
    RMS Δp    :  5.519 ± 0.050 %
    Same top p: 91.901 ± 0.071 %

The context size comes from "... n_ctx=512 ..." and the quant from "file type = Q4_K - Medium".
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from predictor.data.quant_names import FILE_TYPE_NAMES
from predictor.data.rows import sha256_file
from predictor.data.store import read_capped_bytes
from predictor.errors import InputFileError

MAX_LOG_BYTES = 64 * 1024 * 1024
FIX = "pass the full output of llama-perplexity (e.g. `llama-perplexity ... 2>&1 | tee run.log`)"

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_PM = r"\s*(?:±|\+/-)\s*"

_FINAL = re.compile(r"Final estimate: PPL = " + _NUM + _PM + _NUM)
_STAT_LINES = {  # line label -> metric name (value ± uncertainty)
    r"Mean PPL\(Q\)\s*:": "ppl",
    r"Mean PPL\(base\)\s*:": "ppl_base",
    r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:": "ln_ppl_ratio",
    r"Mean PPL\(Q\)/PPL\(base\)\s*:": "ppl_ratio",
    r"Mean PPL\(Q\)-PPL\(base\)\s*:": "delta_ppl",
    r"Mean\s+KLD:": "kld_mean",
    r"Mean\s+Δp:": "mean_dp_pct",
    r"RMS Δp\s*:": "rms_dp_pct",
    r"Same top p:": "same_top_p_pct",
}
_STAT_RES = [(re.compile(r"^\s*" + label + r"\s*" + _NUM + r"(?:" + _PM + _NUM + r")?\s*%?\s*$"), name)
             for label, name in _STAT_LINES.items()]
_COR = re.compile(r"^\s*Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*" + _NUM + r"\s*%\s*$")
_PCT_LINE = re.compile(r"^\s*(Maximum|Minimum|Median|\d+(?:\.\d+)?%)\s+(KLD|Δp):\s*" + _NUM + r"\s*%?\s*$")
_NCTX = re.compile(r"n_ctx\s*=\s*(\d+)")
_FTYPE = re.compile(r"(?:file type|model ftype)\s*=\s*(.+?)\s*$")


def _stat_name(label: str, kind: str) -> str:
    prefix = "kld" if kind == "KLD" else "dp"
    suffix = "" if kind == "KLD" else "_pct"
    if label in ("Maximum", "Minimum"):
        return f"{prefix}_{label[:3].lower()}{suffix}"
    if label == "Median":
        return f"{prefix}_median{suffix}"
    q = label.rstrip("%")
    q = q[:-2] if q.endswith(".0") else q  # 99.0% -> p99, 99.9% -> p99_9
    return f"{prefix}_p{q.replace('.', '_')}{suffix}"


@dataclass
class PerplexityLog:
    path: Path
    sha256: str
    ppl: float | None = None
    ppl_stderr: float | None = None
    n_ctx: int | None = None
    file_type: str | None = None  # normalised quant name from the log, if it printed one
    kld_run: bool = False  # True if the --kl-divergence summary was found
    stats: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # metric -> (value, ±)


def _finite(text: str, path: Path, what: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise InputFileError(path, f"{what} is {text}", "the run diverged or was cut short; re-run it")
    return v


def read_perplexity_log(path: str | os.PathLike) -> PerplexityLog:
    """Parse a llama-perplexity log. Raises InputFileError if it has no final result or a truncated summary."""
    path = Path(path)
    raw = read_capped_bytes(path, MAX_LOG_BYTES, "a llama-perplexity log", FIX)
    if b"\x00" in raw:
        raise InputFileError(path, "is a binary file, not a llama-perplexity log", FIX)
    text = raw.decode("utf-8", errors="replace")
    log = PerplexityLog(path, sha256_file(path))
    sections = set()
    for line in text.splitlines():
        if "======" in line:
            for name in ("Perplexity statistics", "KL divergence statistics", "Token probability statistics"):
                if name in line:
                    sections.add(name)
        if log.n_ctx is None and (m := _NCTX.search(line)):
            log.n_ctx = int(m.group(1))
        if log.file_type is None and (m := _FTYPE.search(line)):
            log.file_type = FILE_TYPE_NAMES.get(m.group(1).strip(), None)
        if m := _FINAL.search(line):
            log.ppl = _finite(m.group(1), path, "the final PPL")
            log.ppl_stderr = _finite(m.group(2), path, "the PPL uncertainty")
            continue
        if m := _COR.match(line):
            log.stats["ppl_correlation_pct"] = (_finite(m.group(1), path, "Cor(ln PPL)"), None)
            continue
        if m := _PCT_LINE.match(line):
            log.stats[_stat_name(m.group(1), m.group(2))] = (_finite(m.group(3), path, line.strip()), None)
            continue
        for rx, name in _STAT_RES:
            if m := rx.match(line):
                value = _finite(m.group(1), path, name)
                unc = _finite(m.group(2), path, f"{name} uncertainty") if m.group(2) else None
                log.stats[name] = (value, unc)
                break
    if sections:
        log.kld_run = True
        needed = {"Perplexity statistics": "ppl", "KL divergence statistics": "kld_mean",
                  "Token probability statistics": "same_top_p_pct"}
        for section, metric in needed.items():
            if section not in sections or metric not in log.stats:
                raise InputFileError(path, f"the KL-divergence summary is truncated ('{section}' block "
                                     f"{'missing' if section not in sections else 'incomplete'})", FIX)
        log.ppl, log.ppl_stderr = log.stats["ppl"]
    elif log.ppl is None:
        raise InputFileError(path, "has no 'Final estimate: PPL = ...' line and no KL-divergence summary", FIX)
    return log
