"""The vectorised search primitives against a plain scalar float32 transcription of ggml's loops.

The reference vectors (test_quant_vectors.py) cover 4 small matrices; here each primitive also
meets hostile blocks (zeros, constants, signed zeros, dead weights, ties, huge and tiny values)
and is compared with a block-at-a-time scalar version that follows the C statement by statement
(every operation a float32 scalar op, sums accumulated left to right)."""

from __future__ import annotations

import numpy as np
import pytest

from predictor import quant
from predictor.quant import _search, kquants, legacy
from predictor.quant._search import (
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    roundf,
    seq_sum,
)

f32 = np.float32
EPS = f32(1e-15)


# ------------------------------------------------------------------------ scalar transcriptions


def ni(v) -> int:
    """ggml nearest_int on one float32, through the bits."""
    val = np.array([f32(v) + f32(12582912.0)], np.float32)
    return (int(val.view(np.int32)[0]) & 0x7FFFFF) - 0x400000


def clamp(v, lo, hi):
    return max(lo, min(hi, v))


def ref_qx(x, nmax, qw):
    n = len(x)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < EPS:
        return f32(0), [0] * n
    wts = [qw[i] if qw is not None else x[i] * x[i] for i in range(n)]

    def sums(iscale):
        ls = [clamp(ni(iscale * x[i]), -nmax, nmax - 1) for i in range(n)]
        slx, sl2 = f32(0), f32(0)
        for i in range(n):
            slx = slx + wts[i] * x[i] * f32(ls[i])
            sl2 = sl2 + wts[i] * f32(ls[i]) * f32(ls[i])
        return ls, slx, sl2

    ls, sumlx, suml2 = sums(f32(-nmax) / mx)
    L = [v + nmax for v in ls]
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        ls, sumlx, suml2 = sums(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = [v + nmax for v in ls]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def ref_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return f32(0), -mn, [0] * n
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = [clamp(ni(iscale * (x[i] - mn)), 0, nmax) for i in range(n)]

    def err(s, m, ls):
        e = f32(0)
        for i in range(n):
            diff = s * f32(ls[i]) + m - x[i]
            e = e + w[i] * (abs(diff) if use_mad else diff * diff)
        return e

    best = err(scale, mn, L)
    for step in range(nstep + 1) if nstep >= 1 else ():
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - mn)
        la = [clamp(ni(iscale * (x[i] - mn)), 0, nmax) for i in range(n)]
        s_l, s_l2, s_xl = f32(0), f32(0), f32(0)
        for i in range(n):
            s_l = s_l + w[i] * f32(la[i])
            s_l2 = s_l2 + w[i] * f32(la[i]) * f32(la[i])
            s_xl = s_xl + w[i] * f32(la[i]) * x[i]
        D = sum_w * s_l2 - s_l * s_l
        if D > 0:
            this_scale = (sum_w * s_xl - sum_x * s_l) / D
            this_min = (s_l2 * sum_x - s_l * s_xl) / D
            if this_min > 0:
                this_min = f32(0)
                this_scale = s_xl / s_l2
            cur = err(this_scale, this_min, la)
            if cur < best:
                L, best, scale, mn = la, cur, this_scale, this_min
    return scale, -mn, L


def _descent(x, w, L, sumlx, suml2, lo, hi, qp):
    n = len(x)
    for _ in range(5):
        changed = 0
        for i in range(n):
            wi = w[i]
            slx = sumlx - wi * x[i] * f32(L[i])
            sl2 = suml2 - wi * f32(L[i]) * f32(L[i])
            if slx > 0 and (sl2 > 0 if qp else True):
                new_l = ni(x[i] * sl2 / slx)
                new_l = min(hi, new_l) if qp else clamp(new_l, lo, hi)
                if new_l != L[i]:
                    slx = slx + wi * x[i] * f32(new_l)
                    sl2 = sl2 + wi * f32(new_l) * f32(new_l)
                    if (qp or sl2 > 0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = (new_l & 0xFF) if qp else new_l
                        sumlx, suml2 = slx, sl2
                        changed += 1
        if not changed:
            break
    return sumlx, suml2


def ref_q3(x, nmax):
    n = len(x)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < EPS:
        return f32(0), [0] * n
    iscale = f32(-nmax) / mx
    L = [clamp(ni(iscale * x[i]), -nmax, nmax - 1) for i in range(n)]
    w = [x[i] * x[i] for i in range(n)]
    sumlx, suml2 = f32(0), f32(0)
    for i in range(n):
        sumlx = sumlx + w[i] * x[i] * f32(L[i])
        suml2 = suml2 + w[i] * f32(L[i]) * f32(L[i])
    sumlx, suml2 = _descent(x, w, L, sumlx, suml2, -nmax, nmax - 1, False)
    return (sumlx / suml2 if suml2 > 0 else f32(0)), [v + nmax for v in L]


def ref_qp(x, nmax, w):
    n = len(x)
    mx = f32(0)
    for v in x:
        mx = max(mx, v)
    if mx < EPS:
        return f32(0), [0] * n
    iscale = f32(nmax) / mx
    L = [ni(iscale * x[i]) & 0xFF for i in range(n)]
    scale = f32(1) / iscale
    best = f32(0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best = best + w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / mx
        scale_is = f32(1) / iscale_is
        mse = f32(0)
        for i in range(n):
            diff = x[i] - scale_is * f32(min(nmax, ni(iscale_is * x[i])))
            mse = mse + w[i] * diff * diff
        if mse < best:
            best, iscale = mse, iscale_is
    sumlx, suml2 = f32(0), f32(0)
    for i in range(n):
        l = min(nmax, ni(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx = sumlx + w[i] * x[i] * f32(l)
        suml2 = suml2 + w[i] * f32(l) * f32(l)
    sumlx, suml2 = _descent(x, w, L, sumlx, suml2, 0, nmax, True)
    return (sumlx / suml2 if suml2 > 0 else f32(0)), L


# ----------------------------------------------------------------------------- hostile blocks


def hostile_blocks(n: int, n_random: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, weights) float32 (k, n): edge cases first, then random heavy-tailed blocks."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n).astype(f32)
    cases = [
        np.zeros(n), np.full(n, 0.5), np.full(n, -0.03125), g * 1e-7, g * 300, np.abs(g) * 0.02,
        -np.abs(g) * 0.02, np.round(g * 4) / 8, np.linspace(-1, 1, n), np.eye(1, n, n // 2)[0] * 0.7,
        np.where(np.arange(n) < n // 2, 0.0, g * 0.02), np.r_[[-0.0] * (n // 2), np.abs(g[n // 2:])],
        np.r_[np.abs(g[: n // 2]) * 0.02, [0.0] * (n // 2)], np.r_[[-0.0], np.abs(g[1:])],
    ]
    x = np.stack([np.asarray(c, f32) for c in cases])
    x = np.concatenate([x, (rng.standard_t(3, (n_random, n)) * 0.02).astype(f32)])
    w = (np.exp(rng.standard_normal(x.shape)) * 0.05).astype(f32)
    w[1, :] = 0  # all weights dead
    w[2:6, ::5] = 0  # some dead channels
    return x, w


def _as_f32_lists(a):
    return [[f32(v) for v in row] for row in a]


# ---------------------------------------------------------------------------------- the tests


def test_nearest_int_matches_ggml_bits_everywhere():
    rng = np.random.default_rng(1)
    v = np.concatenate([
        rng.uniform(-100, 100, 2000), np.arange(-20, 20) + 0.5, [4194303.0, -4194303.0, 5e6, -3e9, 1e30],
    ]).astype(f32)
    got = nearest_int(v)
    assert got.dtype == np.int32
    assert [ni(a) for a in v] == got.tolist()
    inside = np.abs(v) <= 4194303
    assert np.array_equal(got[inside], np.rint(v[inside]).astype(np.int32))  # half to even
    assert nearest_int(f32(2.5)) == 2 and nearest_int(f32(-3.5)) == -4


def test_roundf_is_half_away_from_zero():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.4999998], f32)
    assert roundf(v).tolist() == [1, 2, 3, -1, -3, 0, 0, 127, 3]


@pytest.mark.parametrize("shape", [(32, 1), (16, 2), (256, 1), (256, 3), (7, 50)])
def test_seq_sum_adds_left_to_right(shape):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, shape)).astype(f32)
    expected = np.zeros(shape[1], f32)
    for row in a:
        expected = expected + row
    assert np.array_equal(seq_sum(a), expected)
    assert np.array_equal(seq_sum(a.T.copy(), axis=1), expected)
    # numpy's pairwise sum differs on this data for at least one long column; the test is sharp
    if shape[0] >= 32 and shape[1] == 1:
        assert not np.array_equal(np.sum(a, axis=0), expected)


def test_seq_sum_start_with_first_keeps_negative_zero():
    a = np.array([[-0.0, 1.0], [-0.0, 2.0]], f32)
    assert np.signbit(seq_sum(a, start_with_first=True)[0])
    assert not np.signbit(seq_sum(a)[0])


@pytest.mark.parametrize(
    "n,nmax,weighted", [(32, 8, True), (32, 16, True), (16, 4, True), (16, 32, False), (16, 32, True)]
)
def test_make_qx_quants_matches_scalar(n, nmax, weighted):
    x, w = hostile_blocks(n, 12, seed=n + nmax)
    scale, L = make_qx_quants(x, nmax, w if weighted else None)
    for b, (xb, wb) in enumerate(zip(_as_f32_lists(x), _as_f32_lists(w))):
        s_ref, L_ref = ref_qx(xb, nmax, wb if weighted else None)
        assert scale[b].tobytes() == f32(s_ref).tobytes(), b
        assert L[b].tolist() == L_ref, b


@pytest.mark.parametrize(
    "n,nmax,params,weights",
    [
        (32, 15, (-0.9, 0.05, 36, False), "qw"),  # Q4_1 / Q4_K imatrix
        (32, 31, (-0.5, 0.1, 15, False), "avx"),  # Q5_K reference
        (16, 3, (-0.5, 0.1, 15, True), "abs"),  # Q2_K reference (mean absolute deviation)
        (16, 3, (-0.9, 0.05, 36, False), "x2"),  # make_qkx3 default weights
    ],
)
def test_make_qkx_quants_matches_scalar(n, nmax, params, weights):
    x, qw = hostile_blocks(n, 10, seed=nmax)
    if weights == "qw":
        w = qw
    elif weights == "avx":
        w = (np.sqrt((x * x).sum(axis=1, keepdims=True) / f32(n)) + np.abs(x)).astype(f32)
    elif weights == "abs":
        w = np.abs(x)
    else:
        w = x * x
    fn = make_qkx3_quants if weights == "x2" else make_qkx2_quants
    scale, the_min, L = fn(x, None if weights == "x2" else w, nmax, *params)
    for b, (xb, wb) in enumerate(zip(_as_f32_lists(x), _as_f32_lists(w))):
        s_ref, m_ref, L_ref = ref_qkx(xb, wb, nmax, *params)
        assert scale[b].tobytes() == f32(s_ref).tobytes(), b
        assert the_min[b].tobytes() == f32(m_ref).tobytes(), b
        assert L[b].tolist() == L_ref, b


def test_make_q3_quants_matches_scalar():
    x, _ = hostile_blocks(16, 30, seed=3)
    scale, L = make_q3_quants(x, 4)
    for b, xb in enumerate(_as_f32_lists(x)):
        s_ref, L_ref = ref_q3(xb, 4)
        assert scale[b].tobytes() == f32(s_ref).tobytes(), b
        assert L[b].tolist() == L_ref, b


@pytest.mark.parametrize("n,nmax", [(8, 63), (16, 15)])
def test_make_qp_quants_matches_scalar(n, nmax):
    x, w = hostile_blocks(n, 30, seed=n)
    x = np.abs(x) * f32(0.01)  # sub-block scales and mins: non-negative, small
    x[3, 2] = f32(-0.004)  # a negative input exercises ggml's uint8 wrap of the level
    scale, L = make_qp_quants(x, nmax, w)
    for b, (xb, wb) in enumerate(zip(_as_f32_lists(x), _as_f32_lists(w))):
        s_ref, L_ref = ref_qp(xb, nmax, wb)
        assert scale[b].tobytes() == f32(s_ref).tobytes(), b
        assert L[b].tolist() == L_ref, b


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_row_chunks_and_threads_do_not_change_bytes(qtype, monkeypatch):
    rng = np.random.default_rng(4)
    x = (rng.standard_t(4, (12, 512)) * 0.02).astype(f32)
    imatrix = (np.exp(rng.standard_normal(512)) * 0.05).astype(f32)
    for imat in (None, imatrix):
        whole = np.concatenate([quant.quantize(x[r : r + 1], qtype, imatrix=imat) for r in range(12)])
        for threads in (1, 3):
            monkeypatch.setattr(legacy, "CHUNK_ELEMENTS", 1024)
            monkeypatch.setattr(legacy, "CHUNK_ELEMENTS_SIMPLE", 1024)
            monkeypatch.setattr(kquants, "CHUNK_ELEMENTS", 1024)
            _search.set_num_threads(threads)
            try:
                got = quant.quantize(x, qtype, imatrix=imat)
            finally:
                _search.set_num_threads(None)
            assert np.array_equal(got, whole)


ALL_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_inverts_quantize_within_one_step(qtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 512)) * 0.02).astype(f32)
    q = quant.quantize(x, qtype)
    y = quant.dequantize(q, qtype, cols=512)
    assert y.dtype == np.float32 and y.shape == x.shape
    # relative RMS error shrinks with the bit count; these bounds are loose but catch layout bugs
    bound = {"Q2_K": 0.5, "Q3_K": 0.3, "Q4_0": 0.15, "Q4_1": 0.15, "Q4_K": 0.15}.get(qtype, 0.06)
    assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)) < bound
