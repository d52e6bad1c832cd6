"""`quantpredict measure`: GGUF writer exactness, KLD math, and an end-to-end run with the real engine."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import numpy as np
import polars as pl
import pytest

from predictor import quant
from predictor.data.store import validate_frame
from predictor.errors import InputFileError, UnsupportedError, UsageError
from predictor.fixtures.gguf import write_tiny_gguf
from predictor.fixtures.runnable import write_runnable_gguf
from predictor.io.gguf import open_gguf
from predictor.io.imatrix import read_imatrix, write_imatrix_gguf
from predictor.measure.distortion import log_softmax, summarize_tokens, token_stats
from predictor.measure.evaluate import paired_accuracy
from predictor.measure.writer import plan_tensor_types, write_gguf
from predictor.quant.recipes import RecipeModel, choose_tensor_types, get_preset, is_quantizable


def _imatrix_for(path, model, *, seed=0):
    """A seeded imatrix with an entry for every blk.* matrix (per expert for 3-D tensors)."""
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for t in model.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and is_quantizable(t.name, t.ne):
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            sums[t.name] = (rng.gamma(1.0, 1.0, size=(n_mat, t.cols)) * 50).astype(np.float32)
            counts[t.name] = np.full(n_mat, 50, dtype=np.float32)
    write_imatrix_gguf(path, sums, counts, chunk_count=1, chunk_size=50, datasets=["seeded-test"])
    return read_imatrix(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    path = d / "tiny.gguf"
    write_runnable_gguf(path)
    return path


# -- writer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "IQ4_XS", "Q5_1"])
def test_written_gguf_bytes_equal_quantize(tmp_path, tiny_model, preset):
    base = open_gguf(tiny_model)
    imat = _imatrix_for(tmp_path / "imat.gguf", base)
    types = plan_tensor_types(base, preset, has_imatrix=True)
    expected = choose_tensor_types([(t.name, t.ne) for t in base.tensors], RecipeModel.from_metadata(base.metadata),
                                   preset, has_imatrix=True, source_types={t.name: t.dtype for t in base.tensors})
    assert types == expected
    written = write_gguf(base, tmp_path / "q.gguf", types, file_type=get_preset(preset).ftype, imatrix=imat)
    out = open_gguf(tmp_path / "q.gguf")
    assert {t.name: t.dtype for t in out.tensors} == expected == written.tensor_types
    assert [t.name for t in out.tensors] == [t.name for t in base.tensors]
    assert int(out.kv["general.file_type"]) == get_preset(preset).ftype
    assert list(out.kv["tokenizer.ggml.tokens"]) == list(base.kv["tokenizer.ggml.tokens"])
    assert np.array_equal(out.kv["tokenizer.ggml.scores"], base.kv["tokenizer.ggml.scores"])
    n_quantized = 0
    for t in base.tensors:
        got = out.read_raw_rows(t.name, np.arange(t.rows))
        x = base.read_tensor(t.name).reshape(t.rows, t.cols)
        qt = expected[t.name]
        if qt == "F32":
            assert np.array_equal(got.view(np.float32).reshape(x.shape), x)
            continue
        im = imat.vector(t.name) if t.name in imat else None
        assert np.array_equal(got, quant.quantize(x, qt, imatrix=im)), t.name
        n_quantized += 1
    assert n_quantized >= 14


def test_moe_experts_quantized_per_slice_with_their_imatrix(tmp_path):
    write_tiny_gguf(tmp_path / "moe.gguf", n_experts=4, hidden=64, ffn=64, vocab=64)
    base = open_gguf(tmp_path / "moe.gguf")
    imat = _imatrix_for(tmp_path / "imat.gguf", base, seed=3)
    types = plan_tensor_types(base, "Q4_0", has_imatrix=True)
    write_gguf(base, tmp_path / "q.gguf", types, file_type=2, imatrix=imat)
    out = open_gguf(tmp_path / "q.gguf")
    name = "blk.0.ffn_up_exps.weight"
    t = base.tensor(name)
    x = base.read_tensor(name)
    raw = out.read_raw_rows(name, np.arange(t.rows)).reshape(t.shape[0], t.shape[1], -1)
    assert out.tensor(name).shape == t.shape
    for e in range(t.shape[0]):
        assert np.array_equal(raw[e], quant.quantize(x[e], types[name], imatrix=imat.vector(name, e)))
    # a different expert's imatrix row gives different bytes: the slices really are separate
    assert not np.array_equal(raw[1], quant.quantize(x[1], types[name], imatrix=imat.vector(name, 0)))


# -- math ----------------------------------------------------------------------------------------

def test_kld_and_ppl_on_hand_made_logits():
    p = np.array([[0.4, 0.6, 1e-12], [0.7, 0.2, 0.1]])
    q = np.array([[0.9, 0.1, 1e-12], [0.7, 0.2, 0.1]])
    base_lp = np.log(p / p.sum(1, keepdims=True)).astype(np.float32)
    quant_logits = (np.log(q) + 3.0).astype(np.float32)  # a constant shift must not matter
    s = token_stats(base_lp, quant_logits, np.array([1, 0]))
    want0 = 0.4 * math.log(0.4 / 0.9) + 0.6 * math.log(0.6 / 0.1)
    assert s["kld"][0] == pytest.approx(want0, rel=1e-5)
    assert s["kld"][1] == pytest.approx(0.0, abs=1e-6)
    assert list(s["same_top1"]) == [False, True]  # base picks 1, quant 0; then equal
    assert s["nll_quant"][0] == pytest.approx(-math.log(0.1), rel=1e-5)
    summ = summarize_tokens(s)
    assert summ["kld_mean"] == pytest.approx(want0 / 2, rel=1e-5)
    assert summ["ppl"] == pytest.approx(math.exp((-math.log(0.1) - math.log(0.7)) / 2), rel=1e-5)
    assert summ["ppl_base"] == pytest.approx(math.exp((-math.log(0.6) - math.log(0.7)) / 2), rel=1e-5)
    assert summ["same_top_p_pct"] == pytest.approx(50.0)


def test_log_softmax_is_stable_for_large_logits():
    lp = log_softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    assert np.allclose(np.exp(lp).sum(), 1.0) and lp[0, 0] == pytest.approx(math.log(0.5))


def test_paired_accuracy_standard_errors():
    b = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    q = np.array([1, 0, 0, 1, 1, 0, 0, 1])
    r = paired_accuracy(b, q)
    d = q - b
    assert r["base"] == pytest.approx(62.5) and r["quant"] == pytest.approx(50.0)
    assert r["delta"] == pytest.approx(-12.5)
    assert r["delta_stderr_paired"] == pytest.approx(100 * d.std(ddof=1) / math.sqrt(8))
    assert (r["n_base_only"], r["n_quant_only"]) == (2, 1)


# -- engine and end to end -----------------------------------------------------------------------

# The engine tests need llama-cpp-python (pip install '.[measure]'); CI sets QUANTPREDICT_REQUIRE_ENGINE=1
# so that a missing engine fails instead of skipping.
_HAVE_ENGINE = importlib.util.find_spec("llama_cpp") is not None
needs_engine = pytest.mark.skipif(
    not _HAVE_ENGINE and not os.environ.get("QUANTPREDICT_REQUIRE_ENGINE"),
    reason="needs llama-cpp-python: pip install 'quantpredict[measure]'",
)


@needs_engine
def test_engine_prefix_reuse_matches_a_fresh_pass(tiny_model):
    from predictor.measure.engine import Engine

    with Engine(tiny_model, n_ctx=256, n_threads=1) as a, Engine(tiny_model, n_ctx=256, n_threads=1) as b:
        toks = a.prefix_tokens("The cat sat on the mat, and the dog sat on the log. " * 3)
        assert toks[0] == 1 and len(toks) > 60
        full = a.score(toks[:10], toks[10:60])
        again = a.score(toks[:10], toks[10:60])  # fully cached: only the last prefix token is re-run
        fresh = b.score(toks[:10], toks[10:60])
        assert np.array_equal(full, fresh) and np.array_equal(full, again)
        assert full.shape == (50, a.n_vocab)


@needs_engine
def test_measure_end_to_end_and_resume(tmp_path, tiny_model):
    from predictor.measure.sweep import MeasureConfig, measure

    base = open_gguf(tiny_model)
    imat_path = tmp_path / "imat.gguf"
    _imatrix_for(imat_path, base)
    out = tmp_path / "out"
    cfg = MeasureConfig(base=str(tiny_model), out_dir=str(out), presets=["Q8_0", "Q2_K"], imatrix=str(imat_path),
                        suite="tiny", ablate=["attn_v"], ablation_type="Q2_K", work_dir=str(tmp_path / "work"),
                        model_id="test/tiny", threads=1)
    logs = []
    first = measure(cfg, log=logs.append)
    assert first["done"] == ["Q8_0", "Q2_K", "ablate-attn_v-Q2_K", "Q8_0-imatrix", "Q2_K-imatrix"]
    dist = validate_frame(pl.read_csv(out / "distortion.csv", infer_schema=False), "distortion")
    meas = validate_frame(pl.read_csv(out / "measurements.csv", infer_schema=False), "measurements")
    assert dist["origin"].unique().to_list() == ["measured"] and meas["origin"].unique().to_list() == ["measured"]
    kld = {(r["quant"], r["imatrix"], r["dataset"]): r["value"]
           for r in dist.filter(pl.col("metric") == "kld_mean").iter_rows(named=True)}
    prose = [k for k in kld if k[0] == "Q8_0" and k[1] == "no" and k[2].startswith("Project Gutenberg")][0][2]
    assert kld[("Q2_K", "no", prose)] > kld[("Q8_0", "no", prose)] > 0
    assert set(meas["task"]) >= {"ARC-Easy", "HellaSwag", "MMLU", "Arithmetic"}
    assert (meas["source_sha256"].str.len_chars() == 64).all()
    assert dist.filter(pl.col("imatrix") == "yes")["imatrix_note"].null_count() == 0
    abl = pl.read_csv(out / "ablations.csv", infer_schema=False)
    assert set(abl["ablation_group"]) == {"attn_v"} and set(abl["quant"]) == {"Q2_K@attn_v"}
    run = json.loads((out / "runs" / "test_tiny" / "Q2_K.json").read_text())
    assert run["tensor_types"] == plan_tensor_types(base, "Q2_K", has_imatrix=False)
    assert not list((tmp_path / "work" / "test_tiny").glob("*.gguf.part"))
    n_rows = (len(dist), len(meas))

    # a second run skips everything finished and changes nothing
    second = measure(cfg, log=logs.append)
    assert second["done"] == [] and len(second["skipped"]) == 5
    assert (len(pl.read_csv(out / "distortion.csv")), len(pl.read_csv(out / "measurements.csv"))) == n_rows

    # a new preset is added to the same tables
    third = measure(MeasureConfig(**{**cfg.__dict__, "presets": ["Q4_0"], "imatrix": None, "ablate": []}),
                    log=logs.append)
    assert third["done"] == ["Q4_0"]
    assert len(pl.read_csv(out / "distortion.csv")) > n_rows[0]


# -- bad input -----------------------------------------------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from cli.main import cli

    r = CliRunner().invoke(cli, ["measure", *args])
    r.returncode = r.exit_code
    return r


@needs_engine
def test_bad_inputs_give_one_line_errors(tmp_path, tiny_model):
    from predictor.measure.sweep import MeasureConfig, measure

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    r = _cli(str(junk), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a GGUF" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli(str(tiny_model), "-p", "Q9_X", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown preset" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="unknown ablation group"):
        measure(MeasureConfig(base=str(tiny_model), out_dir=str(tmp_path / "o"), presets=[], ablate=["attn_z"],
                              suite="tiny", work_dir=str(tmp_path / "w")), log=lambda m: None)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, hidden=64, ffn=64, vocab=64)
    _imatrix_for(tmp_path / "other_imat.gguf", open_gguf(other))
    r = _cli(str(tiny_model), "--imatrix", str(tmp_path / "other_imat.gguf"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "imatrix does not match" in r.stderr


def test_missing_engine_says_how_to_install(monkeypatch):
    import builtins

    from predictor.measure import engine

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("no llama_cpp")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UnsupportedError, match=r"pip install 'quantpredict\[measure\]'"):
        engine.load_llama_cpp()


def test_non_gguf_base_is_refused(tmp_path):
    from predictor.measure.writer import open_base_gguf

    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InputFileError, match="convert it first"):
        open_base_gguf(tmp_path / "model.safetensors")


@needs_engine
def test_choices_in_one_batch_match_one_at_a_time(tiny_model):
    from predictor.measure.engine import Engine

    with Engine(tiny_model, n_ctx=256, n_threads=1) as a, Engine(tiny_model, n_ctx=256, n_threads=1) as b:
        prefix = a.prefix_tokens("Question: Which is the largest?\\nAnswer:")
        choices = [a.tokenize(" the sun"), a.tokenize(" a"), a.tokenize(" the moon and stars")]
        together = a.score_choices(prefix, choices)
        again = a.score_choices(prefix, choices)  # prefix now cached
        for c, x, y in zip(choices, together, again):
            alone = b.score(prefix, c)
            assert x.shape == (len(c), a.n_vocab)
            assert np.allclose(x, alone, atol=1e-3) and np.allclose(x, y, atol=1e-3)


@needs_engine
def test_numpy_forward_pass_matches_llama_cpp_and_feeds_the_imatrix(tmp_path, tiny_model):
    from predictor.measure.engine import Engine
    from predictor.measure.imatrix import LlamaNumpy, make_imatrix

    with Engine(tiny_model, n_ctx=256, n_threads=1) as eng:
        toks = eng.prefix_tokens("Question: What is the answer to the question? It was the best of times.")
        ref = eng.score(toks[:1], toks[1:])
    model = open_gguf(tiny_model)
    ours = LlamaNumpy(model).forward(toks)[:-1]
    s = token_stats(log_softmax(ref), ours, np.array(toks[1:]))
    assert s["kld"].mean() < 1e-4 and s["same_top1"].all()

    text = "The quick brown fox jumps over the lazy dog. " * 40
    path = make_imatrix(tiny_model, tmp_path / "imat.gguf", text=text, dataset="fox.txt", chunk_tokens=128,
                        max_chunks=1)
    imat = read_imatrix(path)
    imat.check_against(model.tensors)  # an entry for every blk.* matrix, with the right widths
    assert imat.datasets == ["fox.txt"] and imat.chunk_size == 128 and imat.chunk_count == 1
    # attn_q, attn_k and attn_v read the same normalised input, so their entries are identical
    assert np.array_equal(imat.vector("blk.0.attn_q.weight"), imat.vector("blk.0.attn_v.weight"))
    # the entry is the mean square of the inputs: recompute one from the forward pass
    seen = {}
    net = LlamaNumpy(model)
    with Engine(tiny_model, n_ctx=256, n_threads=1) as eng:
        chunk = ([eng.bos] + eng.tokenize(text))[:128]
    net.forward(chunk, collect=lambda n, x: seen.setdefault(n, x.copy()), logits=False)
    assert imat.chunk_count == 1
    assert np.allclose(imat.vector("blk.1.ffn_down.weight"), (seen["blk.1.ffn_down.weight"] ** 2).mean(0), rtol=1e-5)


def test_rank_correlation_and_loglog_fit():
    from predictor.measure.analysis import loglog_fit, spearman

    x = np.array([0.01, 0.02, 0.05, 0.1, 0.2])
    assert spearman(x, x**2 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
    fit = loglog_fit(x, 3.0 * x**2)
    assert fit["slope"] == pytest.approx(2.0) and fit["median_factor"] == pytest.approx(1.0)
    noisy = loglog_fit(x, 3.0 * x**2 * np.array([1, 2, 1, 0.5, 1]))
    assert 1.0 < noisy["median_factor"] <= noisy["max_factor"] < 2.0


def test_low_exact_match_baseline_is_flagged():
    from predictor.measure.sweep import flag_low_exact_match

    low, ok = {"baseline_score": 5.0, "unreliable": False}, {"baseline_score": 62.5, "unreliable": False}
    flag_low_exact_match(low)
    flag_low_exact_match(ok)
    assert low["unreliable"] and "5%" in low["unreliable_reason"]
    assert not ok["unreliable"]


def test_origin_grid_share_flags_requantizing_onto_the_origin_type(tmp_path):
    from predictor.fixtures.gguf import write_tiny_gguf
    from predictor.measure.sweep import _flag_origin_grid, origin_grid_share, reflag_origin_grid
    from predictor.measure.writer import open_base_gguf, plan_tensor_types

    path = tmp_path / "q8.gguf"
    write_tiny_gguf(path, hidden=256, ffn=512, vocab=96, tensor_type="Q8_0")
    src = open_base_gguf(path)
    same = origin_grid_share(src, plan_tensor_types(src, "Q8_0", has_imatrix=False))
    other = origin_grid_share(src, plan_tensor_types(src, "Q4_K_M", has_imatrix=False))
    assert same > 0.9 and other < 0.5
    f32 = tmp_path / "f32.gguf"
    write_tiny_gguf(f32, hidden=256, ffn=512, vocab=96)
    base = open_base_gguf(f32)
    assert origin_grid_share(base, plan_tensor_types(base, "Q8_0", has_imatrix=False)) == 0.0
    row = {"unreliable": False, "unreliable_reason": None}
    _flag_origin_grid(row, other)
    assert row["unreliable"] is False
    _flag_origin_grid(row, same)
    assert row["unreliable"] is True and "origin's grid" in row["unreliable_reason"]

    # rows written before the flag existed get it from reflag_origin_grid
    out = tmp_path / "measured"
    out.mkdir()
    (out / "runs.csv").write_text("run,model,quant,imatrix,ablation_group\nm/Q8_0,m,Q8_0,no,\nm/Q4_K_M,m,Q4_K_M,no,\n")
    rows = "row_id,model,source_location,unreliable,unreliable_reason\n"
    rows += "a,m,suite standard; run Q8_0,false,\nb,m,suite standard; run Q4_K_M,false,\nc,x,suite standard; run Q8_0,false,\n"
    for name in ("distortion.csv", "measurements.csv"):
        (out / name).write_text(rows)
    assert reflag_origin_grid(out, "m", path) == 2
    d = pl.read_csv(out / "distortion.csv", infer_schema=False)
    assert d.filter(pl.col("unreliable") == "true")["row_id"].to_list() == ["a"]
    assert reflag_origin_grid(out, "m", path) == 0  # idempotent
