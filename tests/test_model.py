"""The predictor's building blocks: quant descriptors, the two stages, persistence, training, CV metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from predictor.errors import InputFileError, SchemaError
from predictor.model import quantspec as qs
from predictor.model.estimator import DistortionModel, DropCurve, IntervalModel
from predictor.model.features import ROLE_FEATURES, STAGE_A_FEATURES, build_tables, imputed_noise_pp, row_noise_pp
from predictor.model.train import MODEL_FILES, fit_predictor, load_model, new_stage_a, stage_a_matrix, train
from predictor.model.validate import _pick, folklore_drop, ranking_metrics
from predictor.quant.recipes import RecipeModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def type_ref():
    return qs.compute_type_ref_rmse()


@pytest.fixture(scope="module")
def small_tables(type_ref):
    """The repository's training data, Stage B cut to every 4th row to keep training fast."""
    t = build_tables(REPO / "training_data", type_ref=type_ref)
    t.stage_b = t.stage_b.gather_every(4)
    return t


def test_reference_errors_order_like_the_bits(type_ref):
    assert type_ref["Q8_0"] < type_ref["Q6_K"] < type_ref["Q5_K"] < type_ref["Q4_K"] < type_ref["Q3_K"] < type_ref["Q2_K"]
    assert type_ref["F32"] == 0.0
    errs = [qs.rtn_ref_rmse(b, 128) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    # per-channel scales are worse than groups of 128 at the same width
    assert qs.rtn_ref_rmse(4, -1) > qs.rtn_ref_rmse(4, 128)


def test_type_mix_follows_the_real_recipe(type_ref):
    # SmolLM2-135M: width 576 is not a multiple of 256, so "Q2_K" is mostly Q4_0 (README of measured/).
    row = {"model": "x", "gguf_arch": "llama", "n_layers": 30, "hidden_size": 576, "ffn_size": 1536, "n_heads": 9,
           "n_kv_heads": 3, "vocab_size": 49152, "tied_embeddings": True}
    meta = qs.metadata_from_registry(row)
    specs = qs.gguf_specs_from_metadata(meta)
    rm = RecipeModel(arch="llama", n_layers=30, n_head=9, n_head_kv=3)
    plans = qs.plan_presets(specs, rm, ["Q2_K", "Q8_0"], type_ref, has_imatrix=False)
    q2 = plans["Q2_K"]
    assert q2.type_shares.get("Q4_0", 0) > 0.5 and "Q2_K" not in q2.type_shares
    assert math.isclose(sum(q2.type_shares.values()), 1.0)
    assert q2.ref_rmse == pytest.approx(qs.mix_ref_rmse(q2.type_shares, type_ref))
    # the role parts add up to the element-weighted error
    assert sum(q2.role_mse.values()) == pytest.approx(q2.ref_rmse**2)
    assert plans["Q8_0"].ref_rmse < q2.ref_rmse
    assert plans["Q8_0"].bits_per_weight > q2.bits_per_weight


def test_nominal_bits():
    assert qs.preset_nominal_bits("Q4_K_M") == 4
    assert qs.preset_nominal_bits("IQ3_M") == 3
    assert qs.preset_nominal_bits("Q8_0") == 8
    assert qs.preset_nominal_bits("IQ1_S") == 1.5


def test_role_parts_see_what_q3_k_m_upgrades(type_ref):
    """Q3_K_M gives attn_v and ffn_down more bits than Q3_K_S: their role parts shrink, the rest do not."""
    row = {"model": "x", "gguf_arch": "llama", "n_layers": 32, "hidden_size": 4096, "ffn_size": 14336, "n_heads": 32,
           "n_kv_heads": 8, "vocab_size": 128256, "tied_embeddings": False}
    specs = qs.gguf_specs_from_metadata(qs.metadata_from_registry(row))
    rm = RecipeModel(arch="llama", n_layers=32, n_head=32, n_head_kv=8)
    p = qs.plan_presets(specs, rm, ["Q3_K_S", "Q3_K_M"], type_ref, has_imatrix=False)
    s, m = p["Q3_K_S"].role_mse, p["Q3_K_M"].role_mse
    assert m["attn_v"] < 0.5 * s["attn_v"] and m["ffn_down"] < 0.5 * s["ffn_down"]
    assert m["ffn_up_gate"] == pytest.approx(s["ffn_up_gate"])
    # integer methods leave the embedding and output head in 16 bits
    shares = qs.block_role_shares(specs)
    assert sum(shares.values()) == pytest.approx(1.0)
    e = qs.integer_role_mse(0.1, shares)
    assert e["output"] == e["token_embd"] == 0.0 and e["ffn_down"] == pytest.approx(shares["ffn_down"] * 0.01)


def test_tables_have_targets_features_and_noise(small_tables):
    a, b = small_tables.stage_a, small_tables.stage_b
    assert a.height > 50 and b.height > 200
    assert np.isfinite(a.get_column("y").to_numpy()).all()
    assert set(b.get_column("task_category").unique()) <= {"math", "code", "knowledge", "chat", "reasoning"}
    assert b.get_column("y").min() >= -30 and b.get_column("y").max() <= 100
    assert set(STAGE_A_FEATURES) <= set(a.columns)
    # our measured rows, the self-trained family among them, are in Stage A
    assert (a.get_column("src") == "measured").any() and (a.get_column("family") == "quantpredict-family").any()
    # every accuracy row has a noise estimate; pairs against a preset carry the reference's role errors
    assert b.get_column("noise_pp").is_not_nan().all()
    pairs = b.filter(pl.col("ref_quant").is_not_null())
    assert pairs.height and (pairs.get_column("ref_e_ffn_down") > 0).all()


def test_noise_from_stderr_or_imputed_from_item_count():
    assert row_noise_pp(50.0, 40.0, 1.0, 1.0, None) == (pytest.approx(100 * math.hypot(1, 1) / 50), False)
    noise, imputed = row_noise_pp(50.0, 50.0, None, None, 1319)  # GSM8K-sized, 50% baseline
    assert imputed and noise == pytest.approx(100 * math.sqrt(2 * 0.25 / 1319) / 0.5)
    assert imputed_noise_pp(50.0, 100) > imputed_noise_pp(50.0, 1000) > imputed_noise_pp(90.0, 1000)


def test_stage_a_recovers_role_weights_floor_and_method_sign():
    """Synthetic data from the model's own form: the fit finds the heavy role, the floor, and keeps
    GPTQ no worse than RTN even when the data would push it the other way."""
    rng = np.random.default_rng(0)
    n, k = 400, len(ROLE_FEATURES)
    E = rng.uniform(0, 1e-2, size=(n, k)) * rng.uniform(0.01, 1, size=(n, 1))
    lp = rng.uniform(-2, 4, n)
    w_true = np.ones(k)
    w_true[1] = 8.0  # attn_v
    floor = 2e-4
    y = 1.5 + 1.0 * np.log(E @ w_true + floor) - 0.3 * lp + rng.normal(0, 0.05, n)
    X = np.column_stack([E, np.zeros(n), lp, np.zeros((n, 2)), np.zeros((n, 6))])
    gptq = rng.random(n) < 0.2
    X[gptq, -6] = 1.0
    y[gptq] += 0.5  # data claiming GPTQ is worse
    sa = DistortionModel(role_features=ROLE_FEATURES, size_features=["log_params"], offset_features=["is_ppl", "is_own"],
                         method_features=[f"m{i}" for i in range(6)], role_shrink=0.1).fit(X, y)
    p = sa.params()
    assert p["gamma"] == pytest.approx(1.0, abs=0.1)
    assert math.exp(p["role_log_weight"]["e_attn_v"]) > 4.0
    assert math.exp(p["floor_log_mse"]) == pytest.approx(floor, rel=0.5)
    assert p["method"]["m0"] <= 0.0
    again = DistortionModel.from_dict(json.loads(json.dumps(sa.to_dict())))
    np.testing.assert_array_equal(sa.predict(X[:20]), again.predict(X[:20]))
    assert not sa.in_range(np.column_stack([X[:1, :k + 1], [[10.0]], X[:1, k + 2:]]))[0]


def test_drop_curve_per_category_task_and_pairs():
    """Categories keep their own slopes, a benchmark its offset; pair rows (against Q8_0) are fitted
    as the difference of two points; the curve is strictly increasing and 0 at KLD -> 0."""
    rng = np.random.default_rng(1)
    n = 900
    x = rng.uniform(-7, 1, n)
    c = np.where(np.arange(n) < 300, "math", "reasoning")
    t = np.where(np.arange(n) < 150, "GSM8K", np.where(np.arange(n) < 300, "MATH", "ARC"))
    a = np.where(c == "math", 0.5, -1.0) + np.where(t == "GSM8K", 0.7, 0.0)
    b = np.where(c == "math", 1.4, 0.9)
    top = np.where(c == "math", 100.0, 60.0)
    f = DropCurve.curve(a + b * x, top)
    x_ref = np.where(rng.random(n) < 0.2, x - 3.0, np.nan)
    y = DropCurve.relative_to(f, np.where(np.isfinite(x_ref), DropCurve.curve(a + b * np.nan_to_num(x_ref), top), np.nan))
    y = y + rng.normal(0, 0.3, n)
    cv = DropCurve(min_task_rows=3).fit(x, x_ref, c, t, y, np.ones(n))
    assert cv.category_["math"]["b"] == pytest.approx(1.4, abs=0.25)
    assert cv.category_["reasoning"]["b"] == pytest.approx(0.9, abs=0.2)
    assert cv.task_offset_["GSM8K"] - cv.task_offset_["MATH"] == pytest.approx(0.7, abs=0.3)
    grid = np.linspace(-12, 2, 50)
    p = cv.predict(grid, ["math"] * 50, ["GSM8K"] * 50)
    assert np.all(np.diff(p) > 0) and p[0] < 0.01 and p.max() <= 100.0
    assert cv.predict([-2.0], ["chat"], [""])[0] > 0  # unseen category -> the shared curve
    assert DropCurve.from_dict(json.loads(json.dumps(cv.to_dict()))).predict(grid, ["math"] * 50, ["GSM8K"] * 50).tolist() == p.tolist()
    with pytest.raises(SchemaError):
        DropCurve.from_dict({"kind": "cloglog"})


def test_interval_model_separates_model_error_from_benchmark_noise():
    rng = np.random.default_rng(2)
    n = 3000
    point = rng.uniform(0, 20, n)
    noise = rng.choice([0.5, 10.0], n)
    resid = rng.normal(0, 1.0 + 0.2 * point) + rng.normal(0, 0.7 * noise)
    im = IntervalModel(coverage=0.8).fit(point, resid, noise)
    assert im.kappa_ == pytest.approx(0.7, abs=0.15)
    assert im.beta_ == pytest.approx(0.2, abs=0.06)
    inside = np.abs(resid) <= im.q_ * im.total_scale(point, noise)
    assert inside.mean() == pytest.approx(0.8, abs=0.02)
    assert IntervalModel.from_dict(im.to_dict()).q_ == im.q_


def test_train_is_deterministic_and_pickle_free(small_tables, tmp_path):
    d1 = train(None, tmp_path / "m1", validate=False, tables=small_tables)
    d2 = train(None, tmp_path / "m2", validate=False, tables=small_tables)
    for name in MODEL_FILES:
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name
    c1, c2 = json.loads((d1 / "card.json").read_text()), json.loads((d2 / "card.json").read_text())
    c1.pop("name"), c2.pop("name")
    assert c1 == c2
    assert c1["features"]["stage_a"] == STAGE_A_FEATURES
    assert c1["training_data"]["hash"] == small_tables.data_hash
    assert "NOT cross-validated" in c1["target"]["interval"]
    for f in d1.iterdir():
        assert f.suffix in (".json", ".md")
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol header
    p = load_model(d1)
    lk = p.log_kld(small_tables.stage_b.head(20))
    assert np.isfinite(lk).all()


def test_shipped_model_loads_and_is_text_only():
    d = REPO / "models" / "default"
    p = load_model(d)
    assert p.card["validation"] is not None and p.card["validation"]["weaknesses"]
    assert set(p.intervals) == {"model/llama_cpp", "model/other_methods", "family/llama_cpp", "family/other_methods"}
    assert sorted(f.name for f in d.iterdir()) == sorted(["README.md", "card.json", *MODEL_FILES])
    assert "Where it is weak" in (d / "README.md").read_text()
    for src in (REPO / "predictor" / "model").glob("*.py"):
        text = src.read_text()
        assert "import pickle" not in text and "joblib" not in text


def test_load_model_errors(tmp_path):
    with pytest.raises(InputFileError, match="no card.json"):
        load_model(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(InputFileError, match="malformed"):
        load_model(tmp_path)


def test_folklore_and_recommendation_metrics():
    assert folklore_drop("math", 4) == 17.5
    assert folklore_drop("code", 3) == 30.0
    assert folklore_drop("chat", 8) == pytest.approx(2.5 / 256)
    assert folklore_drop("math", 2) == 100.0  # capped
    bpw = np.array([8.5, 4.8, 3.9, 3.0])
    assert _pick(bpw, np.array([0.1, 1.0, 4.0, 20.0]), 3.0) == 1
    assert _pick(bpw, np.array([5.0, 6.0, 7.0, 20.0]), 3.0) is None
    df = pl.DataFrame({"group": ["g"] * 4, "y": [0.1, 1.0, 4.0, 20.0], "bpw_eff": bpw,
                       "good": [0.0, 2.0, 5.0, 30.0], "flat": [0.0] * 4})
    rho, agree, n_rho, n_rec = ranking_metrics(df, "good")
    assert rho == pytest.approx(1.0) and agree == 1.0 and n_rho == n_rec == 1
    rho, agree, _, _ = ranking_metrics(df, "flat")
    assert rho == 0.0 and agree == 0.0  # "no drop" picks the smallest file, the measurements do not


def test_noisy_rows_count_less(small_tables):
    from predictor.model.features import GGUF_WEIGHT, NOISE_REF_PP

    b = small_tables.stage_b
    r = b.filter(pl.col("noise_pp") > 5).row(0, named=True)
    n = build_tables(REPO / "training_data").stage_b.filter(pl.col("model") == r["model"]).height
    expected = (1 / math.sqrt(n)) * (GGUF_WEIGHT if r["is_gguf"] else 1.0) / (1 + (r["noise_pp"] / NOISE_REF_PP) ** 2)
    assert r["weight"] == pytest.approx(expected)


def test_cross_validation_reports_both_intervals(small_tables):
    from predictor.model.validate import cross_validate

    cv = cross_validate(small_tables)
    assert set(cv.intervals) == {"model/llama_cpp", "model/other_methods", "family/llama_cpp", "family/other_methods"}
    for scheme, df in cv.oof.items():
        assert (df["true_lo"] <= df["pred_model"]).all() and (df["pred_model"] <= df["true_hi"]).all()
        # the benchmark interval adds the row's own noise: never narrower than the true-drop interval
        assert ((df["hi"] - df["lo"]) >= (df["true_hi"] - df["true_lo"]) - 1e-9).all()
        s = cv.summary["schemes"][scheme]
        assert {"model", "no_drop", "bpw_curve", "global_kld_curve", "folklore"} == set(s["methods"])
        assert 0.0 <= s["intervals"]["all rows"]["bench_coverage"] <= 1.0
