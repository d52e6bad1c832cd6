"""`quantpredict ingest`: lm-eval v0.4 JSON, llama-perplexity logs and schema CSVs, written here in their
real formats, round-trip into a training-data folder; malformed inputs change nothing."""

from __future__ import annotations

import hashlib
import json
import os

import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import cli
from predictor.data import load_training_data
from predictor.data.ingest import detect_kind, ingest
from predictor.data.llama_perplexity import read_perplexity_log
from predictor.data.lm_eval import read_lm_eval_results
from predictor.data.testing import (
    DEFAULT_KLD,
    DEFAULT_TASKS,
    write_kld_log,
    write_lm_eval_results,
    write_perplexity_log,
)
from predictor.errors import InputFileError, MismatchError, SchemaError, UsageError

TODAY = "2030-01-02"
MODEL = "Qwen/Qwen3-8B"
Q4 = {"arc_challenge": {"acc,none": 0.5401, "acc_norm,none": 0.5702},
      "gsm8k": {"exact_match,strict-match": 0.7311, "exact_match,flexible-extract": 0.7455},
      "mmlu": {"acc,none": 0.6399}}


def snapshot(directory) -> dict[str, bytes]:
    return {p: open(os.path.join(directory, p), "rb").read() for p in sorted(os.listdir(directory))} if os.path.isdir(directory) else {}


@pytest.fixture
def runs(tmp_path):
    base = write_lm_eval_results(tmp_path / "base.json")
    q4 = write_lm_eval_results(tmp_path / "q4km.json", Q4)
    return base, q4


def test_lm_eval_round_trip_into_empty_folder(tmp_path, runs):
    base, q4 = runs
    out = tmp_path / "td"
    report = ingest([f"q4_k_m={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    assert report.written and report.added == {"measurements": 5, "distortion": 0}
    td = load_training_data(out)  # the folder started empty and is now complete
    m = td.measurements
    # The MMLU group row stands for its subtasks; the subgroup and subtask are skipped.
    assert set(zip(m["task"], m["metric"], m["metric_filter"])) == {
        ("ARC-Challenge", "acc", "none"), ("ARC-Challenge", "acc_norm", "none"), ("MMLU", "acc", "none"),
        ("GSM8K", "exact_match", "strict-match"), ("GSM8K", "exact_match", "flexible-extract")}
    assert m["quant"].unique().to_list() == ["Q4_K_M"] and m["quant_as_published"][0] == "q4_k_m"
    assert m["family"].unique().to_list() == ["qwen3"] and m["origin"].unique().to_list() == ["ingested"]
    raw_b, raw_q = json.loads(base.read_text()), json.loads(q4.read_text())
    for row in m.iter_rows(named=True):
        tid = {"ARC-Challenge": "arc_challenge", "GSM8K": "gsm8k", "MMLU": "mmlu"}[row["task"]]
        key = f"{row['metric']},{row['metric_filter']}"
        b, q = raw_b["results"][tid][key], raw_q["results"][tid][key]
        assert row["baseline_score"] == pytest.approx(100 * b) and row["quant_score"] == pytest.approx(100 * q)
        assert row["relative_drop_pct"] == pytest.approx((b - q) / b * 100)
        se = raw_q["results"][tid][f"{row['metric']}_stderr,{row['metric_filter']}"]
        assert row["quant_stderr"] == pytest.approx(100 * se)
        assert row["n_shot"] == raw_q["n-shot"].get(tid, row["n_shot"])
        # provenance: file name, its hash, the date
        assert row["source_file"] == "q4km.json"
        assert row["source_sha256"] == hashlib.sha256(q4.read_bytes()).hexdigest()
        assert row["ingested_at"] == TODAY and "base.json" in row["source_location"]
    assert m.filter(pl.col("task") == "GSM8K")["n_shot"].to_list() == [5, 5]
    assert td.registry.height > 50  # the repository registry was copied into the new folder


def test_reingest_adds_nothing_and_leaves_files_alone(tmp_path, runs):
    base, q4 = runs
    out = tmp_path / "td"
    ingest([f"Q4_K_M={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    before = snapshot(out)
    again = ingest([f"Q4_K_M={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    assert again.added["measurements"] == 0 and again.duplicates["measurements"] == 5 and not again.written
    assert snapshot(out) == before


def test_strict_format_failure_is_flagged(tmp_path):
    base = write_lm_eval_results(tmp_path / "base.json")
    q = {**Q4, "gsm8k": {"exact_match,strict-match": 0.12, "exact_match,flexible-extract": 0.74}}
    q3 = write_lm_eval_results(tmp_path / "q3.json", q)
    rep = ingest([f"Q3_K_M={q3}"], baseline=base, model=MODEL, out_dir=tmp_path / "td", today=TODAY)
    g = rep.new_rows["measurements"].filter(pl.col("task") == "GSM8K")
    strict = g.filter(pl.col("metric_filter") == "strict-match").row(0, named=True)
    flexible = g.filter(pl.col("metric_filter") == "flexible-extract").row(0, named=True)
    assert strict["unreliable"] and "format failure" in strict["unreliable_reason"]
    assert not flexible["unreliable"]


def test_malformed_inputs_write_nothing(tmp_path, runs):
    base, q4 = runs
    out = tmp_path / "td"
    ingest([f"Q4_K_M={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    before = snapshot(out)
    truncated = tmp_path / "q3.json"
    truncated.write_text(q4.read_text()[:200])
    v03 = tmp_path / "v03.json"
    v03.write_text(json.dumps({"results": {"hellaswag": {"acc": 0.5, "acc_stderr": 0.01}}, "versions": {"hellaswag": 0}}))
    notlm = tmp_path / "other.json"
    notlm.write_text(json.dumps({"scores": [1, 2]}))
    badval = tmp_path / "badval.json"
    data = json.loads(q4.read_text())
    data["results"]["mmlu"]["acc,none"] = "high"
    badval.write_text(json.dumps(data))
    cases = [(truncated, "not valid JSON"), (v03, "v0.3"), (notlm, "no 'results' object"), (badval, "not a finite number")]
    for bad, problem in cases:
        # a good file next to the bad one must not be written either
        q5 = write_lm_eval_results(tmp_path / "q5.json", Q4)
        with pytest.raises(InputFileError) as exc:
            ingest([f"Q5_K_M={q5}", f"Q3_K_M={bad}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
        msg = str(exc.value)
        assert problem in msg and str(bad) in msg and "\n" not in msg
        assert snapshot(out) == before


def test_run_mismatches_and_unknown_tasks(tmp_path):
    base = write_lm_eval_results(tmp_path / "base.json")
    shots = write_lm_eval_results(tmp_path / "shots.json", Q4, n_shot={"gsm8k": 8})
    with pytest.raises(MismatchError, match="8-shot"):
        ingest([f"Q4_K_M={shots}"], baseline=base, model=MODEL, out_dir=tmp_path / "td")
    tasks = {"my_new_task": {"acc,none": 0.61}}
    b2 = write_lm_eval_results(tmp_path / "b2.json", tasks, with_subtasks=False)
    q2 = write_lm_eval_results(tmp_path / "q2.json", {"my_new_task": {"acc,none": 0.55}}, with_subtasks=False)
    with pytest.raises(UsageError, match="--task-category my_new_task=CATEGORY"):
        ingest([f"Q4_K_M={q2}"], baseline=b2, model=MODEL, out_dir=tmp_path / "td")
    rep = ingest([f"Q4_K_M={q2}"], baseline=b2, model=MODEL, out_dir=tmp_path / "td",
                 task_categories={"my_new_task": "creative"}, dry_run=True)
    assert rep.new_rows["measurements"]["task_category"].to_list() == ["creative"] and not rep.written
    assert not (tmp_path / "td").exists()
    with pytest.raises(UsageError, match="unknown quant name"):
        ingest([f"Q4_K_XL_WRONG={q2}"], baseline=b2, model=MODEL, out_dir=tmp_path / "td",
               task_categories={"my_new_task": "creative"})
    with pytest.raises(UsageError, match="--baseline"):
        ingest([f"Q4_K_M={q2}"], model=MODEL, out_dir=tmp_path / "td")


def test_unknown_model_is_kept_with_a_warning(tmp_path, runs):
    base, q4 = runs
    rep = ingest([f"Q4_K_M={q4}"], baseline=base, model="someone/NewModel-3B", out_dir=tmp_path / "td", today=TODAY)
    m = rep.new_rows["measurements"]
    assert m["model"].unique().to_list() == ["someone/NewModel-3B"] and m["family"].null_count() == m.height
    assert any("not in registry.csv" in w for w in rep.warnings)


def test_perplexity_logs_plain_and_kld(tmp_path):
    f16 = write_perplexity_log(tmp_path / "f16.log", ppl=6.2332, ppl_stderr=0.03783, file_type="F16")
    q4 = write_perplexity_log(tmp_path / "q4.log", ppl=6.4071, ppl_stderr=0.03912)
    kld = write_kld_log(tmp_path / "kld.log")
    assert detect_kind(q4) == "perplexity" and detect_kind(kld) == "perplexity"
    out = tmp_path / "td"
    rep = ingest([f"Q4_K_M={q4}", str(kld)], baseline=f16, model=MODEL, out_dir=out, today=TODAY,
                 imatrix="yes", imatrix_note="wikitext 1m tokens", dataset="wikitext-2 test")
    d = load_training_data(out).distortion
    assert rep.added["distortion"] == d.height
    plain = d.filter(pl.col("source_file") == "q4.log").row(0, named=True)
    assert (plain["metric"], plain["value"], plain["value_stderr"], plain["baseline"]) == ("ppl", 6.4071, 0.03912, 6.2332)
    assert plain["relative_change_pct"] == pytest.approx((6.4071 - 6.2332) / 6.2332 * 100)
    assert plain["context_length"] == 512 and plain["imatrix"] == "yes" and plain["dataset"] == "wikitext-2 test"
    k = {r["metric"]: r for r in d.filter(pl.col("source_file") == "kld.log").iter_rows(named=True)}
    assert k["ppl"]["quant"] == "Q4_K_M"  # from the log's "file type = Q4_K - Medium"
    assert (k["ppl"]["value"], k["ppl"]["baseline"]) == (DEFAULT_KLD["ppl"][0], DEFAULT_KLD["ppl_base"][0])
    assert (k["kld_mean"]["value"], k["kld_mean"]["value_stderr"]) == DEFAULT_KLD["kld_mean"]
    assert k["delta_ppl"]["value"] == DEFAULT_KLD["diff"][0] and k["ppl_correlation_pct"]["value"] == DEFAULT_KLD["cor"]
    assert (k["same_top_p_pct"]["value"], k["same_top_p_pct"]["value_stderr"]) == DEFAULT_KLD["same_top"]
    assert (k["rms_dp_pct"]["value"], k["mean_dp_pct"]["value"]) == (DEFAULT_KLD["rms_dp"][0], DEFAULT_KLD["dp_mean"][0])
    expected_kld = {"kld_max": "Maximum", "kld_p99_9": "99.9%", "kld_p99": "99.0%", "kld_median": "Median",
                    "kld_p0_1": " 0.1%", "kld_min": "Minimum"}
    for metric, label in expected_kld.items():
        assert k[metric]["value"] == DEFAULT_KLD["kld"][label]
    for metric, label in {"dp_p1_pct": " 1.0%", "dp_p75_pct": "75.0%", "dp_max_pct": "Maximum"}.items():
        assert k[metric]["value"] == DEFAULT_KLD["dp"][label]


def test_broken_perplexity_logs(tmp_path):
    cases = {
        "truncated.log": (lambda p: write_kld_log(p, truncate_after="Mean    KLD"), "truncated"),
        "nofinal.log": (lambda p: p.write_text(open(write_perplexity_log(p)).read().replace("Final estimate", "Estimate")),
                        "no 'Final estimate"),
        "nan.log": (lambda p: write_perplexity_log(p, ppl=float("nan")), "is nan"),
    }
    for name, (make, problem) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(InputFileError, match=problem):
            read_perplexity_log(path)
    binary = tmp_path / "model.gguf"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(InputFileError, match="binary"):
        ingest([f"Q4_K_M={binary}"], model=MODEL, out_dir=tmp_path / "td")
    assert not (tmp_path / "td").exists()


def test_lm_eval_reader_keeps_na_stderr_as_null(tmp_path):
    path = write_lm_eval_results(tmp_path / "r.json", {"hellaswag": {"acc,none": 0.6}}, with_subtasks=False)
    data = json.loads(path.read_text())
    data["results"]["hellaswag"]["acc_stderr,none"] = "N/A"
    path.write_text(json.dumps(data))
    run = read_lm_eval_results(path)
    assert [(s.task_id, s.metric, s.filter, s.value, s.stderr) for s in run.scores] == [("hellaswag", "acc", "none", 0.6, None)]
    assert run.model_name == "Qwen/Qwen3-8B" and run.lm_eval_version == "0.4.8"


def test_csv_round_trip_and_schema_errors(tmp_path):
    out = tmp_path / "td"
    good = tmp_path / "rows.csv"
    good.write_text(
        "model,quant,task,metric,n_shot,baseline_score,quant_score,imatrix,source\n"
        "Qwen3-8B,q4_k_m,hellaswag,acc_norm,0,78.5,77.9,yes,my lab run 2030-01\n"
        "Qwen3-8B,GPTQ-W4-g128,MMLU,acc,5,74.7,69.3,no,my lab run 2030-01\n"
    )
    dist = tmp_path / "dist.csv"
    dist.write_text("model,quant,metric,value,baseline,dataset\nQwen3-8B,Q6_K,ppl,9.81,9.72,wikitext-2 test\n")
    assert detect_kind(good) == "csv"
    rep = ingest([str(good), str(dist)], out_dir=out, today=TODAY)
    assert rep.added == {"measurements": 2, "distortion": 1}
    td = load_training_data(out)
    m = {r["quant"]: r for r in td.measurements.iter_rows(named=True)}
    assert set(m) == {"Q4_K_M", "GPTQ-W4-g128"}
    assert m["Q4_K_M"]["task"] == "HellaSwag" and m["Q4_K_M"]["task_category"] == "reasoning"
    assert m["GPTQ-W4-g128"]["group_size"] == 128 and m["GPTQ-W4-g128"]["quant_family"] == "gptq"
    assert m["Q4_K_M"]["relative_drop_pct"] == pytest.approx((78.5 - 77.9) / 78.5 * 100)
    assert m["Q4_K_M"]["model"] == MODEL and m["Q4_K_M"]["source_row"] == 1 and m["GPTQ-W4-g128"]["source_row"] == 2
    d = td.distortion.row(0, named=True)
    assert d["relative_change_pct"] == pytest.approx((9.81 - 9.72) / 9.72 * 100)
    before = snapshot(out)
    for header, problem in [("model,quant,task,metric,baseline_score", "missing required columns ['quant_score']"),
                            ("model,quant,task,metric,baseline_score,quant_score,colour", "extra columns ['colour']")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(header + "\n" + ",".join(["Qwen3-8B", "Q4_K_M", "MMLU", "acc", "70", "69", "red"][: header.count(",") + 1]) + "\n")
        with pytest.raises(SchemaError) as exc:
            ingest([str(bad)], out_dir=out)
        assert problem in str(exc.value)
    bad = tmp_path / "badnum.csv"
    bad.write_text("model,quant,task,metric,baseline_score,quant_score\nQwen3-8B,Q4_K_M,MMLU,acc,seventy,69\n")
    with pytest.raises(SchemaError, match="baseline_score = 'seventy'"):
        ingest([str(bad)], out_dir=out)
    assert snapshot(out) == before


def test_failed_write_leaves_tables_intact(tmp_path, runs, monkeypatch):
    base, q4 = runs
    out = tmp_path / "td"
    ingest([f"Q4_K_M={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    before = snapshot(out)
    kld = write_kld_log(tmp_path / "kld.log")
    q3 = write_lm_eval_results(tmp_path / "q3.json", Q4)
    calls = {"n": 0}
    real = pl.DataFrame.write_csv

    def failing(self, path, *a, **k):  # the second table write fails half-way
        calls["n"] += 1
        if calls["n"] == 2:
            open(path, "w").write("partial")
            raise OSError("disk full")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pl.DataFrame, "write_csv", failing)
    with pytest.raises(OSError, match="disk full"):
        ingest([f"Q3_K_M={q3}", str(kld)], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    assert snapshot(out) == before  # no table replaced, no temporary file left behind


def test_cli_ingest(tmp_path, runs):
    base, q4 = runs
    out = tmp_path / "td"
    runner = CliRunner()
    ok = runner.invoke(cli, ["ingest", "--model", MODEL, "--baseline", str(base), f"Q4_K_M={q4}", "-o", str(out),
                             "--format", "json"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout)
    assert payload["added"]["measurements"] == 5 and payload["written"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    fail = runner.invoke(cli, ["ingest", "--model", MODEL, "--baseline", str(base), f"Q4_K_M={bad}", "-o", str(out)])
    assert fail.exit_code == 2
    assert fail.stderr.startswith("error: ") and fail.stderr.count("\n") == 1 and "bad.json" in fail.stderr
    table = runner.invoke(cli, ["ingest", "--model", MODEL, "--baseline", str(base), f"Q4_K_M={q4}", "-o", str(out)])
    assert table.exit_code == 0 and "0 new rows, 5 already present" in table.stdout


def test_default_tasks_cover_known_lm_eval_ids():
    # the fixture's task ids must be ones ingest recognises, or the round-trip tests test nothing
    from predictor.data.tasks import task_by_lm_eval_id

    assert all(task_by_lm_eval_id(t) is not None for t in DEFAULT_TASKS)


def test_old_lm_eval_layout_without_group_subtasks(tmp_path):
    path = write_lm_eval_results(tmp_path / "r.json")
    data = json.loads(path.read_text())
    del data["group_subtasks"]  # lm-eval 0.4.0-0.4.2 wrote only "groups"
    path.write_text(json.dumps(data))
    tasks = {s.task_id for s in read_lm_eval_results(path).scores}
    assert tasks == {"arc_challenge", "gsm8k", "mmlu"}


def test_ingest_refreshes_a_readme_summary(tmp_path, runs):
    from predictor.data.curate import summary_markdown

    base, q4 = runs
    out = tmp_path / "td"
    out.mkdir()
    (out / "README.md").write_text("# mine\n<!-- BEGIN schema (generated by python -m predictor.data.curate) -->\n"
                                   "<!-- END schema -->\n<!-- BEGIN summary (generated by python -m predictor.data.curate) -->\n"
                                   "<!-- END summary -->\n")
    ingest([f"Q4_K_M={q4}"], baseline=base, model=MODEL, out_dir=out, today=TODAY)
    td = load_training_data(out)
    assert summary_markdown(td.measurements, td.distortion, td.excluded, td.registry) in (out / "README.md").read_text()


def test_scores_without_baseline_are_skipped_with_a_warning(tmp_path):
    base = write_lm_eval_results(tmp_path / "base.json")
    q = write_lm_eval_results(tmp_path / "q.json", {**Q4, "hellaswag": {"acc,none": 0.6}})
    rep = ingest([f"Q4_K_M={q}"], baseline=base, model=MODEL, out_dir=tmp_path / "td", dry_run=True)
    assert rep.added["measurements"] == 5 and any("hellaswag acc,none" in w for w in rep.warnings)
