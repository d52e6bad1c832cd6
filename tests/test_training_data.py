"""The curated training_data/: loads with one call, matches the documented schema, is rebuilt exactly
from the raw published CSVs, keeps every raw row accounted for, and follows its curation rules."""

from __future__ import annotations

import csv
import json
import re
import shutil

import polars as pl
import pytest

from predictor.data import default_training_dir, identify_model, load_training_data, resolve_model
import math

from predictor.data.curate import ADDITIONS_SNAPSHOT_DATE, build_training_data, published_quant, summary_markdown
from predictor.data.quant_names import LLAMA_CPP_PRESETS, parse_quant_name
from predictor.data.rows import flag_format_failures, flag_near_chance, relative_drop
from predictor.data.store import read_table, validate_frame
from predictor.data.tasks import TASKS
from predictor.errors import SchemaError, UsageError
from predictor.schema import SCHEMAS, TASK_CATEGORIES, render_schema_markdown

TD = default_training_dir()
RAW = TD / "raw" / "published"


@pytest.fixture(scope="module")
def td():
    return load_training_data()


# (raw file under raw/published, its raw_table name in excluded.csv, curated table)
RAW_TABLES = (("measurements.csv", "measurements"), ("kld_ppl.csv", "distortion"),
              ("additions-2026-12/measurements.csv", "measurements"),
              ("additions-2026-12/distortion.csv", "distortion"))


def raw_rows(name: str) -> list[dict[str, str]]:
    with open(RAW / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def block(text: str, name: str) -> str:
    m = re.search(rf"<!-- BEGIN {name} [^>]*-->\n(.*?)<!-- END {name} -->", text, re.S)
    assert m, f"README lacks the {name} block"
    return m.group(1)


def test_one_call_loads_every_table_with_the_documented_schema(td):
    for name, schema in SCHEMAS.items():
        df = getattr(td, name)
        assert df.schema == schema, name
    assert td.measurements.height > 3000 and td.distortion.height > 400 and td.registry.height > 50
    assert set(td.measurements["task_category"].unique()) <= set(TASK_CATEGORIES)
    assert td.measurements["row_id"].is_unique().all() and td.distortion["row_id"].is_unique().all()


def test_readme_schema_and_summary_match_the_code(td):
    readme = (TD / "README.md").read_text(encoding="utf-8")
    assert block(readme, "schema") == render_schema_markdown()
    assert block(readme, "summary") == summary_markdown(td.measurements, td.distortion, td.excluded, td.registry)


def test_schema_errors_name_missing_extra_and_bad_values(tmp_path):
    d = tmp_path / "td"
    shutil.copytree(TD, d, ignore=shutil.ignore_patterns("raw"))
    m = pl.read_csv(d / "measurements.csv", infer_schema=False, n_rows=20)
    m.drop("task_category").with_columns(pl.lit("x").alias("colour")).write_csv(d / "measurements.csv")
    with pytest.raises(SchemaError) as exc:
        load_training_data(d)
    msg = str(exc.value)
    assert "missing columns ['task_category']" in msg and "extra columns ['colour']" in msg and "measurements" in msg
    m.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("lots")).otherwise(pl.col("quant_score"))
                   .alias("quant_score")).write_csv(d / "measurements.csv")
    with pytest.raises(SchemaError, match=r"quant_score row 4: 'lots'"):
        load_training_data(d)
    m.with_columns(pl.lit("poetry").alias("task_category")).write_csv(d / "measurements.csv")
    with pytest.raises(SchemaError, match=r"task_category has values \['poetry'\]"):
        load_training_data(d)


def test_rebuild_from_raw_reproduces_the_committed_tables(tmp_path):
    out = tmp_path / "td"
    out.mkdir()
    shutil.copy(TD / "registry.csv", out / "registry.csv")
    build_training_data(RAW, out)
    for name in ("measurements", "distortion", "excluded"):
        committed = read_table(TD / f"{name}.csv", name)
        if "origin" in committed.columns:
            committed = committed.filter(pl.col("origin") == "published")
        assert read_table(out / f"{name}.csv", name).equals(committed), name


def test_every_raw_row_is_curated_or_excluded_with_a_reason(td):
    for raw_name, table_name in RAW_TABLES:
        table = getattr(td, table_name)
        raws = raw_rows(raw_name)
        kept = table.filter(pl.col("origin") == "published",
                            pl.col("source_file") == f"training_data/raw/published/{raw_name}")["source_row"].to_list()
        ex = td.excluded.filter(pl.col("raw_table") == raw_name)
        assert sorted(kept + ex["source_row"].to_list()) == list(range(1, len(raws) + 1)), raw_name
        for r in ex.iter_rows(named=True):  # the excluded record keeps the whole raw row
            assert json.loads(r["raw_json"]) == raws[r["source_row"] - 1] and r["reason"]


def test_curated_rows_keep_the_published_numbers(td):
    raws = raw_rows("measurements.csv")
    # A source that writes every score of a metric as a fraction (all <= 1) is converted to percent.
    top: dict[tuple[str, str], float] = {}
    for raw in raws:
        for v in (raw["baseline_score"], raw["quant_score"]):
            if v:
                top[(raw["source"], raw["metric"])] = max(top.get((raw["source"], raw["metric"]), 0.0), float(v))
    m = td.measurements.filter(pl.col("origin") == "published", pl.col("score_unit") == "percent",
                               pl.col("source_file") == "training_data/raw/published/measurements.csv")
    for r in m.iter_rows(named=True):
        raw = raws[r["source_row"] - 1]
        scale = 100.0 if top[(raw["source"], raw["metric"])] <= 1.0 else 1.0
        assert r["quant_score"] == pytest.approx(float(raw["quant_score"]) * scale)
        if raw["baseline_score"]:
            assert r["baseline_score"] == pytest.approx(float(raw["baseline_score"]) * scale)
        else:  # only a quantized reference named by the source can stand in (kept as a preset pair)
            assert r["baseline_precision"] in ("Q5_K_M", "Q8_0")
            assert "quantized reference" not in (r["unreliable_reason"] or "")
        assert r["model_as_published"] == raw["model"] and r["quant_as_published"] == raw["quant"]
        assert r["relative_drop_pct"] == pytest.approx(relative_drop(r["baseline_score"], r["quant_score"]))


def test_registry_covers_every_model_with_citations(td):
    reg = td.registry
    models = set(td.measurements["model"]) | set(td.distortion["model"])
    assert models <= set(reg["model"])
    filled = reg.filter(pl.col("n_layers").is_not_null())
    assert filled["arch_source"].null_count() == 0
    assert reg.filter(pl.col("train_tokens_t").is_not_null())["tokens_source"].null_count() == 0
    # published-token anchors named in the issue
    tokens = dict(zip(reg["model"], reg["train_tokens_t"]))
    assert tokens["meta-llama/Llama-2-7b-hf"] == 2.0 and tokens["meta-llama/Meta-Llama-3-8B"] == 15.0
    assert tokens["Qwen/Qwen2.5-7B"] == 18.0 and tokens["Qwen/Qwen3-8B"] == 36.0
    assert tokens["mistralai/Mistral-7B-v0.1"] is None  # not published: left empty, not guessed
    # GQA sanity: heads divisible by KV heads; hidden size divisible by heads where both known
    g = reg.filter(pl.col("n_heads").is_not_null(), pl.col("n_kv_heads").is_not_null())
    assert ((g["n_heads"] % g["n_kv_heads"]) == 0).all()
    assert resolve_model("LlaMA2_7B", reg) == "meta-llama/Llama-2-7b-hf"
    assert resolve_model("qwen3-8b", reg) == "Qwen/Qwen3-8B" and resolve_model("no-such-model", reg) is None


def test_identify_model_from_config(td):
    reg = td.registry
    qwen3_8b = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 36,
                "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 151936}
    hit = identify_model(qwen3_8b, reg)
    assert hit.family == "qwen3" and hit.exact and set(hit.candidates) == {"Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"}
    mixtral = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 32,
               "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}
    assert identify_model(mixtral, reg).family == "mixtral"
    new_qwen3 = {**qwen3_8b, "num_hidden_layers": 99}  # unseen size: family from model_type, not exact
    hit = identify_model(new_qwen3, reg)
    assert hit.family == "qwen3" and not hit.exact and hit.model is None


def test_quant_names_are_normalised():
    assert parse_quant_name("q4_k_m").quant == "Q4_K_M"
    assert parse_quant_name("Q4_K").quant == "Q4_K_M"  # llama-quantize alias
    g = parse_quant_name("gptq-w4-g128")
    assert (g.quant, g.quant_family, g.weight_bits, g.group_size) == ("GPTQ-W4-g128", "gptq", 4.0, 128)
    assert parse_quant_name("RTN-W3-perchannel").group_size == -1
    with pytest.raises(UsageError):
        parse_quant_name("Q4_K_WHATEVER")
    assert published_quant("W4G-1_RTN").quant == "RTN-W4-perchannel"
    assert published_quant("W2G128_GPTQ*").quant == "GPTQ-W2-g128"
    assert published_quant("W3A16 g128 AWQ").quant == "AWQ-W3-g128"
    pc = published_quant("W4 per-channel sym RTN (repo label Q4_0)")  # not llama.cpp's Q4_0
    assert pc.quant == "RTN-W4-perchannel" and pc.quant_family == "rtn"
    assert published_quant("Q4_K_S_AutoRound").method == "autoround"
    assert published_quant("iq2_XXS").quant == "IQ2_XXS"


def test_curation_rules_hold_in_the_data(td):
    m = td.measurements
    gguf = m.filter(pl.col("quant_family").is_in(["gguf-k", "gguf-i", "gguf-legacy"]))
    assert set(gguf["quant"]) <= set(LLAMA_CPP_PRESETS)
    # per-channel RTN of transformerx is never filed as llama.cpp Q4_0
    assert m.filter(pl.col("quant_as_published").str.contains("repo label"), pl.col("quant_family") != "rtn").height == 0
    # tasks are normalised names from the task table, categories agree with it
    for task, cat in m.select("task", "task_category").unique().iter_rows():
        assert TASKS[task].category == cat
    # second-hand rows are flagged; llama.cpp presets that need an imatrix never say 'no'/'unknown'
    assert m.filter(pl.col("source").str.to_lowercase().str.contains("secondhand"), ~pl.col("secondhand")).height == 0
    need = m.filter(pl.col("method") == "llama.cpp", pl.col("quant").is_in(["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"]))
    assert need.height > 0 and set(need["imatrix"]) == {"yes"}
    # MMLU macro-averages and the avg6 aggregate were excluded, not kept
    assert set(td.excluded["reason_code"]) >= {"alternative_aggregate", "aggregate_of_kept_rows", "no_baseline"}
    d = td.distortion
    assert set(d["imatrix"]) <= {"yes", "no", "unknown"}
    ppl = d.filter(pl.col("metric") == "ppl", pl.col("baseline").is_not_null())
    assert (ppl["relative_change_pct"] - (ppl["value"] - ppl["baseline"]) / ppl["baseline"] * 100).abs().max() < 1e-9


def test_flag_rules():
    row = {"score_unit": "percent", "baseline_score": 27.0, "unreliable": False, "unreliable_reason": None}
    flag_near_chance(row, 25.0)
    assert row["unreliable"] and "chance" in row["unreliable_reason"]
    ok = {"score_unit": "percent", "baseline_score": 45.0, "unreliable": False, "unreliable_reason": None}
    flag_near_chance(ok, 25.0)
    assert not ok["unreliable"]
    run = {"model": "m", "quant": "Q4_K_M", "method": "llama.cpp", "imatrix": "no", "task": "GSM8K",
           "metric": "exact_match", "n_shot": 5, "source": "s", "source_sha256": "h", "source_file": "f",
           "baseline_score": 70.0, "unreliable": False, "unreliable_reason": None}
    strict = {**run, "metric_filter": "strict-match", "quant_score": 20.0}
    flex = {**run, "metric_filter": "flexible-extract", "quant_score": 66.0}
    mild = {**run, "metric_filter": "strict-match", "quant_score": 60.0, "source": "other"}
    mild_flex = {**mild, "metric_filter": "flexible-extract", "quant_score": 66.0}
    assert flag_format_failures([strict, flex, mild, mild_flex]) == 1
    assert strict["unreliable"] and not flex["unreliable"] and not mild["unreliable"]


def test_validate_frame_rejects_duplicate_row_ids(td):
    m = td.measurements.head(3)
    with pytest.raises(SchemaError, match="row_id"):
        validate_frame(pl.concat([m, m.head(1)]), "measurements")


ADD_M = "training_data/raw/published/additions-2026-12/measurements.csv"
ADD_D = "training_data/raw/published/additions-2026-12/distortion.csv"


def test_additions_keep_the_published_numbers_and_provenance(td):
    raws = raw_rows("additions-2026-12/measurements.csv")
    m = td.measurements.filter(pl.col("source_file") == ADD_M)
    assert m.height == len(raws) == 405
    assert set(m["ingested_at"]) == {ADDITIONS_SNAPSHOT_DATE} and m["source_sha256"].n_unique() == 1
    for r in m.iter_rows(named=True):
        raw = raws[r["source_row"] - 1]
        assert r["baseline_score"] == pytest.approx(float(raw["baseline_score"]))
        assert r["quant_score"] == pytest.approx(float(raw["quant_score"]))
        assert r["model_as_published"] == raw["model"] and r["quant_as_published"] == raw["quant_as_published"]
        assert r["source"] == raw["source"] and r["source_location"] == raw["where"]
        assert r["params_b"] is not None  # every addition model has a registry row with a size
    # quant families: presets, community/AutoScheme mixes, auto-round-made presets
    fam = dict(m.select("quant", "quant_family").unique().iter_rows())
    assert fam["Q2_K_L"] == fam["UD-IQ2_M"] == "gguf-mixed" and fam["Q4_K_M"] == "gguf-k"
    assert m.filter(pl.col("quant").str.starts_with("AUTOSCHEME"), pl.col("quant_family") != "gguf-mixed").height == 0
    ar = m.filter(pl.col("quant_as_published").str.starts_with("auto_round Q"))
    assert ar.height == 6 and set(ar["method"]) == {"autoround-rtn"} and set(ar["quant"]) == {"Q3_K_M", "Q4_K_M"}
    assert set(m.filter(pl.col("note").str.contains("Ollama library"),
                        pl.col("quant_family") == "gguf-k")["imatrix"]) == {"unknown"}
    # flags the source data implies
    tqa = m.filter(pl.col("task") == "TruthfulQA-gen")
    assert tqa.height == 16 and tqa["unreliable"].all() and TASKS["TruthfulQA-gen"].category == "knowledge"
    q3 = m.filter(pl.col("model") == "Qwen/Qwen3-30B-A3B")
    assert q3.height == 6 and q3["unreliable"].all()
    assert m.filter(pl.col("quant").str.starts_with("AUTOSCHEME"))["unreliable"].sum() == 0
    pe = m.filter(pl.col("task").str.starts_with("PE-Bench"))
    assert pe.height == 148 and set(pe["task_category"]) == {"code"}
    # a PE-Bench row is flagged only when its baseline is near chance, never for being a single run
    for r in pe.filter(pl.col("unreliable")).iter_rows(named=True):
        assert "chance" in r["unreliable_reason"] and r["baseline_score"] < 5.0
    assert pe.filter(~pl.col("unreliable")).height > 50


def test_q8_0_baseline_rows_are_kept_as_preset_pairs(td):
    raws = raw_rows("additions-2026-12/measurements.csv")
    q8 = [i for i, r in enumerate(raws, start=1) if r["baseline_precision"].startswith("Q8_0")]
    m = td.measurements.filter(pl.col("source_file") == ADD_M, pl.col("source_row").is_in(q8))
    assert m.height == len(q8) == 183
    assert set(m["baseline_precision"]) == {"Q8_0"}
    for r in m.iter_rows(named=True):  # flagged, if at all, for other reasons only
        assert "Q8_0" not in (r["unreliable_reason"] or "") and "16-bit" not in (r["unreliable_reason"] or "")
    mmlu = m.filter(pl.col("model") == "mistralai/Mistral-7B-Instruct-v0.3", pl.col("task") == "MMLU", pl.col("quant") == "Q4_K_M")
    assert mmlu.height == 1 and not mmlu["unreliable"][0]
    assert mmlu["relative_drop_pct"][0] == pytest.approx((59.0 - 57.9) / 59.0 * 100)
    old = td.measurements.filter(pl.col("source_file") == "training_data/raw/published/measurements.csv",
                                 pl.col("baseline_precision").is_in(["Q8_0", "Q5_K_M"]))
    assert old.height == 10 and not old["unreliable"].any()


def test_binomial_stderr_is_imputed_from_n(td):
    raws = raw_rows("additions-2026-12/measurements.csv")
    m = td.measurements.filter(pl.col("source_file") == ADD_M)
    for r in m.iter_rows(named=True):
        raw = raws[r["source_row"] - 1]
        if raw["baseline_stderr"] or raw["quant_stderr"]:
            if raw["baseline_stderr"]:
                assert r["baseline_stderr"] == pytest.approx(float(raw["baseline_stderr"]))
        elif raw["n"].strip():
            n = int(re.match(r"\d+", raw["n"]).group(0))
            for side in ("baseline", "quant"):
                p = r[f"{side}_score"] / 100.0
                assert r[f"{side}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n) * 100, abs=1e-5)
            assert f"stderr imputed as binomial from n={n} items" in r["note"]
        else:
            assert r["baseline_stderr"] is None and r["quant_stderr"] is None
    mmlu = m.filter(pl.col("model") == "Qwen/Qwen2.5-7B-Instruct", pl.col("task") == "MMLU", pl.col("quant") == "Q2_K")
    assert mmlu["baseline_stderr"][0] == pytest.approx(math.sqrt(0.74 * 0.26 / 285) * 100, abs=1e-5)
    gsm = m.filter(pl.col("task") == "GSM8K", pl.col("metric_filter") == "flexible-extract")
    assert gsm["baseline_stderr"][0] == 1.0 and gsm["quant_stderr"][0] == pytest.approx(
        math.sqrt(0.8089 * 0.1911 / 1319) * 100, abs=1e-5)


def test_task_table_has_standard_test_set_sizes():
    assert TASKS["GSM8K"].n_items == 1319 and TASKS["MMLU"].n_items == 14042 and TASKS["HumanEval"].n_items == 164
    assert TASKS["PE-Bench-Python-100"].n_items == 100 and TASKS["PE-Bench-Rust-100"].category == "code"
    assert TASKS["lm-eval avg10"].n_items is None and TASKS["MT-Bench turn 1"].n_items is None
    assert all(t.n_items is None or (isinstance(t.n_items, int) and t.n_items > 0) for t in TASKS.values())


def test_additions_distortion_rules(td):
    d = td.distortion.filter(pl.col("source_file") == ADD_D)
    assert d.height == 36
    ks = d.filter(pl.col("quant") == "IQ4_KS")
    assert ks.height == 7 and set(ks["quant_family"]) == {"gguf-ik"}
    qerr = d.filter(pl.col("source").str.contains("ik_llama.cpp PR #83"))
    assert (qerr["baseline"] == 1.0).all() and not qerr["unreliable"].any()
    row = qerr.filter(pl.col("model") == "meta-llama/Llama-3.1-8B", pl.col("quant") == "IQ4_XS")
    assert row["relative_change_pct"][0] == pytest.approx(2.82)
    nobase = d.filter(pl.col("source").str.contains("PR #5196"))
    assert nobase.height == 18 and nobase["baseline"].is_null().all() and nobase["unreliable"].all()
    assert nobase["relative_change_pct"].is_null().all()


def test_published_quant_additions_labels():
    a = published_quant("AutoScheme 2.5b mixed[q2,q3,q4,q6] iters 200")
    b = published_quant("AutoScheme 2.5 bits mixed[q2,q3,q4,q6] tuning iters 200")
    assert a == b and a.quant_family == "gguf-mixed" and a.method == "autoround"
    assert published_quant("AutoScheme 3.5b mixed[q2,q3,q4] lm_head Q6K").method == "autoround-rtn"
    ud = published_quant("UD-IQ2_M")
    assert (ud.quant, ud.quant_family, ud.method) == ("UD-IQ2_M", "gguf-mixed", "unsloth-dynamic")
    assert published_quant("IQ4_KS").quant_family == "gguf-ik"
