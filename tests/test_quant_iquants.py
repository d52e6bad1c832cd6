"""Building blocks of predictor.quant.iquants: the shortcuts it takes must equal ggml's literal rules.

Byte-exactness against ggml itself is in test_quant_vectors.py; here we check the pieces that those
vectors may not reach (table look-ups over all float32 neighbourhoods, chunking, input checks)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import gguf.quants

from predictor import quant
from predictor.errors import UsageError
from predictor.quant import iquants
from predictor.quant._iq_grids import grid_tables

F32 = np.float32


def _best_index_int8_literal(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 transcribed step by step (binary search, then the float32 tie rule)."""
    v = values.astype(F32)
    n = len(v)
    ml = np.zeros(x.shape, np.int64)
    mu = np.full(x.shape, n - 1, np.int64)
    for _ in range(8):
        active = mu - ml > 1
        mav = (ml + mu) // 2
        go_low = x < v[mav]
        mu = np.where(active & go_low, mav, mu)
        ml = np.where(active & ~go_low, mav, ml)
    pick = np.where((x - v[mu - 1]) < (v[mu] - x), mu - 1, mu)
    pick = np.where(x >= v[-1], n - 1, pick)
    return np.where(x <= v[0], 0, pick)


def _float_neighbourhood(centres, n_ulps=300):
    """All float32 values within n_ulps of each centre."""
    out = []
    for c in np.asarray(centres, F32):
        up, down = [c], [c]
        for _ in range(n_ulps):
            up.append(np.nextafter(up[-1], F32(np.inf)))
            down.append(np.nextafter(down[-1], F32(-np.inf)))
        out.extend(up + down)
    return np.array(out, F32)


def test_iq4_index_table_equals_best_index_int8():
    vals = iquants.KVALUES_IQ4NL
    mids = (vals[:-1].astype(F32) + vals[1:]) / 2
    x = np.concatenate([
        _float_neighbourhood(np.concatenate([mids, vals.astype(F32), [0.0, 112.0, 113.0, -127.0]])),
        np.random.default_rng(0).uniform(-140, 140, 200_000).astype(F32),
        np.array([-1e30, -128.5, 127.9, 135.0, 1e30, 1e-40, -1e-40, -0.0], F32),
    ])
    expected = _best_index_int8_literal(vals, x)
    np.testing.assert_array_equal(iquants._best_index_iq4(x.copy()), expected)


def test_nearest_int_is_ggml_magic_rounding():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49999, -7.2, 0.0, -0.0, 4194303.0], F32)
    np.testing.assert_array_equal(iquants._nearest_int(v), np.rint(v).astype(np.int32))


def _sample(rows, cols, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(F32)
    x[0, :40] = 0  # a skipped sub-block or two
    imatrix = (np.exp(rng.standard_normal(cols)) * 0.05).astype(F32)
    imatrix[3] = 0
    return x, imatrix


@pytest.mark.parametrize("qtype", sorted(iquants.QUANTIZERS))
def test_chunking_and_row_independence(qtype, monkeypatch):
    """Chunk boundaries (not aligned to rows) and row splits must not change the bytes."""
    x, imatrix = _sample(3, 768)
    whole = quant.quantize(x, qtype, imatrix=imatrix)
    monkeypatch.setattr(iquants, "_CHUNK_ELEMENTS", 160)  # 5 IQ4_NL blocks: not row-aligned
    chunked = quant.quantize(x, qtype, imatrix=imatrix)
    np.testing.assert_array_equal(chunked, whole)
    by_row = np.concatenate([quant.quantize(x[i : i + 1], qtype, imatrix=imatrix) for i in range(3)])
    np.testing.assert_array_equal(by_row, whole)


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ2_XS", "IQ1_S"])
def test_types_that_need_an_imatrix_say_so(qtype):
    x, _ = _sample(1, 256)
    with pytest.raises(UsageError, match="needs an importance matrix"):
        quant.quantize(x, qtype)


@pytest.mark.parametrize("qtype", sorted(iquants.DEQUANTIZERS))
def test_own_dequantizers_equal_gguf(qtype):
    t = quant.get_type(qtype)
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, (4, 2 * t.block_bytes), dtype=np.uint8)
    blocks = q.reshape(-1, t.block_bytes)
    blocks[:, :2] = rng.normal(0, 0.01, (len(blocks), 1)).astype("<f2").view(np.uint8)  # finite scales
    ours = quant.dequantize(q, qtype, cols=2 * t.block_size)
    theirs = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).reshape(ours.shape)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.astype(F32).view(np.uint32))


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1", "IQ3_XXS", "IQ3_S"])
def test_neighbour_lists_follow_ggml_rule(name):
    t = grid_tables(name)
    n_grid, m = t.levels.shape
    assert len(np.unique(t.codes(t.levels))) == n_grid
    n_want = {"IQ2_S": 1, "IQ1": 3, "IQ3_S": 3}.get(name, 2)
    rng = np.random.default_rng(3)
    codes = rng.choice(np.flatnonzero(t.nb_count), 50, replace=False)
    g = 2 * t.levels.astype(np.int64) + 1
    for code in codes:
        levels = (code >> (t.bits * np.arange(m))) & ((1 << t.bits) - 1)
        assert t.kmap[code] < 0
        d2 = ((g - (2 * levels + 1)) ** 2).sum(axis=1)
        cutoff = np.unique(d2)[n_want - 1]
        expected = np.lexsort((np.arange(n_grid), d2))
        expected = expected[d2[expected] <= cutoff]
        got = t.nb_flat[t.nb_start[code] : t.nb_start[code] + t.nb_count[code]]
        np.testing.assert_array_equal(got, expected)


def test_grid_codes_match_ggml_tables():
    # first entries of ggml's kgrid_2bit_256 / kgrid_256 (iq2xs_init_impl / iq3xs_init_impl)
    np.testing.assert_array_equal(grid_tables("IQ2_XXS").codes(grid_tables("IQ2_XXS").levels)[:8],
                                  [0, 2, 5, 8, 10, 17, 20, 32])
    np.testing.assert_array_equal(grid_tables("IQ3_XXS").codes(grid_tables("IQ3_XXS").levels)[:8],
                                  [0, 2, 4, 9, 11, 15, 16, 18])
