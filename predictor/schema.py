"""Polars schemas of every training-data table, one comment per column.

The column lists below are the single source of truth: `training_data/README.md` embeds the
markdown rendered by `render_schema_markdown()`, and a test checks the two agree. Tables are stored
as CSV (text, diffable) and read back with these schemas by `predictor.data.load_training_data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class Column:
    name: str
    dtype: type[pl.DataType] | pl.DataType
    doc: str
    required_in_csv_ingest: bool = False  # a user CSV given to `quantpredict ingest` must have it


def _schema(columns: list[Column]) -> pl.Schema:
    return pl.Schema([(c.name, c.dtype) for c in columns])


# Allowed values of the enumerated string columns.
TASK_CATEGORIES = ("math", "code", "knowledge", "chat", "reasoning", "creative", "language_modeling")
IMATRIX_VALUES = ("yes", "no", "unknown")
ORIGINS = ("published", "ingested", "measured")
SCORE_UNITS = ("percent", "judge_1to10", "recovery_pct", "raw")
QUANT_FAMILIES = (
    "gguf-k",  # llama.cpp K-quant presets (Q2_K .. Q6_K and their _S/_M/_L mixes)
    "gguf-i",  # llama.cpp i-quant presets (IQ1_S .. IQ4_XS)
    "gguf-legacy",  # llama.cpp Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
    "gguf-mixed",  # community GGUF mixes (UD-*, DQ3_K_M, *_L variants, AutoScheme mixes)
    "gguf-ik",  # ik_llama.cpp-only types (IQ2_KS, ...)
    "float",  # F16/BF16/F32 (the reference itself)
    "rtn",  # round-to-nearest integer quantization (per group or per channel)
    "gptq",
    "awq",
    "autoround",  # Intel AutoRound (tuned or its optimised RTN) in integer formats
    "hqq",
    "omniquant",
    "binarization",  # Bi-LLM and other ~1-bit schemes
    "fp4",  # MXFP4 / NVFP4
    "exl2",
    "bnb",  # bitsandbytes int8 / nf4 / fp4
    "mlx",
    "other",
)

MEASUREMENT_COLUMNS: list[Column] = [
    Column("row_id", pl.String, "stable 16-hex id of the row's identity (model, quant, method, imatrix, task, metric, filter, n-shot, source, location)"),
    Column("origin", pl.String, "'published' (curated from training_data/raw/published), 'ingested' (added by `quantpredict ingest`) or 'measured' (our own runs, `quantpredict measure`)"),
    Column("model", pl.String, "canonical model id, the key of registry.csv (a Hugging Face repo id where one exists)", True),
    Column("model_as_published", pl.String, "the model name exactly as the source wrote it"),
    Column("family", pl.String, "model family from the registry (llama2, qwen3, ...); null if the model is not in the registry"),
    Column("params_b", pl.Float64, "total parameters in billions, from the registry"),
    Column("train_tokens_t", pl.Float64, "pre-training tokens in trillions, from the registry; null where not published"),
    Column("quant", pl.String, "normalised quant name: llama.cpp preset name (Q4_K_M, IQ4_XS, Q8_0) or METHOD-W<bits>-g<group> / -perchannel for integer methods (GPTQ-W4-g128, RTN-W3-perchannel)", True),
    Column("quant_as_published", pl.String, "the quant label exactly as the source wrote it"),
    Column("quant_family", pl.String, "coarse quant family, one of schema.QUANT_FAMILIES (gguf-k, gguf-i, gguf-legacy, rtn, gptq, awq, ...)"),
    Column("method", pl.String, "algorithm that chose the quantized weights: llama.cpp, rtn, gptq, awq, autoround, autoround-rtn, hqq, omniquant, bi-llm, ..."),
    Column("weight_bits", pl.Float64, "nominal bits of the main weight format (4 for Q4_K_M and GPTQ-W4); null if not stated"),
    Column("group_size", pl.Int64, "weights per scale for integer methods; -1 = one scale per output channel; null for GGUF presets (fixed by the block type) or when unknown"),
    Column("bits_per_weight", pl.Float64, "effective bits per weight as stated by the source (file-level or repeating layers, see note); null if not stated"),
    Column("imatrix", pl.String, "importance matrix used: 'yes', 'no' or 'unknown'"),
    Column("imatrix_note", pl.String, "calibration detail when given (data set, size); null otherwise"),
    Column("task", pl.String, "normalised task name (MMLU, GSM8K, HellaSwag, ARC-Challenge, HumanEval, IFEval, ...)", True),
    Column("task_category", pl.String, "one of: math, code, knowledge, chat (instruction following, dialogue), reasoning (commonsense / multiple-choice reasoning), creative, language_modeling"),
    Column("metric", pl.String, "normalised metric name (acc, acc_norm, exact_match, pass@1, prompt_level_strict_acc, llm_judge_1to10:<judge>, recovery_pct, ...)", True),
    Column("metric_filter", pl.String, "lm-eval filter of the metric (none, strict-match, flexible-extract); null when the source does not say"),
    Column("n_shot", pl.Int64, "number of few-shot examples; null when the source does not say"),
    Column("higher_is_better", pl.Boolean, "true for accuracies and judge scores, false for perplexity-like metrics"),
    Column("score_unit", pl.String, "unit of the two scores: percent (0-100), judge_1to10, recovery_pct (scores null, only the relative drop is known) or raw"),
    Column("baseline_score", pl.Float64, "score of the unquantized (or reference) model, in score_unit", True),
    Column("quant_score", pl.Float64, "score of the quantized model, in score_unit", True),
    Column("baseline_stderr", pl.Float64, "standard error of baseline_score where known, in score_unit"),
    Column("quant_stderr", pl.Float64, "standard error of quant_score where known, in score_unit"),
    Column("baseline_precision", pl.String, "what the baseline is: bf16, fp16, fp8, 16-bit (unspecified), a quant name used as reference (Q8_0, Q5_K_M), or unknown"),
    Column("relative_drop_pct", pl.Float64, "(baseline - quant) / baseline x 100 for higher-is-better metrics, (quant - baseline) / baseline x 100 otherwise: positive = worse"),
    Column("secondhand", pl.Boolean, "true if the number was read in a text quoting the original source, not the source itself"),
    Column("unreliable", pl.Boolean, "true if the row should not be used as a training target as is (see unreliable_reason)"),
    Column("unreliable_reason", pl.String, "why the row is flagged unreliable ('; '-separated); null when reliable"),
    Column("note", pl.String, "curation notes: harness details, derived values, caveats from the source"),
    Column("source", pl.String, "where the number comes from (paper, repository file, PR, or 'local run')"),
    Column("source_location", pl.String, "where in the source (table, section, JSON key)"),
    Column("source_file", pl.String, "file the row was read from (the raw published CSV inside the repo, or the ingested file's name)"),
    Column("source_sha256", pl.String, "sha256 of source_file"),
    Column("source_row", pl.Int64, "1-based data-row number in source_file for CSV sources; null for JSON/log files"),
    Column("ingested_at", pl.String, "UTC date (YYYY-MM-DD) the row entered training_data"),
]

DISTORTION_COLUMNS: list[Column] = [
    Column("row_id", pl.String, "stable 16-hex id of the row's identity (model, quant, method, imatrix, imatrix note, metric, data set, context, source, location)"),
    Column("origin", pl.String, "'published', 'ingested' or 'measured'"),
    Column("model", pl.String, "canonical model id (registry key); joins measurements on (model, quant, imatrix)", True),
    Column("model_as_published", pl.String, "the model name exactly as the source wrote it"),
    Column("family", pl.String, "model family from the registry"),
    Column("quant", pl.String, "normalised quant name (as in measurements)", True),
    Column("quant_as_published", pl.String, "the quant label exactly as the source wrote it"),
    Column("quant_family", pl.String, "coarse quant family, one of schema.QUANT_FAMILIES"),
    Column("method", pl.String, "algorithm that chose the quantized weights (as in measurements)"),
    Column("weight_bits", pl.Float64, "nominal bits of the main weight format"),
    Column("group_size", pl.Int64, "weights per scale for integer methods; -1 per channel; null for GGUF presets"),
    Column("bits_per_weight", pl.Float64, "effective bits per weight as stated by the source; null if not stated"),
    Column("imatrix", pl.String, "importance matrix used: 'yes', 'no' or 'unknown'"),
    Column("imatrix_note", pl.String, "calibration detail (e.g. 'WT 10m wikitext tokens'); rows differing only here are distinct"),
    Column("metric", pl.String, "ppl, delta_ppl, ppl_ratio, ln_ppl_ratio, ppl_correlation_pct, kld_mean, kld_median, kld_max, kld_min, kld_p<q> (kld_p99, kld_p99_9, ...), mean_dp_pct, rms_dp_pct, dp_<stat>_pct, same_top_p_pct", True),
    Column("value", pl.Float64, "the metric's value for the quantized model (percent for *_pct metrics)", True),
    Column("value_stderr", pl.Float64, "uncertainty printed with the value (llama-perplexity '±'); null when not given"),
    Column("baseline", pl.Float64, "for ppl rows: perplexity of the 16-bit (or reference) model on the same data; null otherwise or when unknown"),
    Column("baseline_stderr", pl.Float64, "uncertainty of baseline where given"),
    Column("baseline_precision", pl.String, "what the baseline is: fp16, bf16, 16-bit (unspecified), a quant name (Q8_0), or unknown"),
    Column("relative_change_pct", pl.Float64, "for ppl rows with a baseline: (value - baseline) / baseline x 100 (positive = worse); null otherwise"),
    Column("dataset", pl.String, "evaluation text as stated (wikitext-2 test, c4, ...)"),
    Column("context_length", pl.Int64, "tokens per evaluated chunk (llama-perplexity n_ctx, paper sequence length); null if not stated"),
    Column("approximate", pl.Boolean, "true if the source gives the value only approximately (e.g. '~0.04')"),
    Column("secondhand", pl.Boolean, "true if read in a text quoting the original source"),
    Column("unreliable", pl.Boolean, "true if the row should not be used as a target as is"),
    Column("unreliable_reason", pl.String, "why the row is flagged unreliable; null when reliable"),
    Column("note", pl.String, "curation notes (derived baselines, conversions, caveats)"),
    Column("source", pl.String, "where the number comes from"),
    Column("source_location", pl.String, "where in the source"),
    Column("source_file", pl.String, "file the row was read from"),
    Column("source_sha256", pl.String, "sha256 of source_file"),
    Column("source_row", pl.Int64, "1-based data-row number in source_file for CSV sources; null for logs"),
    Column("ingested_at", pl.String, "UTC date (YYYY-MM-DD) the row entered training_data"),
]

REGISTRY_COLUMNS: list[Column] = [
    Column("model", pl.String, "canonical model id (a Hugging Face repo id where one exists)"),
    Column("family", pl.String, "model family used as a feature and for recognising a user's model (llama2, qwen3, mistral, ...)"),
    Column("variant", pl.String, "base, instruct, chat, code, reasoning, reasoning-distill or finetune"),
    Column("base_model", pl.String, "canonical id of the pre-trained model this one was fine-tuned or distilled from; null for pre-trained models"),
    Column("architecture", pl.String, "Hugging Face architectures[0] from config.json (LlamaForCausalLM, ...)"),
    Column("gguf_arch", pl.String, "llama.cpp general.architecture name (llama, qwen2, qwen3, ...)"),
    Column("n_layers", pl.Int64, "transformer blocks (num_hidden_layers)"),
    Column("hidden_size", pl.Int64, "model width (hidden_size / d_model)"),
    Column("ffn_size", pl.Int64, "dense feed-forward width (intermediate_size); for MoE models the dense-layer width if any"),
    Column("expert_ffn_size", pl.Int64, "feed-forward width of one routed expert (MoE only)"),
    Column("n_heads", pl.Int64, "attention heads"),
    Column("n_kv_heads", pl.Int64, "key/value heads (= n_heads without GQA, 1 for multi-query)"),
    Column("vocab_size", pl.Int64, "embedding rows (vocab_size / padded_vocab_size in config.json)"),
    Column("tied_embeddings", pl.Boolean, "true if the output projection shares the token-embedding matrix"),
    Column("n_experts", pl.Int64, "routed experts per MoE layer; null for dense models"),
    Column("n_experts_used", pl.Int64, "experts active per token; null for dense models"),
    Column("n_params_b", pl.Float64, "total parameters in billions as published"),
    Column("n_active_params_b", pl.Float64, "parameters active per token in billions (MoE only)"),
    Column("train_tokens_t", pl.Float64, "pre-training tokens in trillions as published; null where the makers did not publish it"),
    Column("arch_source", pl.String, "citation for the architecture facts (config.json of the repo, paper table)"),
    Column("tokens_source", pl.String, "citation for train_tokens_t"),
    Column("aliases", pl.String, "'|'-separated names under which sources refer to this model (used to map raw names to the id)"),
    Column("note", pl.String, "caveats (e.g. version not stated by the source)"),
]

EXCLUDED_COLUMNS: list[Column] = [
    Column("raw_table", pl.String, "raw file the row came from, relative to raw/published: measurements.csv, kld_ppl.csv, additions-2026-12/measurements.csv or additions-2026-12/distortion.csv"),
    Column("source_row", pl.Int64, "1-based data-row number in the raw file"),
    Column("model_as_published", pl.String, "model name as written in the raw row"),
    Column("quant_as_published", pl.String, "quant label as written in the raw row"),
    Column("what", pl.String, "task/metric (measurements) or metric/data set (distortion) of the raw row"),
    Column("reason_code", pl.String, "short machine-readable reason (no_baseline, duplicate, aggregate_of_kept_rows, ...)"),
    Column("reason", pl.String, "why the row is not in the curated tables, in words"),
    Column("source", pl.String, "the raw row's source"),
    Column("raw_json", pl.String, "the whole raw row as JSON, so nothing is lost"),
]

TABLES: dict[str, list[Column]] = {
    "measurements": MEASUREMENT_COLUMNS,
    "distortion": DISTORTION_COLUMNS,
    "registry": REGISTRY_COLUMNS,
    "excluded": EXCLUDED_COLUMNS,
}

MEASUREMENTS = _schema(MEASUREMENT_COLUMNS)
DISTORTION = _schema(DISTORTION_COLUMNS)
REGISTRY = _schema(REGISTRY_COLUMNS)
EXCLUDED = _schema(EXCLUDED_COLUMNS)

SCHEMAS: dict[str, pl.Schema] = {name: _schema(cols) for name, cols in TABLES.items()}

# Values a column may take; checked on every read.
ENUMS: dict[str, dict[str, tuple[str, ...]]] = {
    "measurements": {
        "origin": ORIGINS,
        "task_category": TASK_CATEGORIES,
        "imatrix": IMATRIX_VALUES,
        "score_unit": SCORE_UNITS,
        "quant_family": QUANT_FAMILIES,
    },
    "distortion": {"origin": ORIGINS, "imatrix": IMATRIX_VALUES, "quant_family": QUANT_FAMILIES},
    "registry": {},
    "excluded": {},
}

# Columns that may never be null.
NOT_NULL: dict[str, tuple[str, ...]] = {
    "measurements": ("row_id", "origin", "model", "quant", "quant_family", "method", "imatrix", "task",
                     "task_category", "metric", "score_unit", "secondhand", "unreliable", "source"),
    "distortion": ("row_id", "origin", "model", "quant", "quant_family", "method", "imatrix", "metric",
                   "value", "approximate", "secondhand", "unreliable", "source"),
    "registry": ("model", "family"),
    "excluded": ("raw_table", "reason_code", "reason"),
}


def render_schema_markdown() -> str:
    """The schema section of training_data/README.md (one table per file, one line per column)."""
    dtype_names = {pl.String: "string", pl.Float64: "float", pl.Int64: "int", pl.Boolean: "bool"}
    parts = []
    for name, cols in TABLES.items():
        parts.append(f"### `{name}.csv`\n")
        parts.append("| column | type | meaning |")
        parts.append("|---|---|---|")
        for c in cols:
            req = " **(required in an ingested CSV)**" if c.required_in_csv_ingest else ""
            doc = c.doc.replace("|", "\\|")
            parts.append(f"| `{c.name}` | {dtype_names.get(c.dtype, str(c.dtype))} | {doc}{req} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
