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
from predictor.model.estimator import BaseCurve, DistortionModel, DropRegressor
from predictor.model.features import STAGE_B_FEATURES, build_tables
from predictor.model.train import BASE_FILE, BOOSTER_FILES, fit_predictor, load_model, stage_b_matrix, train
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
    assert plans["Q8_0"].ref_rmse < q2.ref_rmse
    assert plans["Q8_0"].bits_per_weight > q2.bits_per_weight


def test_nominal_bits():
    assert qs.preset_nominal_bits("Q4_K_M") == 4
    assert qs.preset_nominal_bits("IQ3_M") == 3
    assert qs.preset_nominal_bits("Q8_0") == 8
    assert qs.preset_nominal_bits("IQ1_S") == 1.5


def test_tables_have_targets_and_features(small_tables):
    a, b = small_tables.stage_a, small_tables.stage_b
    assert a.height > 50 and b.height > 200
    assert np.isfinite(a.get_column("y").to_numpy()).all()
    assert set(b.get_column("task_category").unique()) <= {"math", "code", "knowledge", "chat", "reasoning"}
    assert b.get_column("y").min() >= -30 and b.get_column("y").max() <= 100
    # our measured rows are picked up when present
    if (REPO / "training_data" / "measured" / "distortion.csv").is_file():
        assert (a.get_column("src") == "measured").any()


def test_stage_a_roundtrip_and_physics(small_tables):
    sa, _ = fit_predictor(small_tables, stage_b_rows=small_tables.stage_b.head(200))
    # more weight error -> more distortion
    assert sa.coef_[sa.feature_names.index("log_ref_mse")] > 0.5
    again = DistortionModel.from_dict(json.loads(json.dumps(sa.to_dict())))
    X = np.random.default_rng(0).normal(size=(5, len(sa.feature_names)))
    np.testing.assert_array_equal(sa.predict(X), again.predict(X))


@pytest.mark.parametrize("base", [None, ["log_kld", "task_category"]])
def test_drop_regressor_text_roundtrip_and_monotone(small_tables, base):
    rng = np.random.default_rng(0)
    n = 400
    X = np.column_stack([rng.uniform(-8, 1, n), rng.integers(0, 5, n), rng.uniform(-1, 4, n), rng.uniform(2, 8, n),
                         rng.integers(0, 2, n)])
    y = np.exp(X[:, 0]) * 20 + rng.normal(0, 1, n)
    m = DropRegressor(feature_names=STAGE_B_FEATURES, categorical=["task_category"],
                      monotone_increasing=["log_kld"], n_estimators=60, base=base).fit(X, y)
    grid = np.column_stack([np.linspace(-8, 1, 30), np.full(30, 2.0), np.full(30, 1.0), np.full(30, 5.0),
                            np.ones(30)])
    mid, lo, hi = m.predict(grid)
    assert np.all(np.diff(mid) >= -1e-9)
    assert np.all(lo <= mid) and np.all(mid <= hi)
    again = DropRegressor.from_texts(m.model_texts(), m.get_params(), m.base_dict())
    for a, b in zip(m.predict(grid), again.predict(grid)):
        np.testing.assert_array_equal(a, b)
    if base:
        with pytest.raises(SchemaError):
            DropRegressor.from_texts(m.model_texts(), m.get_params(), None)


def test_base_curve_recovers_per_category_sensitivity():
    """drop = top_g (1 - exp(-exp(a_g + b ln KLD))): a sparse category keeps its own, steeper curve."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-6, 1, 600)
    g = np.where(np.arange(600) < 60, 0, 2)  # category 0 (math) has 10x fewer rows
    a = np.where(g == 0, 1.5, 0.0)
    top = np.where(g == 0, 100.0, 60.0)
    y = top * -np.expm1(-np.exp(a + 1.2 * x)) + rng.normal(0, 0.5, 600)
    c = BaseCurve().fit(x, g, y, np.ones(600))
    assert c.b_ == pytest.approx(1.2, rel=0.1)
    assert c.a_[0] == pytest.approx(1.5, abs=0.3) and c.a_[2] == pytest.approx(0.0, abs=0.2)
    assert c.top_[2] == pytest.approx(60.0, abs=3.0)
    pred = c.predict(np.array([-3.0, -3.0, -3.0]), np.array([0, 2, 5]))  # 5: unseen -> shared
    assert pred[0] > pred[1] > 0 and np.isfinite(pred[2])
    assert BaseCurve.from_dict(c.to_dict()).predict(x[:5], g[:5]).tolist() == c.predict(x[:5], g[:5]).tolist()
    with pytest.raises(SchemaError):
        BaseCurve.from_dict({"kind": "cloglog"})


def test_train_is_deterministic_and_pickle_free(small_tables, tmp_path):
    d1 = train(None, tmp_path / "m1", validate=False, tables=small_tables)
    d2 = train(None, tmp_path / "m2", validate=False, tables=small_tables)
    for name in ("stage_a.json", BASE_FILE, *BOOSTER_FILES):
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name
    c1, c2 = json.loads((d1 / "card.json").read_text()), json.loads((d2 / "card.json").read_text())
    c1.pop("name"), c2.pop("name")
    assert c1 == c2
    assert c1["features"]["stage_b"] == STAGE_B_FEATURES
    assert c1["training_data"]["hash"] == small_tables.data_hash
    assert "lightgbm" in c1["package_versions"]
    for f in d1.iterdir():
        assert f.suffix in (".json", ".txt", ".md")
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol header
    p = load_model(d1)
    b = small_tables.stage_b.head(20)
    lk = p.log_kld(b)
    mid, lo, hi = p.drop(b, lk)
    mid2, _, _ = p.stage_b.predict(stage_b_matrix(b, lk))
    np.testing.assert_array_equal(mid, mid2)


def test_shipped_model_loads_and_is_text_only():
    d = REPO / "models" / "default"
    p = load_model(d)
    assert p.card["validation"] is not None
    assert set(p.conformal) == {"model", "family", "model_other_methods", "family_other_methods"}
    assert sorted(f.name for f in d.iterdir()) == sorted(["README.md", "card.json", "stage_a.json", BASE_FILE, *BOOSTER_FILES])
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


def test_noisy_measured_rows_count_less(type_ref):
    """Rows with standard errors get noise_pp = 100 * hypot(se_base, se_quant) / base and a weight
    cut by 1 / (1 + (noise / NOISE_REF_PP)^2) against an otherwise identical row."""
    from predictor.model.features import NOISE_REF_PP

    b = build_tables(REPO / "training_data", type_ref=type_ref).stage_b
    noisy = b.filter(pl.col("noise_pp") > 0)
    assert noisy.height and (noisy.get_column("src") == "measured").all()
    r = noisy.row(0, named=True)
    same_model = b.filter(pl.col("model") == r["model"])
    n = same_model.height
    expected = (1 / math.sqrt(n)) * (5.0 if r["is_gguf"] else 1.0) / (1 + (r["noise_pp"] / NOISE_REF_PP) ** 2)
    assert r["weight"] == pytest.approx(expected)


def test_conformal_halfwidths_are_per_kind_of_row(small_tables):
    from predictor.model.validate import cross_validate

    cv = cross_validate(small_tables)
    assert set(cv.conformal) == {"model", "family", "model_other_methods", "family_other_methods"}
    for scheme, df in cv.oof.items():
        widen = (df.get_column("hi") - df.get_column("hi_raw")).to_numpy()
        gguf = df.get_column("is_gguf").to_numpy()
        fold = df.get_column("fold").to_numpy()
        for k in np.unique(fold):  # one widening per (fold, kind of row)
            for kind in (gguf, ~gguf):
                sel = (fold == k) & kind
                if sel.any():
                    assert np.ptp(widen[sel]) < 1e-9
