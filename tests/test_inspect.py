"""`inspect`: sizes, tensor types and simulated weight error, through the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from predictor import quant
from predictor.api import inspect_model
from predictor.features.weight_error import compute_distribution_stats, depth_bucket, sample_row_indices
from predictor.fixtures.gguf import write_tiny_gguf
from predictor.fixtures.hf import write_safetensors, write_tiny_llama
from predictor.io import open_model
from predictor.io.imatrix import write_imatrix_gguf
from predictor.quant.recipes import RecipeModel, choose_tensor_types
from predictor.quant.sizes import tensor_bytes

SHAPE = dict(n_layers=4, hidden=256, ffn=512, n_heads=4, n_kv_heads=1, vocab=512)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", dtype="BF16", seed=3, **SHAPE)


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_model, tmp_path_factory):
    """A GGUF imatrix over every blk.* matrix, with a few 'hot' columns like real activations."""
    rng = np.random.default_rng(5)
    sums, counts = {}, {}
    with open_model(tiny_model) as r:
        for t in r.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                v = np.exp(rng.standard_normal(t.cols)).astype(np.float32)
                v[rng.choice(t.cols, 4, replace=False)] *= 50
                sums[t.name] = v[None, :] * 640
                counts[t.name] = np.array([640.0], np.float32)
    path = tmp_path_factory.mktemp("imat") / "imatrix.gguf"
    write_imatrix_gguf(path, sums, counts, chunk_count=5, chunk_size=128, datasets=["calib.txt"])
    return path


def _exact_rel_rmse(model, types: dict[str, str], imatrix=None, *, weighted=False, quantize_with_imatrix=True):
    """Independent full-tensor computation of the overall (or imatrix-weighted) relative RMSE."""
    err = sig = 0.0
    with open_model(model) as r:
        for t in r.tensors:
            if len(t.shape) < 2:
                continue
            v = imatrix.vector(t.name, cols=t.cols) if imatrix is not None and t.name in imatrix else None
            if weighted and v is None:
                continue
            w = v.astype(np.float64) if weighted else 1.0
            x = r.read_tensor(t.name)
            sig += float((x.astype(np.float64) ** 2 * w).sum())
            qt = types[t.name]
            if qt == t.dtype:
                continue
            xq = quant.dequantize(quant.quantize(x, qt, imatrix=v if quantize_with_imatrix else None), qt, cols=t.cols)
            err += float(((xq.astype(np.float64) - x) ** 2 * w).sum())
    return float(np.sqrt(err / sig))


def test_exact_pass_equals_independent_computation(tiny_model):
    rep = inspect_model(tiny_model, presets=["Q4_K_M", "Q8_0"], exact=True)
    for p in rep.presets:
        assert p.as_dict()["rel_rmse"] == pytest.approx(_exact_rel_rmse(tiny_model, p.tensor_types), rel=1e-9)
        assert p.as_dict()["rel_rmse_se"] == 0.0


def test_sampled_error_close_to_exact_within_reported_se(tiny_model):
    exact = inspect_model(tiny_model, presets=["Q3_K_M", "Q5_0"], exact=True)
    sampled = inspect_model(tiny_model, presets=["Q3_K_M", "Q5_0"], sample_weights=4096, seed=1)
    for e, s in zip(exact.presets, sampled.presets):
        e, s = e.as_dict(), s.as_dict()
        assert 0 < s["rel_rmse_se"] < 0.05 * s["rel_rmse"]
        assert abs(s["rel_rmse"] - e["rel_rmse"]) < 4 * s["rel_rmse_se"] + 1e-12


def test_sampling_is_deterministic_and_seeded(tiny_model):
    a = inspect_model(tiny_model, presets=["Q4_0"], sample_weights=2048, seed=7).as_dict()
    b = inspect_model(tiny_model, presets=["Q4_0"], sample_weights=2048, seed=7).as_dict()
    c = inspect_model(tiny_model, presets=["Q4_0"], sample_weights=2048, seed=8).as_dict()
    assert a["presets"][0]["rel_rmse"] == b["presets"][0]["rel_rmse"]
    assert a["presets"][0]["rel_rmse"] != c["presets"][0]["rel_rmse"]
    idx = sample_row_indices("blk.0.attn_q.weight", 1000, 10, seed=0)
    assert len(set(idx.tolist())) == 10 and list(idx) == sorted(idx)


def test_sizes_and_types_match_recipe(tiny_model):
    rep = inspect_model(tiny_model, presets=["Q4_K_M"], sample_weights=1024)
    p = rep.presets[0]
    with open_model(tiny_model) as r:
        specs = [(t.name, t.ne) for t in r.tensors]
        src = {t.name: t.dtype for t in r.tensors}
        types = choose_tensor_types(specs, RecipeModel.from_metadata(r.metadata), "Q4_K_M",
                                    has_imatrix=False, source_types=src)
        n_weights = sum(t.n_elements for t in r.tensors)
    assert p.tensor_types == types
    assert set(p.tensor_types) == set(src)  # every tensor listed, F32/BF16 ones included
    expected = sum(tensor_bytes(types[n], ne) for n, ne in specs)
    assert p.tensor_bytes == expected
    assert p.bits_per_weight == pytest.approx(8 * expected / n_weights)


def test_lower_presets_have_larger_error(tiny_model):
    rep = inspect_model(tiny_model, presets=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"],
                        sample_weights=4096).as_dict()
    errs = [p["rel_rmse"] for p in rep["presets"]]
    assert errs == sorted(errs)
    q4 = rep["presets"][3]
    assert set(q4["by_role"]) >= {"attn_q", "attn_v", "ffn_down", "token_embd", "output"}
    assert list(q4["by_depth"]) == ["layers 0-0", "layers 1-1", "layers 2-2", "layers 3-3"]


def test_imatrix_lowers_weighted_error(tiny_model, tiny_imatrix):
    plain = inspect_model(tiny_model, presets=["Q4_K_M", "Q3_K_M"], exact=True).as_dict()
    with_imat = inspect_model(tiny_model, imatrix=tiny_imatrix, presets=["Q4_K_M", "Q3_K_M"], exact=True).as_dict()
    from predictor.io.imatrix import read_imatrix

    imat = read_imatrix(tiny_imatrix)
    for a, b in zip(plain["presets"], with_imat["presets"]):
        assert a["weighted_rel_rmse"] is None and b["weighted_rel_rmse"] is not None
        assert b["rel_rmse"] == pytest.approx(_exact_rel_rmse(tiny_model, b["tensor_types"], imat), rel=1e-9)
        assert b["weighted_rel_rmse"] == pytest.approx(
            _exact_rel_rmse(tiny_model, b["tensor_types"], imat, weighted=True), rel=1e-9)
        # quantizing without the imatrix does worse on the columns the imatrix says matter
        blind = _exact_rel_rmse(tiny_model, b["tensor_types"], imat, weighted=True, quantize_with_imatrix=False)
        assert b["weighted_rel_rmse"] < 0.97 * blind


def test_distribution_stats_see_outliers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    calm = compute_distribution_stats(x, None)
    x[3, 17] = 40.0
    spiky = compute_distribution_stats(x, np.ones(256, np.float32))
    assert abs(calm["kurtosis"]) < 0.3
    assert spiky["kurtosis"] > 10 and spiky["outlier_share"] > 0
    assert spiky["block_max_over_rms"] > calm["block_max_over_rms"]
    assert spiky["imatrix_top1pct_share"] == pytest.approx(3 / 256)
    assert depth_bucket(31, 32) == "layers 24-31" and depth_bucket(None, 32) is None


def test_gguf_input_and_imatrix_mismatch(tmp_path, tiny_imatrix):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, n_layers=2, hidden=256, ffn=512, n_heads=4, n_kv_heads=1, vocab=512, tensor_type="F16")
    rep = inspect_model(path, presets=["Q4_K_M"], sample_weights=1024).as_dict()
    assert rep["model"]["architecture"] == "llama" and rep["presets"][0]["rel_rmse"] > 0
    with pytest.raises(ValueError, match="imatrix"):
        inspect_model(path, imatrix=tiny_imatrix, presets=["Q4_K_M"])  # 4-layer imatrix, 2-layer model


def test_cli_json_contract(tiny_model):
    res = CliRunner().invoke(cli, ["inspect", str(tiny_model), "-p", "Q4_K_M", "-p", "q3_k", "--format", "json",
                                   "--sample-weights", "1024"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["model"]["n_layers"] == 4 and d["model"]["n_kv_heads"] == 1
    assert [p["preset"] for p in d["presets"]] == ["Q4_K_M", "Q3_K_M"]
    p = d["presets"][0]
    for key in ("tensor_bytes", "bits_per_weight", "tensor_types", "rel_rmse", "rel_rmse_se", "by_role"):
        assert key in p
    assert p["tensor_types"]["blk.0.attn_q.weight"] == "Q4_K"
    assert p["tensor_types"]["blk.0.attn_norm.weight"] == "BF16"


def test_cli_table(tiny_model):
    res = CliRunner().invoke(cli, ["inspect", str(tiny_model), "-p", "Q8_0", "--sample-weights", "1024"])
    assert res.exit_code == 0, res.output
    assert "Q8_0" in res.stdout and "rel_rmse" in res.stdout and "layers 4" in res.stdout


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), "header"),
        (lambda p: p.write_bytes(b"NOTAMODEL" * 4), "not a recognised model file"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00"), "truncated"),
    ],
    ids=["truncated-safetensors", "wrong-magic", "truncated-gguf"],
)
def test_cli_bad_files_give_one_line_errors(tmp_path, make, expected):
    path = tmp_path / "model.bin"
    make(path)
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert expected.lower() in lines[0].lower()


def test_cli_nan_weights_and_unknown_preset(tmp_path, tiny_model):
    x = np.zeros((64, 256), np.float32)
    x[5, 9] = np.nan
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, {"model.layers.0.mlp.down_proj.weight": x}, dtype="F32")
    res = CliRunner().invoke(cli, ["inspect", str(path), "-p", "Q8_0"])
    assert res.exit_code == 2 and "NaN" in res.stderr and str(path) in res.stderr
    res = CliRunner().invoke(cli, ["inspect", str(tiny_model), "-p", "Q4_Z"])
    assert res.exit_code == 2 and "Q4_Z" in res.stderr and "Q4_K_M" in res.stderr


def test_weighted_error_sampling_finds_the_rows_that_carry_the_activations(tmp_path):
    """One hot input column, large weights on it in a few rows: those rows carry most of the
    imatrix-weighted signal and error. A plain random row sample misses them and overstates the
    weighted error several-fold; the stratified sample must stay close to the exact pass."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2048, 512)) * 0.02).astype(np.float32)
    x[rng.choice(2048, 6, replace=False), 77] = 0.6
    path = tmp_path / "hot.safetensors"
    write_safetensors(path, {"model.layers.0.mlp.down_proj.weight": x}, dtype="F32")
    v = np.full(512, 0.01, np.float32)
    v[77] = 50.0
    imat = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(imat, {"blk.0.ffn_down.weight": v[None] * 100}, {"blk.0.ffn_down.weight": np.array([100.0])},
                       chunk_count=1, chunk_size=100, datasets=["synthetic"])
    kw = dict(imatrix=imat, presets=["Q4_0"])
    exact = inspect_model(path, exact=True, **kw).as_dict()["presets"][0]["weighted_rel_rmse"]
    sampled = inspect_model(path, sample_weights=64 * 512, **kw).as_dict()["presets"][0]["weighted_rel_rmse"]
    assert sampled == pytest.approx(exact, rel=0.15)
