"""The self-trained family: byte tokenizer = llama.cpp's, export = llama.cpp's forward pass, held-out splits."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from predictor.family.tokenizer import BOS_ID, N_VOCAB, decode, encode

torch = pytest.importorskip("torch")

from predictor.family.data import Corpus, DataConfig, heldout_math_questions, math_problem  # noqa: E402
from predictor.family.model import FamilyLM, ModelConfig, count_params  # noqa: E402
from predictor.family.train import RunConfig, TrainConfig, train_run  # noqa: E402

TEXT = "It was  the best of times,\n\tdef f(x):\n    return x * 2  # café → ✓\nQ: What is 12 + 7?\nA: 19\n"


def _tiny_run(tmp_path, **train):
    cfg = RunConfig(name="tiny", seed=3,
                    model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, n_ctx=48).validate(
                        kquant_sizes=False),
                    train=TrainConfig(tokens=6 * 4 * 48, batch_size=4, lr=3e-3, log_every=2, **train))
    prose = ["The sea was calm, and the ship sailed on through the night.\n" * 20]
    code = ["def add(a, b):\n    return a + b\n\nclass A:\n    pass\n" * 20]
    corpus = Corpus.from_texts({"prose": prose, "code": code}, {"prose": prose, "code": code},
                               math_exclude={"What is 12 + 7?"})
    rec = train_run(cfg, tmp_path / "run", corpus=corpus, threads=1)
    return cfg, rec


def test_encode_decode_roundtrip():
    ids = encode(TEXT)
    assert ids.max() < N_VOCAB and (ids != encode(" ")[0]).sum() == len(TEXT.encode()) - TEXT.count(" ")
    assert decode(ids) == TEXT


def test_math_problems_have_exact_answers():
    rng = np.random.default_rng(0)
    for _ in range(300):
        q, a = math_problem(rng)
        m = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\?", q)
        if m:
            x, op, y = int(m[1]), m[2], int(m[3])
            want = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
            assert a == want and (op != "/" or x % y == 0)
        else:
            assert a >= 0 and q.endswith("?")


def test_heldout_math_includes_measure_problems():
    from dataclasses import replace

    from predictor.family.data import _StubEngine
    from predictor.measure.tasks import build_arithmetic, get_suite

    held = heldout_math_questions()
    rows = build_arithmetic(_StubEngine(), replace(get_suite("standard"), seed=0))
    qs = [r["prefix"][-1][3:].split("\n")[0] for r in rows]
    assert qs and all(q in held for q in qs)
    corpus = Corpus.from_texts({}, {}, math_exclude=held)
    batch = corpus.batch({"math": 1.0}, seed=0, step=0, batch_size=16, n_ctx=512)
    trained = set(re.findall(r"Q: (.*?)\n", "".join(decode(r) for r in batch)))
    assert trained and not trained & held


def test_train_resume_export_matches_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from predictor.family.export import llama_cpp_logits, llama_cpp_tokenize

    cfg, rec = _tiny_run(tmp_path)
    assert rec["steps"] == cfg.n_steps == 6 and rec["tokens_seen"] == 6 * 4 * 48
    assert rec["n_params"] == count_params(cfg.model)
    log = [json.loads(line) for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    assert log[-1]["step"] == 6 and log[0]["loss"] > log[-1]["loss"]
    gguf_path = tmp_path / "run" / "model.gguf"
    # tokenizer: llama.cpp must produce exactly our ids (BOS + bytes, spaces as "▁")
    ids = [BOS_ID] + encode(TEXT).tolist()
    assert llama_cpp_tokenize(gguf_path, TEXT) == ids
    # weights: llama.cpp's F32 forward pass equals the torch model restored from the checkpoint
    model = FamilyLM(cfg.model)
    model.load_state_dict(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor([ids[:40]]))[0].numpy()
    got = llama_cpp_logits(gguf_path, ids[:40])
    assert got.shape == want.shape == (40, N_VOCAB)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    # re-export from the checkpoint: the same tensors
    import gguf

    from predictor.family.export import export_checkpoint

    again = export_checkpoint(tmp_path / "run", tmp_path / "again.gguf")
    a, b = gguf.GGUFReader(gguf_path), gguf.GGUFReader(again)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))


def test_resume_gives_the_same_model(tmp_path):
    cfg = RunConfig(name="r", seed=5, model=ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                                        n_ctx=16).validate(kquant_sizes=False),
                    train=TrainConfig(tokens=8 * 2 * 16, batch_size=2, log_every=1, precision="fp32"))
    corpus = Corpus.from_texts({"prose": ["abc def ghi\n" * 30]}, {}, math_exclude=set())
    cfg = RunConfig(**{**cfg.__dict__, "data": DataConfig(mix={"prose": 1.0})})
    full = train_run(cfg, tmp_path / "a", corpus=corpus)
    part = train_run(cfg, tmp_path / "b", corpus=corpus, max_steps=3)  # stop early, as a killed run would
    assert part["finished"] is False and not (tmp_path / "b" / "model.gguf").exists()
    resumed = train_run(cfg, tmp_path / "b", corpus=corpus)
    assert resumed["steps"] == full["steps"] == 8
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_kquant_sizes_enforced():
    from predictor.errors import UsageError

    with pytest.raises(UsageError, match="multiples of 256"):
        RunConfig.from_dict({"name": "x", "model": {"d_model": 320, "n_heads": 5, "n_kv_heads": 1, "d_ff": 768}})


def test_report_joins_records_and_measurements(tmp_path):
    from predictor.family.report import build_family_table

    rec = {"name": "m1", "n_params": 2_000_000, "tokens_seen": 4_000_000, "tokens_per_param": 2.0,
           "config": {"train": {"lr": 0.002, "weight_decay": 0.1}}, "train_seconds": 10.0,
           "final_train_loss": 1.5, "final_val_loss": {"prose": 1.7, "math": 0.4},
           "outliers": {"max_abs_over_rms": 6.0, "mean_excess_kurtosis": 0.2, "massive_activation_ratio": 17.0}}
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "m1.json").write_text(json.dumps(rec))
    (tmp_path / "distortion.csv").write_text(
        "model,quant,imatrix,metric,dataset,value\n"
        "m1,Q4_K_M,no,kld_mean,Project Gutenberg novels,0.003\n"
        "m1,Q4_K_M,yes,kld_mean,Project Gutenberg novels,0.002\n"
        "m1,Q4_K_M,no,ppl,Project Gutenberg novels,5.9\n")
    (tmp_path / "measurements.csv").write_text(
        "model,quant,imatrix,task,baseline_score,quant_score\nm1,Q2_K,no,Arithmetic,40.0,25.0\n")
    (tmp_path / "runs.csv").write_text("model,seconds_quantize,seconds_eval\nm1,1.5,10\nm1,0.5,12\n")
    row = build_family_table(tmp_path / "rec", tmp_path).to_dicts()[0]
    assert row["kld_prose_Q4_K_M"] == 0.003 and row["kld_prose_Q2_K"] is None
    assert row["arith_base"] == 40.0 and row["arith_Q2_K"] == 25.0 and row["measure_s"] == 24.0
    assert build_family_table(tmp_path / "rec", tmp_path, imatrix="yes").to_dicts()[0]["kld_prose_Q4_K_M"] == 0.002


def test_report_predicted_kld_beside_measured(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli
    from predictor.family.report import REPORT_PRESETS, predicted_kld_table
    from predictor.fixtures.gguf import write_tiny_gguf

    rec = {"name": "m1", "n_params": 700_000, "tokens_seen": 2_800_000}
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "m1.json").write_text(json.dumps(rec))
    (tmp_path / "rec" / "m2.json").write_text(json.dumps(dict(rec, name="m2")))  # no GGUF: skipped
    (tmp_path / "runs" / "m1").mkdir(parents=True)
    write_tiny_gguf(tmp_path / "runs" / "m1" / "model.gguf", hidden=256, ffn=512, vocab=96)
    (tmp_path / "meas").mkdir()
    (tmp_path / "meas" / "distortion.csv").write_text(
        "model,quant,imatrix,metric,dataset,value\n"
        "m1,Q4_K_M,no,kld_mean,Project Gutenberg novels,0.01\n"
        "m1,Q2_K,no,kld_mean,Project Gutenberg novels,0.2\n")
    df = predicted_kld_table(tmp_path / "rec", tmp_path / "runs", measured_dir=tmp_path / "meas")
    assert df["model"].to_list() == ["m1"] and df["tier"][0] == "weights"
    row = df.to_dicts()[0]
    preds = [row[f"pred_kld_{q}"] for q in REPORT_PRESETS]  # Q8_0 ... Q2_K: distortion grows
    assert all(a < b for a, b in zip(preds, preds[1:]))
    logs = [math.log(row["pred_kld_Q4_K_M"] / 0.01), math.log(row["pred_kld_Q2_K"] / 0.2)]
    assert row["log_ratio_mean"] == pytest.approx(sum(logs) / 2)
    out = CliRunner().invoke(cli, ["family", "report", "--records", str(tmp_path / "rec"), "--measured",
                                    str(tmp_path / "meas"), "--predicted", str(tmp_path / "runs"), "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert "pred_kld_Q2_K" in out.output.splitlines()[-2]


def test_math_probe_scores_answers_and_distortion(tmp_path):
    from predictor.family.probe import probe_model
    from predictor.family.tokenizer import N_VOCAB
    from predictor.fixtures.gguf import write_tiny_gguf

    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf, hidden=256, ffn=512, vocab=N_VOCAB)
    rows = probe_model(gguf, presets=["Q8_0", "Q2_K"], n_math=12, n_windows=1, window=32)
    assert [(r["preset"], r["imatrix"]) for r in rows] == [("base", "no"), ("Q8_0", "no"), ("Q2_K", "no")]
    base, q8, q2 = rows
    assert "kld_prose" not in base and base["n_math"] == 12
    for r in rows:
        assert 0.0 <= r["math_exact_pct"] <= 100.0 and 0.0 <= r["math_token_acc_pct"] <= 100.0
        assert r["math_answer_nll"] > 0
    assert 0 < q8["kld_prose"] < q2["kld_prose"] and 0 < q8["kld_code"] < q2["kld_code"]
    assert q8["bits_per_weight"] > q2["bits_per_weight"]


def test_write_probe_rows_replaces_only_that_models_rows(tmp_path):
    import polars as pl

    from predictor.family.probe import write_probe_rows

    out = tmp_path / "probe.csv"
    write_probe_rows(out, "a", [{"preset": "base", "math_exact_pct": 1.0}])
    write_probe_rows(out, "b", [{"preset": "base", "math_exact_pct": 2.0}, {"preset": "Q2_K", "kld_prose": 0.1}])
    write_probe_rows(out, "a", [{"preset": "Q8_0", "math_exact_pct": 3.0}])
    df = pl.read_csv(out)
    assert sorted(df.select("model", "preset").rows()) == [("a", "Q8_0"), ("b", "Q2_K"), ("b", "base")]
    assert not (tmp_path / "probe.csv.part").exists()
