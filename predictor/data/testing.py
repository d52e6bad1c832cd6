"""Writers of small files in the real formats `quantpredict ingest` reads, for tests and examples.

`write_lm_eval_results` writes the JSON layout of lm-evaluation-harness v0.4 (`results` with
"<metric>,<filter>" keys and "_stderr" siblings, `group_subtasks`, `configs`, `versions`, `n-shot`,
`higher_is_better`). `write_perplexity_log` writes what llama.cpp's llama-perplexity prints, with the
printf widths of tools/perplexity/perplexity.cpp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

# task -> {"metric,filter": value}; stderr siblings are derived from the value unless given.
DEFAULT_TASKS: dict[str, dict[str, float]] = {
    "arc_challenge": {"acc,none": 0.5520, "acc_norm,none": 0.5853},
    "gsm8k": {"exact_match,strict-match": 0.7650, "exact_match,flexible-extract": 0.7710},
    "mmlu": {"acc,none": 0.6512},
}
N_SHOT = {"arc_challenge": 0, "gsm8k": 5, "mmlu": 0, "hellaswag": 0, "winogrande": 5}


def write_lm_eval_results(path: str | os.PathLike, tasks: Mapping[str, Mapping[str, float]] | None = None, *,
                          model_name: str = "Qwen/Qwen3-8B", n_shot: Mapping[str, int] | None = None,
                          version: str = "0.4.8", with_subtasks: bool = True) -> Path:
    """Write a results JSON as `lm_eval --output_path` does. With `with_subtasks`, MMLU gets a subgroup and
    one subtask (which ingest must skip: the group row stands for them)."""
    tasks = {k: dict(v) for k, v in (tasks or DEFAULT_TASKS).items()}
    shots = {**N_SHOT, **(n_shot or {})}
    results, configs, versions, hib, nshot = {}, {}, {}, {}, {}
    for task, scores in tasks.items():
        entry: dict = {"alias": task}
        for key, value in scores.items():
            metric, _, filt = key.partition(",")
            entry[key] = value
            if value is not None and not isinstance(value, str):
                entry[f"{metric}_stderr,{filt}"] = round(((value * (1 - value)) / 1000) ** 0.5, 6) if 0 <= value <= 1 else "N/A"
        results[task] = entry
        configs[task] = {"task": task, "num_fewshot": shots.get(task, 0), "output_type": "multiple_choice",
                         "metric_list": [{"metric": k.partition(",")[0], "aggregation": "mean", "higher_is_better": True}
                                         for k in scores]}
        versions[task] = 1.0
        hib[task] = {k.partition(",")[0]: True for k in scores}
        nshot[task] = shots.get(task, 0)
    group_subtasks = {t: [] for t in tasks}
    if with_subtasks and "mmlu" in tasks:
        acc = tasks["mmlu"].get("acc,none", 0.5)
        results["mmlu_humanities"] = {"alias": " - humanities", "acc,none": acc - 0.03, "acc_stderr,none": 0.0068}
        results["mmlu_formal_logic"] = {"alias": "  - formal_logic", "acc,none": acc - 0.2, "acc_stderr,none": 0.0441}
        group_subtasks["mmlu"] = ["mmlu_humanities"]
        group_subtasks["mmlu_humanities"] = ["mmlu_formal_logic"]
        versions.update({"mmlu": 2, "mmlu_humanities": 2, "mmlu_formal_logic": 1.0})
        nshot["mmlu_formal_logic"] = shots.get("mmlu", 0)
        nshot.pop("mmlu", None)  # lm-eval gives n-shot for leaf tasks only
    data = {
        "results": results,
        "groups": {"mmlu": results["mmlu"]} if "mmlu" in results else {},
        "group_subtasks": group_subtasks,
        "configs": configs,
        "versions": versions,
        "n-shot": nshot,
        "higher_is_better": hib,
        "n-samples": {t: {"original": 1000, "effective": 1000} for t in tasks},
        "config": {"model": "hf", "model_args": f"pretrained={model_name},dtype=bfloat16", "batch_size": "auto",
                   "device": "cuda:0"},
        "git_hash": "8f5a5c3",
        "date": 1717171717.0,
        "lm_eval_version": version,
        "model_name": model_name,
    }
    path = Path(path)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


_HEADER = """build: 4589 (f364eb6f) with cc (GCC) 13.2.0 for x86_64-linux-gnu
llama_model_loader: loaded meta data with 29 key-value pairs and 291 tensors from {model} (version GGUF V3 (latest))
llama_model_loader: - type  f32:   65 tensors
llama_model_loader: - type q4_K:  193 tensors
llama_model_loader: - type q6_K:   33 tensors
print_info: file format = GGUF V3 (latest)
print_info: file type   = {file_type}
print_info: file size   = 4.58 GiB (4.89 BPW)
system_info: n_threads = 16 (n_threads_batch = 16) / 32 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 |
"""


def write_perplexity_log(path: str | os.PathLike, *, ppl: float = 6.4071, ppl_stderr: float = 0.03912, n_ctx: int = 512,
                         file_type: str = "Q4_K - Medium", model_file: str = "model-Q4_K_M.gguf", n_chunks: int = 584) -> Path:
    """A plain llama-perplexity run ending in 'Final estimate: PPL = ... +/- ...'."""
    text = _HEADER.format(model=model_file, file_type=file_type)
    text += "perplexity: tokenizing the input ..\nperplexity: tokenization took 512.31 ms\n"
    text += f"perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={n_ctx}, batch_size=2048, n_seq=4\n"
    text += "perplexity: 1.63 seconds per pass - ETA 3.97 minutes\n"
    text += "[1]4.1234,[2]4.9876,[3]5.3321,[4]5.8812,\n"
    text += f"Final estimate: PPL = {ppl:.4f} +/- {ppl_stderr:.5f}\n\n"
    text += "llama_perf_context_print:        load time =    1234.56 ms\n"
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


DEFAULT_KLD = {
    "ppl": (6.407115, 0.039119), "ppl_base": (6.233160, 0.037828), "cor": 99.30,
    "ln_ratio": (0.027530, 0.000850), "ratio": (1.027912, 0.000873), "diff": (0.173955, 0.005616),
    "kld_mean": (0.031273, 0.000238),
    "kld": {"Maximum": 10.124340, "99.9%": 1.543210, "99.0%": 0.398765, "95.0%": 0.112233, "90.0%": 0.066011,
            "Median": 0.009876, "10.0%": 0.000187, " 5.0%": 0.000055, " 1.0%": 0.000004, " 0.1%": -0.000001,
            "Minimum": -0.000012},
    "dp_mean": (-0.596, 0.014),
    "dp": {"Maximum": 64.218, "99.9%": 28.123, "99.0%": 10.456, "95.0%": 4.321, "90.0%": 2.345, "75.0%": 0.456,
           "Median": -0.001, "25.0%": -0.789, "10.0%": -3.456, " 5.0%": -6.012, " 1.0%": -15.432, " 0.1%": -40.987,
           "Minimum": -88.765},
    "rms_dp": (5.519, 0.050), "same_top": (91.901, 0.071),
}


def _pad(label: str) -> str:
    """perplexity.cpp prints 'Maximum KLD:', 'Median  KLD:', '99.9%   KLD:', ' 5.0%   KLD:'."""
    return label if label in ("Maximum", "Minimum") else f"{label:<7}"


def write_kld_log(path: str | os.PathLike, stats: Mapping | None = None, *, n_ctx: int = 512,
                  file_type: str = "Q4_K - Medium", truncate_after: str | None = None) -> Path:
    """A llama-perplexity --kl-divergence run with its three summary blocks (perplexity.cpp's printf widths).
    `truncate_after` cuts the log after the first line containing that text (to build broken inputs)."""
    s = {**DEFAULT_KLD, **(stats or {})}
    lines = _HEADER.format(model="model-Q4_K_M.gguf", file_type=file_type).splitlines()
    lines += [f"kl_divergence: computing over 100 chunks, n_ctx={n_ctx}, batch_size=2048, n_seq=4",
              "kl_divergence: 3.21 seconds per pass - ETA 1.33 minutes", "",
              "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p",
              "   1       4.1234 ±    0.5678       0.01234 ±    0.00567       0.02345 ±    0.00123    4.567 ±  0.234 %   92.157 ±  1.192 %",
              "", "====== Perplexity statistics ======",
              "Mean PPL(Q)                   : %10.6f ± %10.6f" % s["ppl"],
              "Mean PPL(base)                : %10.6f ± %10.6f" % s["ppl_base"],
              "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % s["cor"],
              "Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f" % s["ln_ratio"],
              "Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f" % s["ratio"],
              "Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f" % s["diff"],
              "", "====== KL divergence statistics ======",
              "Mean    KLD: %10.6f ± %10.6f" % s["kld_mean"]]
    for label, v in s["kld"].items():
        lines.append(f"{_pad(label)} KLD: {v:10.6f}")
    lines += ["", "====== Token probability statistics ======", "Mean    Δp: %6.3f ± %5.3f %%" % s["dp_mean"]]
    for label, v in s["dp"].items():
        lines.append(f"{_pad(label)} Δp: {v:6.3f}%")
    lines += ["RMS Δp    : %6.3f ± %5.3f %%" % s["rms_dp"], "Same top p: %6.3f ± %5.3f %%" % s["same_top"], "",
              "llama_perf_context_print:        load time =    2345.67 ms"]
    if truncate_after is not None:
        for i, line in enumerate(lines):
            if truncate_after in line:
                lines = lines[: i + 1]
                break
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
