"""ggml's non-linear, lattice and ternary quantizers in numpy, byte-exact with ggml_quantize_chunk.

Registered: IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M
(IQ2_XXS, IQ2_XS and IQ1_S need an importance matrix, as in ggml). Own dequantizers for IQ4_NL/XS;
the others dequantize through gguf.quants (see predictor.quant.dequantize).

Exactness rules followed throughout: float32 only, one rounding per C operation (no fusing), C's
evaluation order `(a*b)*c`, sequential float32 sums where a sum feeds a decision (`seq_sum`, never
the pairwise `np.sum`), ggml's nearest_int and fp16 rounding, first-wins tie breaking of its scans.
Everything is vectorised over blocks; Python loops run only over element positions, search steps
and candidates. The searches lay arrays out element-major, `(block_size, n_blocks)`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from predictor.errors import UsageError
from predictor.quant._iq_grids import best_neighbours, grid_tables
from predictor.quant._search import get_num_threads, roundf, seq_sum
from predictor.quant._search import nearest_int as _nearest_int

F32 = np.float32
QK_K = 256

# Elements per chunk: bounds the temporaries of the searches (a few dozen arrays this size).
_CHUNK_ELEMENTS = 1 << 15


# ---------------------------------------------------------------------------------------------- helpers


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """C's `s = 0; s += a[i]` over axis 0 (element-major arrays of any rank), float32, in order."""
    return seq_sum(a.reshape(a.shape[0], -1)).reshape(a.shape[1:])


def _seq_sum_last(a: np.ndarray) -> np.ndarray:
    """The same over the last axis."""
    return _seq_sum(np.moveaxis(a, -1, 0))


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 (round to nearest even, like GGML_FP32_TO_FP16) as (n, 2) little-endian bytes."""
    return np.ascontiguousarray(d, dtype=F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _safe_recip(d: np.ndarray) -> np.ndarray:
    """`d ? 1/d : 0` in float32."""
    out = np.zeros_like(d)
    nz = d != 0
    np.divide(F32(1), d, out=out, where=nz)
    return out


def _blockwise(x, imatrix, super_block, block_bytes, fn, chunk_elements=None):
    """Run fn(xb (n, super_block), qwb (n, super_block) | None) -> uint8 (n, block_bytes) in chunks.

    ggml quantizes rows independently and each super-block only sees its own importance slice, so the
    whole matrix is a flat list of super-blocks; the imatrix slice of super-block g is g mod blocks/row.
    Chunks bound the temporaries and run on get_num_threads() threads (numpy releases the GIL)."""
    rows, cols = x.shape
    per_row = cols // super_block
    flat = x.reshape(-1, super_block)
    qw_blocks = None if imatrix is None else np.asarray(imatrix, dtype=F32).reshape(per_row, super_block)
    n = flat.shape[0]
    out = np.empty((n, block_bytes), np.uint8)
    step = max(1, (chunk_elements or _CHUNK_ELEMENTS) // super_block)

    def work(start):
        stop = min(n, start + step)
        qwb = None if qw_blocks is None else qw_blocks[np.arange(start, stop) % per_row]
        out[start:stop] = fn(flat[start:stop], qwb)

    starts = range(0, n, step)
    n_threads = min(get_num_threads(), len(starts))
    if n_threads <= 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            for f in [pool.submit(work, start) for start in starts]:
                f.result()
    return out.reshape(rows, -1)


# ------------------------------------------------------------------------------------ IQ4_NL / IQ4_XS

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_VALS = KVALUES_IQ4NL.astype(F32)


def _nearest_thresholds(values: np.ndarray) -> np.ndarray:
    """For each adjacent pair (a, b) the smallest float32 x with fl(x - a) >= fl(b - x): from there on
    best_index_int8 picks b. The test is monotone in x, so one threshold per pair describes it exactly."""
    out = []
    for a, b in zip(values[:-1].astype(F32), values[1:].astype(F32)):
        def picks_upper(x, a=a, b=b):
            return F32(x - a) >= F32(b - x)
        x = F32((float(a) + float(b)) / 2)
        while picks_upper(np.nextafter(x, F32(-np.inf))):
            x = np.nextafter(x, F32(-np.inf))
        while not picks_upper(x):
            x = np.nextafter(x, F32(np.inf))
        out.append(x)
    return np.array(out, F32)


# best_index_int8 over kvalues_iq4nl is a step function whose steps all sit on multiples of 1/2, so the
# index is a table lookup on floor(2*x). The table spans |x| < 136, more than any search scale reaches.
_IQ4_THRESH = _nearest_thresholds(KVALUES_IQ4NL)
assert np.array_equal(_IQ4_THRESH * 2, np.floor(_IQ4_THRESH * 2)), "IQ4 steps are not on half-integers"
_IQ4_HALF_OFFSET = 272
_IQ4_INDEX = np.searchsorted(
    _IQ4_THRESH * 2, np.arange(-_IQ4_HALF_OFFSET, _IQ4_HALF_OFFSET), side="right"
).astype(np.uint8)
_IQ4_VALUE = _IQ4_VALS[_IQ4_INDEX]


def _half_bucket(al2: np.ndarray, clip: bool) -> np.ndarray:
    """Table row for doubled scaled values al2 = 2*x (int32 >= 0); clip for unbounded inputs.
    Overwrites al2."""
    if clip:
        np.clip(al2, F32(-256), F32(256), out=al2)
    np.floor(al2, out=al2)
    k = al2.astype(np.int32)
    k += _IQ4_HALF_OFFSET
    return k


def _best_index_iq4(al: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, al), element-wise (uint8 0..15)."""
    with np.errstate(over="ignore"):
        al2 = al * F32(2)
    return _IQ4_INDEX.take(_half_bucket(al2, clip=True))


def _iq4_block_scales(X, W, ntry=7):
    """Scale search of quantize_row_iq4_nl_impl for 32-element blocks; X and W are (32, n)."""
    n = X.shape[1]
    ax = np.abs(X)
    imax = np.argmax(ax, axis=0)  # first index of the largest |x|, as the strict `>` loop
    cols = np.arange(n)
    amax = ax[imax, cols]
    mx = X[imax, cols]
    empty = amax < F32(1e-15)
    mx = np.where(empty, F32(1), mx)  # avoid 1/0; these blocks get scale 0 below
    wq = np.empty_like(X)
    al2 = np.empty_like(X)
    prods = np.empty((X.shape[0], 2, n), F32)  # w*q*x and w*q*q side by side: one loop sums both

    def sums(inv):
        # 2*(inv*x) == (2*inv)*x exactly (power of two), so the doubling is folded into the scale
        np.multiply(X, inv * F32(2), out=al2)
        q = _IQ4_VALUE.take(_half_bucket(al2, clip=False))
        np.multiply(W, q, out=wq)
        np.multiply(wq, X, out=prods[:, 0])
        np.multiply(wq, q, out=prods[:, 1])
        s = _seq_sum(prods)
        return s[0], s[1]

    with np.errstate(divide="ignore", invalid="ignore"):
        d = (-mx) / F32(KVALUES_IQ4NL[0]) if ntry > 0 else mx / F32(KVALUES_IQ4NL[0])
        sumqx, sumq2 = sums(F32(1) / d)
        pos = sumq2 > 0
        d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry + int(KVALUES_IQ4NL[0])) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / np.where(better, sumq2, F32(1)), d)
            best = np.where(better, d * sumqx, best)
    d[empty] = 0
    return d


def _iq4_weights(xb, qwb):
    """Search weights: x^2 without imatrix, else qw * sqrt(sigma2 + x^2) with
    sigma2 = 2 * sum(x^2 over the super-block) / super_block_size (sequential sum)."""
    x2 = xb * xb
    if qwb is None:
        return x2
    sigma2 = np.add.accumulate(x2, axis=1)[:, -1] * F32(2.0 / xb.shape[1])
    return qwb * np.sqrt(sigma2[:, None] + x2)


def _pack_nibbles32(L: np.ndarray) -> np.ndarray:
    """(n, 32) indices -> (n, 16) bytes: byte j holds element j (low nibble) and element j+16 (high)."""
    L = L.astype(np.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _iq4nl_blocks(xb, qwb):
    n = xb.shape[0]
    W = _iq4_weights(xb, qwb)
    X = np.ascontiguousarray(xb.T)
    d = _iq4_block_scales(X, np.ascontiguousarray(W.T))
    L = _best_index_iq4(_safe_recip(d)[:, None] * xb)
    out = np.empty((n, 18), np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = _pack_nibbles32(L)
    return out


def _iq4xs_blocks(xb, qwb):
    n = xb.shape[0]
    W = _iq4_weights(xb, qwb)
    X = np.ascontiguousarray(xb.reshape(n * 8, 32).T)
    scales = _iq4_block_scales(X, np.ascontiguousarray(W.reshape(n * 8, 32).T)).reshape(n, 8)
    rows = np.arange(n)
    max_scale = scales[rows, np.argmax(np.abs(scales), axis=1)]
    d = -max_scale / F32(32)
    l = np.clip(_nearest_int(_safe_recip(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(F32)
    idl = _safe_recip(dl)
    with np.errstate(invalid="ignore", over="ignore"):
        al = (idl[:, :, None] * xb.reshape(n, 8, 32)).reshape(n, QK_K)
    al[np.isnan(al)] = np.inf  # inf*0 (1/dl overflowed): ggml's binary search ends on the top value
    L = _best_index_iq4(al)
    ls = (l + 32).astype(np.uint16)
    # block_iq4_xs: d fp16 | scales_h u16 (2 high bits of 6-bit scale ib at bits 2ib) |
    #               scales_l[4] (low nibbles, ib even -> low half) | qs[128]
    scales_h = np.zeros(n, np.uint16)
    for ib in range(8):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    lo = (ls & 0xF).astype(np.uint8)
    out = np.empty((n, 136), np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:4] = scales_h.astype("<u2").view(np.uint8).reshape(n, 2)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:] = _pack_nibbles32(L.reshape(n * 8, 32)).reshape(n, 128)
    return out


def quantize_iq4_nl(x, imatrix):
    return _blockwise(x, imatrix, 32, 18, _iq4nl_blocks)


def quantize_iq4_xs(x, imatrix):
    return _blockwise(x, imatrix, QK_K, 136, _iq4xs_blocks)


def _unpack_nibbles32(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) indices; inverse of _pack_nibbles32."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def dequantize_iq4_nl(q, cols):
    b = q.reshape(-1, 18)
    d = b[:, :2].copy().view("<f2").astype(F32)
    v = _IQ4_VALS[_unpack_nibbles32(b[:, 2:])]
    return (d * v).reshape(q.shape[0], cols)


def dequantize_iq4_xs(q, cols):
    b = q.reshape(-1, 136)
    n = b.shape[0]
    d = b[:, :2].copy().view("<f2").astype(F32)  # (n, 1)
    scales_h = b[:, 2:4].copy().view("<u2").astype(np.int32)  # (n, 1)
    lo = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=2).reshape(n, 8).astype(np.int32)
    hi = (scales_h >> (2 * np.arange(8))) & 3
    ls = (lo | (hi << 4)) - 32
    dl = d * ls.astype(F32)  # (n, 8)
    v = _IQ4_VALS[_unpack_nibbles32(b[:, 8:].reshape(n * 8, 16))].reshape(n, 8, 32)
    return (dl[:, :, None] * v).reshape(q.shape[0], cols)


# ------------------------------------------------------------------------------ TQ1_0 / TQ2_0 / MXFP4


def _ternary(xb):
    """Shared by TQ1_0/TQ2_0: d = max|x| (fp16), trits lround(x/d) + 1 in 0..2."""
    amax = np.abs(xb).max(axis=1)  # a max is order-independent
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(1) / amax, F32(0)).astype(F32)
    return amax, (roundf(xb * inv[:, None]).astype(np.int32) + 1).astype(np.uint8)


def _pack_trits(t: np.ndarray) -> np.ndarray:
    """(n, 5, m) trits, first one most significant -> (n, m) bytes scaled so a byte times 3 >> 8
    recovers the leading trit: ceil(q * 256 / 243)."""
    q = np.zeros(t.shape[::2], np.uint16)
    for k in range(t.shape[1]):
        q = q * 3 + t[:, k]
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _tq1_0_blocks(xb, qwb):
    # block_tq1_0: qs[48] | qh[4] | d fp16.  qs[m] (m < 32) packs elements m + 32k, k = 0..4;
    # qs[32 + m] (m < 16) packs 160 + m + 16k; qh[j] packs 240 + j + 4k (k = 0..3) and a zero trit.
    n = xb.shape[0]
    amax, t = _ternary(xb)
    out = np.empty((n, 54), np.uint8)
    out[:, 0:32] = _pack_trits(t[:, :160].reshape(n, 5, 32))
    out[:, 32:48] = _pack_trits(t[:, 160:240].reshape(n, 5, 16))
    qh = np.concatenate([t[:, 240:].reshape(n, 4, 4), np.zeros((n, 1, 4), np.uint8)], axis=1)
    out[:, 48:52] = _pack_trits(qh)
    out[:, 52:54] = _fp16_bytes(amax)
    return out


def _tq2_0_blocks(xb, qwb):
    # block_tq2_0: qs[64] | d fp16.  qs[32c + m] holds element 128c + m + 32k in bits 2k..2k+1.
    n = xb.shape[0]
    amax, t = _ternary(xb)
    t = t.reshape(n, 2, 4, 32)
    qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    out = np.empty((n, 66), np.uint8)
    out[:, :64] = qs.reshape(n, 64)
    out[:, 64:] = _fp16_bytes(amax)
    return out


KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2**(e - 128) as float32 (subnormal for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(F32)


def _mxfp4_blocks(xb, qwb):
    # block_mxfp4: e (E8M0 exponent) | qs[16], byte j = element j (low nibble) | element j+16 (high)
    n = xb.shape[0]
    amax = np.abs(xb).max(axis=1)
    # floorf(log2f(amax)): log2 in float64 rounded to float32 is the correctly rounded log2f
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(amax.astype(np.float64)).astype(F32))
    e = np.where(amax > 0, (lg - 2 + 127), 0).astype(np.int32).astype(np.uint8)
    d = _e8m0_half(e)
    vals = KVALUES_MXFP4.astype(F32)
    best = np.zeros(xb.shape, np.uint8)
    best_err = np.abs(vals[0] * d[:, None] - xb)
    for i in range(1, 16):
        err = np.abs(vals[i] * d[:, None] - xb)
        better = err < best_err  # strict: the first of equal candidates wins, as in ggml
        best[better] = i
        np.minimum(best_err, err, out=best_err)
    out = np.empty((n, 17), np.uint8)
    out[:, 0] = e
    out[:, 1:] = _pack_nibbles32(best)
    return out


def quantize_tq1_0(x, imatrix):
    return _blockwise(x, None, QK_K, 54, _tq1_0_blocks)


def quantize_tq2_0(x, imatrix):
    return _blockwise(x, None, QK_K, 66, _tq2_0_blocks)


def quantize_mxfp4(x, imatrix):
    return _blockwise(x, None, 32, 17, _mxfp4_blocks)


# --------------------------------------------------------------------- IQ2 / IQ3 lattice searches
#
# All of quantize_row_iq2_xxs/iq2_xs/iq2_s/iq3_xxs/iq3_s_impl share one shape: per sub-block, take
# |x| (choosing signs), try a range of scales; at each, round every group of m values to levels
# l = nearest_int((x/scale - 1)/2), look the level vector up in the grid, and if it is not a grid point
# take the best of its precomputed neighbours; keep the scale with the best weighted fit; finally
# re-round at the chosen scale. The pieces that differ between the types are parameters.


def _flip_signs(xb, weight, parity: bool):
    """xval = |x| (ggml keeps -0.0 as is) and a sign byte per group of 8.

    With parity (IQ2_XXS/XS, IQ3_XXS) only 7 sign bits are stored, so an odd number of negatives is
    made even by flipping the element with the smallest weight*x*x (first on ties)."""
    n, B = xb.shape
    neg = xb < 0
    xval = np.where(neg, -xb, xb)
    neg8 = neg.reshape(n, B // 8, 8)
    bits = (neg8.astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    if parity:
        odd = neg8.sum(axis=2) % 2 == 1
        if odd.any():
            ax = ((weight * xb) * xb).reshape(n, B // 8, 8)
            imin = np.argmin(ax, axis=2)
            bi, gi = np.nonzero(odd)
            col = gi * 8 + imin[bi, gi]
            xval[bi, col] = -xval[bi, col]
            bits[bi, gi] ^= (1 << imin[bi, gi]).astype(np.uint8)
        bits &= 127
    return xval, bits


def _grid_assign(tab, Xg, Wag, inv, nb_scale, kmaxq):
    """Round groups Xg (k, G, m) at 1/inv to grid points; off-grid codes go to their best neighbour
    (judged at nb_scale). Returns (levels (k, G, m) uint8, on_grid (k, G), grid index (k, G))."""
    l = _nearest_int(F32(0.5) * (inv[:, None, None] * Xg - F32(1)))
    np.clip(l, 0, kmaxq - 1, out=l)
    u = tab.codes(l)
    gi = tab.kmap[u]
    off = gi < 0
    if off.any():
        bi, gk = np.nonzero(off)
        gi[bi, gk] = best_neighbours(tab, u[bi, gk], Xg[bi, gk], Wag[bi, gk], nb_scale[bi])
    return tab.levels[gi], ~off, gi


def _weighted_fit(W, WX, L):
    """sum(w*x*q), sum(w*q*q) with q = 2l+1, in ggml's element order."""
    q = F32(2) * L.astype(F32) + F32(1)
    return _seq_sum_last(WX * q), _seq_sum_last((W * q) * q)


def _grid_search(tab, Xv, W, Wa, denom, nums, kmaxq, scale0, on_grid0, final):
    """The scale search shared by the IQ2/IQ3 quantizers for k active sub-blocks.

    Xv, W, Wa: (k, B) |x|, weights, sqrt(weights). Try t uses 1/scale = nums[t] / denom. `final` says
    which groups are re-rounded at the chosen scale: "offgrid" (those whose best try was off the grid),
    "all_if_offgrid" (all of them when any was off the grid) or "all". Returns levels (k, B) uint8 and
    the sub-block scales (k,) float32 (possibly negative, as in ggml)."""
    k, B = Xv.shape
    m = tab.group_size
    G = B // m
    Xg = Xv.reshape(k, G, m)
    Wag = Wa.reshape(k, G, m)
    WX = W * Xv
    scale = scale0.astype(F32).copy()
    best = np.zeros(k, F32)
    L = np.zeros((k, G, m), np.uint8)
    on_grid = np.full((k, G), on_grid0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for num in nums:
            inv = F32(num) / denom
            Laux, on, _ = _grid_assign(tab, Xg, Wag, inv, F32(1) / inv, kmaxq)
            sumqx, sumq2 = _weighted_fit(W, WX, Laux.reshape(k, B))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / sumq2, scale)
            best = np.where(better, scale * sumqx, best)
            L[better] = Laux[better]
            on_grid[better] = on[better]
        if final == "all":
            redo = np.ones((k, G), bool)
            go = scale > 0
        else:
            redo = ~on_grid if final == "offgrid" else np.repeat(~on_grid.all(axis=1)[:, None], G, 1)
            go = (scale > 0) & redo.any(axis=1)
        blocks = np.flatnonzero(go)
        if len(blocks):
            sc = scale[blocks]
            Lr, _, _ = _grid_assign(tab, Xg[blocks], Wag[blocks], F32(1) / sc, sc, kmaxq)
            Lb = L[blocks]
            rb = redo[blocks]
            Lb[rb] = Lr[rb]
            L[blocks] = Lb
            sumqx, sumq2 = _weighted_fit(W[blocks], WX[blocks], Lb.reshape(len(blocks), B))
            scale[blocks] = np.where(sumq2 > 0, sumqx / sumq2, sc)
    return L.reshape(k, B), scale


def _make_qp_quants(x, nmax, w):
    """ggml's make_qp_quants for rows of x (k, n) with weights w; returns the scale (k,).

    Faithful to C's types: L is a uint8 array there, so a negative level (possible when one value was
    sign-flipped) wraps to 256 + l in the steps that re-read L."""
    k, n = x.shape
    mx = np.maximum(x.max(axis=1), F32(0))
    out = np.zeros(k, F32)
    act = ~(mx < F32(1e-15))
    if not act.any():
        return out
    x, w, mx = x[act], w[act], mx[act]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / mx
        L = (_nearest_int(iscale[:, None] * x) & 0xFF).astype(F32)
        sc = F32(1) / iscale
        diff = x - sc[:, None] * L
        best_mse = _seq_sum_last((w * diff) * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
            sc_is = F32(1) / iscale_is
            l = np.minimum(_nearest_int(iscale_is[:, None] * x), nmax).astype(F32)
            diff = x - sc_is[:, None] * l
            mse = _seq_sum_last((w * diff) * diff)
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, iscale_is, iscale)
        li = np.minimum(_nearest_int(iscale[:, None] * x), nmax)
        l = li.astype(F32)
        wx = w * x
        sumlx = _seq_sum_last(wx * l)
        suml2 = _seq_sum_last((w * l) * l)
        Lu = (li & 0xFF).astype(F32)  # what C's uint8 L holds
        for _ in range(5):  # a pass without changes leaves the state as it was, so no early exit needed
            for i in range(n):
                wi, xi, Li = w[:, i], x[:, i], Lu[:, i]
                slx = sumlx - wx[:, i] * Li
                sl2 = suml2 - (wi * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(_nearest_int((xi * sl2) / slx), nmax)
                nl = new_l.astype(F32)
                ok &= new_l != Li.astype(np.int32)
                slx = slx + wx[:, i] * nl
                sl2 = sl2 + (wi * nl) * nl
                ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                Lu[:, i] = np.where(ok, (new_l & 0xFF).astype(F32), Li)
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
        out[act] = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return out


def _search_weights(xb, qwb, sigma_factor, fallback):
    """Per-element weights of the IQ2/IQ3 searches: qw*sqrt(sigma2 + x^2) with
    sigma2 = sigma_factor * sum(x^2 over the 256 super-block) / 256 (sequential sum);
    without an imatrix, fallback(x2, sigma2)."""
    x2 = xb * xb
    sumx2 = np.add.accumulate(x2, axis=1)[:, -1]
    if sigma_factor != 1:
        sumx2 = F32(sigma_factor) * sumx2
    sigma2 = (sumx2 / F32(QK_K))[:, None]
    if qwb is not None:
        return qwb * np.sqrt(sigma2 + x2)
    return fallback(x2, sigma2)


def _sub_block_scale_codes(scales, fudge):
    """Super-block scale d (stored as fp16(d*fudge)) and 4-bit sub-block codes
    nearest_int((scale/d - 1)/2) with d = max_scale/31; scales (n, n_sub)."""
    max_scale = scales.max(axis=1)
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = F32(1) / d
        codes = np.clip(_nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15)
    dh = d * F32(fudge) if fudge != 1 else d
    return max_scale, dh, codes.astype(np.uint32)


@dataclass(frozen=True)
class _LatticeSpec:
    grid: str  # key of _iq_grids.grid_tables
    sub: int  # sub-block size B
    kmaxq: int  # levels 0..kmaxq-1
    sigma_factor: int  # sigma2 = factor * sum(x^2)/256
    fallback: object  # weights without imatrix, f(x2, sigma2); None: imatrix required
    parity: bool  # 7 stored sign bits per 8 values
    eps: float  # sub-blocks with max |x| below this are skipped (0: only exact zeros)
    nums: tuple  # numerators of the tried inverse scales
    first_scale: str  # "max" (max / (2*kmaxq-1)) or "qp" (make_qp_quants; tries relative to 3*scale)
    on_grid0: bool
    final: str


def _lattice_sub_blocks(spec: _LatticeSpec, xb, qwb):
    """Run the search on every sub-block of the super-blocks xb (n, 256).

    Returns grid indices (n_sub, B/m), sign bytes (n_sub, B/8), scales (n_sub,) >= 0 and the
    active mask (skipped sub-blocks have index 0, signs 0, scale 0)."""
    n = xb.shape[0]
    B = spec.sub
    tab = grid_tables(spec.grid)
    m = tab.group_size
    W = _search_weights(xb, qwb, spec.sigma_factor, spec.fallback).reshape(-1, B)
    xval, signs = _flip_signs(xb.reshape(-1, B), W, spec.parity)
    n_sub = xval.shape[0]
    mx = xval.max(axis=1)
    active = (mx != 0) if spec.eps == 0 else ~(mx < F32(spec.eps))
    scales = np.zeros(n_sub, F32)
    gidx = np.zeros((n_sub, B // m), np.int32)
    if spec.first_scale == "qp":
        first = np.zeros(n_sub, F32)
        if active.any():
            first[active] = _make_qp_quants(xval[active], spec.kmaxq + 1, W[active])
        denom = first * F32(spec.kmaxq)
        active &= denom > 0
    else:
        first = mx / F32(2 * spec.kmaxq - 1)
        denom = mx
    act = np.flatnonzero(active)
    if len(act):
        Wa = W[act]
        L, sc = _grid_search(tab, xval[act], Wa, np.sqrt(Wa), denom[act], spec.nums, spec.kmaxq,
                             first[act], spec.on_grid0, spec.final)
        g = tab.kmap[tab.codes(L.reshape(len(act), B // m, m))]
        assert (g >= 0).all(), "level vector not on the grid"  # ggml aborts here
        gidx[act] = g
        neg = act[sc < 0]  # "should never happen" in ggml, which then flips the signs
        signs[neg] = ~signs[neg] & (127 if spec.parity else 255)
        scales[act] = np.abs(sc)
    signs[~active] = 0
    return gidx, signs, scales, active


def _nums(center, step, lo, hi):
    return tuple(F32(center) + F32(i) * F32(step) for i in range(lo, hi + 1))


_IQ3_XXS = _LatticeSpec("IQ3_XXS", 32, 8, 2, lambda x2, s2: x2, True, 1e-8, _nums(15, 0.2, -15, 15),
                        "max", True, "offgrid")
_IQ3_S = _LatticeSpec("IQ3_S", 32, 8, 2, lambda x2, s2: x2, False, 0, _nums(15, 0.2, -9, 9),
                      "max", False, "all_if_offgrid")
_IQ2_XXS = _LatticeSpec("IQ2_XXS", 32, 3, 1, None, True, 1e-15, _nums(5, 0.1, -6, 6), "qp", True, "all")
_IQ2_XS = _LatticeSpec("IQ2_XS", 16, 3, 1, None, True, 1e-15, _nums(5, 0.1, -9, 9), "max", True, "offgrid")
_IQ2_S = _LatticeSpec("IQ2_S", 16, 3, 2, lambda x2, s2: F32(0.25) * s2 + x2, False, 1e-8,
                      _nums(5, 0.1, -9, 9), "max", True, "offgrid")


def _iq3xxs_blocks(xb, qwb):
    n = xb.shape[0]
    gidx, signs, scales, _ = _lattice_sub_blocks(_IQ3_XXS, xb, qwb)
    max_scale, dh, codes = _sub_block_scale_codes(scales.reshape(n, 8), 1.0125)
    # block_iq3_xxs: d fp16 | 64 grid indices (8 per 32-block) | 8 x u32: 4 x 7 sign bits, 4-bit scale
    s = signs.reshape(n, 8, 4).astype(np.uint32)
    words = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (codes << 28)
    out = np.zeros((n, 98), np.uint8)
    live = max_scale != 0
    out[:, :2] = _fp16_bytes(np.where(live, dh, F32(0)))
    out[live, 2:66] = gidx.reshape(n, 64)[live].astype(np.uint8)
    out[live, 66:98] = words[live].astype("<u4").view(np.uint8).reshape(-1, 32)
    return out


def _iq3s_blocks(xb, qwb):
    n = xb.shape[0]
    gidx, signs, scales, active = _lattice_sub_blocks(_IQ3_S, xb, qwb)
    max_scale, dh, codes = _sub_block_scale_codes(scales.reshape(n, 8), 1.033)
    gidx = gidx.reshape(n, 8, 8)
    signs = signs.reshape(n, 8, 4)
    active = active.reshape(n, 8)
    # block_iq3_s: d fp16 | qs[64] low 8 bits of grid indices | qh[8] (bit k of qh[ib]: 9th bit of
    # index k of sub-block ib) | signs[32] | scales[4] (two 4-bit codes per byte).
    # ggml advances its qs/signs pointers only past sub-blocks it did not skip (all-zero ones), so
    # later sub-blocks move down into the skipped slots; we place them the same way.
    out = np.zeros((n, 110), np.uint8)
    slot = np.cumsum(active, axis=1) - active  # slot of sub-block ib = active sub-blocks before it
    rows, ibs = np.nonzero(active)
    sl = slot[rows, ibs]
    for k in range(8):
        out[rows, 2 + 8 * sl + k] = (gidx[rows, ibs, k] & 255).astype(np.uint8)
    for k in range(4):
        out[rows, 74 + 4 * sl + k] = signs[rows, ibs, k]
    qh = ((gidx >> 8).astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    out[:, 66:74] = qh * active
    live = max_scale != 0
    out[:, :2] = _fp16_bytes(np.where(live, dh, F32(0)))
    c = codes.astype(np.uint8) * live[:, None]
    out[:, 106:110] = c[:, 0::2] | (c[:, 1::2] << 4)
    return out


def _iq2xxs_blocks(xb, qwb):
    n = xb.shape[0]
    gidx, signs, scales, _ = _lattice_sub_blocks(_IQ2_XXS, xb, qwb)
    max_scale, dh, codes = _sub_block_scale_codes(scales.reshape(n, 8), 1)
    # block_iq2_xxs: d fp16 | per 32-block two u32: four 8-bit grid indices; 4 x 7 sign bits + 4-bit scale
    g = gidx.reshape(n, 8, 4).astype(np.uint32)
    s = signs.reshape(n, 8, 4).astype(np.uint32)
    w0 = g[:, :, 0] | (g[:, :, 1] << 8) | (g[:, :, 2] << 16) | (g[:, :, 3] << 24)
    w1 = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (codes << 28)
    words = np.stack([w0, w1], axis=2).reshape(n, 16)
    out = np.zeros((n, 66), np.uint8)
    live = max_scale != 0
    out[:, :2] = _fp16_bytes(np.where(live, dh, F32(0)))
    out[live, 2:] = words[live].astype("<u4").view(np.uint8).reshape(-1, 64)
    return out


def _iq2xs_blocks(xb, qwb):
    n = xb.shape[0]
    gidx, signs, scales, _ = _lattice_sub_blocks(_IQ2_XS, xb, qwb)
    max_scale, dh, codes = _sub_block_scale_codes(scales.reshape(n, 16), 1)
    # block_iq2_xs: d fp16 | qs u16[32]: 9-bit grid index | 7 sign bits << 9 | scales[8] (4-bit pairs)
    q = gidx.reshape(n, 32).astype(np.uint16) | (signs.reshape(n, 32).astype(np.uint16) << 9)
    out = np.zeros((n, 74), np.uint8)
    live = max_scale != 0
    out[:, :2] = _fp16_bytes(np.where(live, dh, F32(0)))
    out[live, 2:66] = q[live].astype("<u2").view(np.uint8).reshape(-1, 64)
    c = codes.astype(np.uint8) * live[:, None]
    out[:, 66:74] = c[:, 0::2] | (c[:, 1::2] << 4)
    return out


def _iq2s_blocks(xb, qwb):
    n = xb.shape[0]
    gidx, signs, scales, _ = _lattice_sub_blocks(_IQ2_S, xb, qwb)
    max_scale, dh, codes = _sub_block_scale_codes(scales.reshape(n, 16), 0.9875)
    # block_iq2_s: d fp16 | qs[32] low 8 bits of the 32 grid indices | qs[32] sign bytes |
    #              qh[8] (2 high bits of index i at bits 2*(i%4) of qh[i/4]) | scales[8] (4-bit pairs)
    g = gidx.reshape(n, 32)
    out = np.zeros((n, 82), np.uint8)
    out[:, 2:34] = (g & 255).astype(np.uint8)
    out[:, 34:66] = signs.reshape(n, 32)
    hi = (g >> 8).astype(np.uint8).reshape(n, 8, 4)
    out[:, 66:74] = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    live = max_scale != 0
    out[:, :2] = _fp16_bytes(np.where(live, dh, F32(0)))
    c = codes.astype(np.uint8) * live[:, None]
    out[:, 74:82] = c[:, 0::2] | (c[:, 1::2] << 4)
    return out


# ------------------------------------------------------------------------------------ IQ1_S / IQ1_M
#
# Values are (-1, 0, 1) + shift*delta. ggml sorts each sub-block by x (glibc's qsort on 32 or 16 pairs
# is a stable merge sort), tries every split of the sorted values into the three levels, and scans the
# candidates in a fixed order keeping the best weighted fit; ties and rounding make that scan order
# matter, so we replay it candidate by candidate (vectorised over sub-blocks).

_IQ1_DELTA = F32(0.125)
_IQ1_XP = np.array([F32(-1) + _IQ1_DELTA, _IQ1_DELTA, F32(1) + _IQ1_DELTA], F32)
_IQ1_XM = np.array([F32(-1) - _IQ1_DELTA, -_IQ1_DELTA, F32(1) - _IQ1_DELTA], F32)
_FLT_MAX = F32(np.finfo(F32).max)


def _split_pairs(B):
    """(i1, i2) for 0 <= i1 <= i2 <= B in ggml's loop order."""
    i1, i2 = np.triu_indices(B + 1)
    return i1, i2


def _scan_best(sqx, sq2):
    """Replay `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {scale = sumqx/sumq2; best = scale*sumqx;}`
    over candidates (C, k) in order; returns chosen candidate (k,) (-1: none) and scale (k,)."""
    C, k = sqx.shape
    best = np.full(k, -_FLT_MAX, F32)
    scale = np.zeros(k, F32)
    choice = np.full(k, -1, np.int32)
    t1 = np.empty(k, F32)
    t2 = np.empty(k, F32)
    better = np.empty(k, bool)
    pos = np.empty(k, bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for c in range(C):
            qx, q2 = sqx[c], sq2[c]
            np.multiply(qx, qx, out=t1)
            np.multiply(best, q2, out=t2)
            np.greater(t1, t2, out=better)
            np.greater(q2, 0, out=pos)
            better &= pos
            if not better.any():
                continue
            np.divide(qx, q2, out=t1)
            np.copyto(scale, t1, where=better)
            np.multiply(t1, qx, out=t2)
            np.copyto(best, t2, where=better)
            choice[better] = c
    return choice, scale


def _iq1_levels(order, i1, i2):
    """Levels 0/1/2 by rank in the sorted order: rank < i1 -> 0, < i2 -> 1, else 2."""
    k, B = order.shape
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(B)[None, :], axis=1)
    return ((ranks >= i1[:, None]).astype(np.uint8) + (ranks >= i2[:, None])).astype(np.uint8)


def _iq1_grid_fit(X, W, L, scale, vals):
    """Snap each group of 8 levels to the IQ1 grid (neighbour search where off-grid) and refit the
    scale when any group moved. vals: (k, n_groups, 3) level values per group. Returns grid indices
    (k, n_groups) and the scale (k,)."""
    tab = grid_tables("IQ1")
    k, B = X.shape
    G = B // 8
    u = tab.codes(L.reshape(k, G, 8))
    gi = tab.kmap[u]
    off = gi < 0
    if off.any():
        bi, gk = np.nonzero(off)
        gi[bi, gk] = best_neighbours(tab, u[bi, gk], X.reshape(k, G, 8)[bi, gk], W.reshape(k, G, 8)[bi, gk],
                                     scale[bi], level_values=vals[bi, gk])
        redo = np.flatnonzero(off.any(axis=1))
        lv = tab.levels[gi[redo]].astype(np.intp)  # (r, G, 8)
        q = np.take_along_axis(vals[redo], lv, axis=2).reshape(len(redo), B)
        wq = W[redo] * q
        sumqx = _seq_sum_last(wq * X[redo])
        sumq2 = _seq_sum_last(wq * q)
        ok = (sumqx > 0) & (sumq2 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale[redo] = np.where(ok, sumqx / sumq2, scale[redo])
    return gi, scale


def _iq1s_blocks(xb, qwb):
    n = xb.shape[0]
    B = 32
    W = _search_weights(xb, qwb, 2, None).reshape(-1, B)
    X = xb.reshape(-1, B)
    n_sub = X.shape[0]
    mx = np.abs(X).max(axis=1)
    scales = np.zeros(n_sub, F32)
    minus = np.zeros(n_sub, bool)  # shift -1 (values shifted by -delta)
    gidx = np.zeros((n_sub, 4), np.int32)
    act = np.flatnonzero(~(mx < F32(1e-12)))
    if len(act):
        Xa, Wa = X[act], W[act]
        order = np.argsort(Xa, axis=1, kind="stable")
        ws = np.take_along_axis(Wa, order, axis=1)
        xs = np.take_along_axis(Xa, order, axis=1)
        zero = np.zeros((len(act), 1), F32)
        sumx = np.concatenate([zero, np.cumsum(ws * xs, axis=1, dtype=F32)], axis=1).T  # (33, k)
        sumw = np.concatenate([zero, np.cumsum(ws, axis=1, dtype=F32)], axis=1).T
        i1, i2 = _split_pairs(B)
        a, b, c = sumx[i1], sumx[i2] - sumx[i1], sumx[B] - sumx[i2]
        aw, bw, cw = sumw[i1], sumw[i2] - sumw[i1], sumw[B] - sumw[i2]
        cand_x, cand_2 = [], []
        for v in (_IQ1_XP, _IQ1_XM):  # per split: shift +1 first, then -1
            cand_x.append((a * v[0] + b * v[1]) + c * v[2])
            cand_2.append(((aw * v[0]) * v[0] + (bw * v[1]) * v[1]) + (cw * v[2]) * v[2])
        sqx = np.stack(cand_x, axis=1).reshape(-1, len(act))
        sq2 = np.stack(cand_2, axis=1).reshape(-1, len(act))
        choice, sc = _scan_best(sqx, sq2)
        ok = choice >= 0
        act, order, choice, sc = act[ok], order[ok], choice[ok], sc[ok]
        Xa, Wa = X[act], W[act]
        pair = choice // 2
        neg_shift = choice % 2 == 1
        L = _iq1_levels(order, i1[pair], i2[pair])
        flip = sc < 0
        L[flip] = 2 - L[flip]
        sc = np.abs(sc)
        neg_shift ^= flip
        vals = np.where(neg_shift[:, None], _IQ1_XM[None, :], _IQ1_XP[None, :])
        gi, sc = _iq1_grid_fit(Xa, Wa, L, sc, np.repeat(vals[:, None, :], 4, axis=1))
        gidx[act] = gi
        scales[act] = sc
        minus[act] = neg_shift
    max_scale = scales.reshape(n, 8).max(axis=1)
    d = max_scale / F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = F32(1) / d
        l = np.clip(_nearest_int(F32(0.5) * (inv[:, None] * scales.reshape(n, 8) - F32(1))), 0, 7)
    live = max_scale != 0
    l = (l | (minus.reshape(n, 8) * 8)) * live[:, None]
    # block_iq1_s: d fp16 | qs[32] low 8 bits of grid indices | qh u16[8]: three 3-bit index tops,
    #              bits 12..14 scale code, bit 15 shift sign
    g = gidx.reshape(n, 8, 4)
    qh = ((g[:, :, 0] >> 8) | ((g[:, :, 1] >> 8) << 3) | ((g[:, :, 2] >> 8) << 6) | ((g[:, :, 3] >> 8) << 9))
    qh = qh | (l << 12)
    out = np.zeros((n, 50), np.uint8)
    out[:, :2] = _fp16_bytes(np.where(live, d * F32(1.125), F32(0)))
    out[:, 2:34] = (g.reshape(n, 32) & 255).astype(np.uint8)
    out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(n, 16)
    return out


def _iq1m_blocks(xb, qwb):
    n = xb.shape[0]
    B = 16
    W = _search_weights(xb, qwb, 2, lambda x2, s2: x2).reshape(-1, B)
    X = xb.reshape(-1, B)
    n_sub = X.shape[0]
    mx = np.abs(X).max(axis=1)
    scales = np.zeros(n_sub, F32)
    shifts = np.zeros(n_sub, np.int32)  # best_k: bit 1 -> first 8 use x_m, bit 0 -> last 8 use x_m
    gidx = np.zeros((n_sub, 2), np.int32)
    act = np.flatnonzero(~(mx < F32(1e-7)))
    xp, xm = _IQ1_XP, _IQ1_XM
    if len(act):
        Xa, Wa = X[act], W[act]
        k = len(act)
        order = np.argsort(Xa, axis=1, kind="stable")
        ws = np.take_along_axis(Wa, order, axis=1)
        xs = np.take_along_axis(Xa, order, axis=1)
        half = order >= B // 2  # sorted element j comes from the second half of the sub-block
        # The reference build (llama.cpp b10572) sums every candidate split (i1, i2) directly, element
        # by element in sorted order, into four sums (signs of the two halves: ++, +-, -+, --). After j
        # elements the running sum of split (i1, i2) only depends on (min(i1, j), min(i2, j)), so we
        # carry one partial sum per such state: S[a, b] (a <= b <= j), extended one element at a time.
        i1, i2 = _split_pairs(B)
        t_x, t_2 = {}, {}
        for key, v in (("p", xp), ("m", xm)):
            wv = ws.T[:, None, :] * v[None, :, None]  # (B, 3 levels, k)
            t_x[key] = wv * xs.T[:, None, :]
            t_2[key] = wv * v[None, :, None]
        sqx = np.empty((len(i1), 4, k), F32)
        sq2 = np.empty((len(i1), 4, k), F32)
        second_half = half.T[:, None, :]
        for kk, (first, second) in enumerate((("p", "p"), ("p", "m"), ("m", "p"), ("m", "m"))):
            for out_sums, t in ((sqx, t_x), (sq2, t_2)):
                term = np.where(second_half, t[second], t[first])  # (B, 3, k)
                S = np.zeros((B + 1, B + 1, k), F32)
                for j in range(B):
                    # element j is level 0 for i1 > j, level 1 for i1 <= j < i2, level 2 for i2 <= j
                    S[: j + 1, j + 1] = S[: j + 1, j] + term[j, 1]
                    S[j + 1, j + 1] = S[j, j] + term[j, 0]
                    S[: j + 1, : j + 1] += term[j, 2]
                out_sums[:, kk, :] = S[i1, i2]
        choice, sc = _scan_best(sqx.reshape(-1, k), sq2.reshape(-1, k))
        ok = choice >= 0
        act, order, choice, sc = act[ok], order[ok], choice[ok], sc[ok]
        Xa, Wa = X[act], W[act]
        pair = choice // 4
        best_k = choice % 4
        L = _iq1_levels(order, i1[pair], i2[pair])
        flip = sc < 0
        L[flip] = 2 - L[flip]
        sc = np.abs(sc)
        best_k = np.where(flip, 3 - best_k, best_k)
        vals = _iq1m_group_values(best_k)
        gi, sc = _iq1_grid_fit(Xa, Wa, L, sc, vals)
        gidx[act] = gi
        scales[act] = sc
        shifts[act] = best_k
    scales = scales.reshape(n, 16)
    max_scale = scales.max(axis=1)
    live = max_scale != 0
    d = max_scale / F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = F32(1) / d
        l = np.clip(_nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 7)
    # refit the super-block scale over all 256 values with the chosen grid points and sub-scales
    tab = grid_tables("IQ1")
    lv = tab.levels[gidx].astype(np.intp)  # (n_sub, 2, 8)
    q = np.take_along_axis(_iq1m_group_values(shifts), lv, axis=2).reshape(n, 16, 16)
    q = (q * (F32(2) * l.astype(F32) + F32(1))[:, :, None]).reshape(n, QK_K)
    wq = W.reshape(n, QK_K) * q
    sumqx = _seq_sum_last(wq * xb)
    sumq2 = _seq_sum_last(wq * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, d)
    dbits = (d * F32(1.1125)).astype("<f2").view(np.uint16).astype(np.uint16)
    # block_iq1_m: qs[32] low 8 bits of grid indices | qh[16]: per sub-block two 3-bit index tops
    # (bits 0-2, 4-6) and shift flags 0x08/0x80 | scales u16[4]: four 3-bit sub-scales each, and the
    # fp16 super-block scale spread over their top nibbles
    g = gidx.reshape(n, 16, 2)
    masks = np.array([0x00, 0x80, 0x08, 0x88], np.uint8)
    qh = ((g[:, :, 0] >> 8) | ((g[:, :, 1] >> 8) << 4)).astype(np.uint8)
    qh |= masks[shifts.reshape(n, 16)] * live[:, None].astype(np.uint8)
    lw = (l.astype(np.uint16) << (3 * (np.arange(16) % 4)).astype(np.uint16)).reshape(n, 4, 4)
    sc = np.bitwise_or.reduce(lw, axis=2)
    sc[:, 0] |= (dbits & 0x000F) << 12
    sc[:, 1] |= (dbits & 0x00F0) << 8
    sc[:, 2] |= (dbits & 0x0F00) << 4
    sc[:, 3] |= dbits & 0xF000
    sc *= live[:, None].astype(np.uint16)
    out = np.zeros((n, 56), np.uint8)
    out[:, :32] = (g.reshape(n, 32) & 255).astype(np.uint8)
    out[:, 32:48] = qh
    out[:, 48:56] = sc.astype("<u2").view(np.uint8).reshape(n, 8)
    return out


def _iq1m_group_values(best_k):
    """Level values of the two groups of 8 for IQ1_M shift codes (k,) -> (k, 2, 3)."""
    first = np.where((best_k < 2)[:, None], _IQ1_XP[None], _IQ1_XM[None])
    second = np.where((best_k % 2 == 0)[:, None], _IQ1_XP[None], _IQ1_XM[None])
    return np.stack([first, second], axis=1)


# ----------------------------------------------------------------------------------- registration


def _lattice_quantizer(name, grid, block_bytes, blocks_fn, needs_imatrix):
    def quantize(x, imatrix):
        if needs_imatrix and imatrix is None:
            raise UsageError(
                f"{name} needs an importance matrix (ggml refuses to quantize it without one); "
                "pass imatrix=..."
            )
        grid_tables(grid)  # build the tables once, before the worker threads start
        # these searches spend much of their time in Python per chunk: use larger chunks
        return _blockwise(x, imatrix, QK_K, block_bytes, blocks_fn, chunk_elements=4 * _CHUNK_ELEMENTS)

    quantize.__name__ = f"quantize_{name.lower()}"
    quantize.__doc__ = f"{name}: ggml's quantize_{name.lower()} (byte-exact)."
    return quantize


quantize_iq3_xxs = _lattice_quantizer("IQ3_XXS", "IQ3_XXS", 98, _iq3xxs_blocks, False)
quantize_iq3_s = _lattice_quantizer("IQ3_S", "IQ3_S", 110, _iq3s_blocks, False)
quantize_iq2_xxs = _lattice_quantizer("IQ2_XXS", "IQ2_XXS", 66, _iq2xxs_blocks, True)
quantize_iq2_xs = _lattice_quantizer("IQ2_XS", "IQ2_XS", 74, _iq2xs_blocks, True)
quantize_iq2_s = _lattice_quantizer("IQ2_S", "IQ2_S", 82, _iq2s_blocks, False)
quantize_iq1_s = _lattice_quantizer("IQ1_S", "IQ1", 50, _iq1s_blocks, True)
quantize_iq1_m = _lattice_quantizer("IQ1_M", "IQ1", 56, _iq1m_blocks, False)


QUANTIZERS: dict = {
    "IQ4_NL": quantize_iq4_nl,
    "IQ4_XS": quantize_iq4_xs,
    "TQ1_0": quantize_tq1_0,
    "TQ2_0": quantize_tq2_0,
    "MXFP4": quantize_mxfp4,
    "IQ3_XXS": quantize_iq3_xxs,
    "IQ3_S": quantize_iq3_s,
    "IQ2_XXS": quantize_iq2_xxs,
    "IQ2_XS": quantize_iq2_xs,
    "IQ2_S": quantize_iq2_s,
    "IQ1_S": quantize_iq1_s,
    "IQ1_M": quantize_iq1_m,
}
DEQUANTIZERS: dict = {
    "IQ4_NL": dequantize_iq4_nl,
    "IQ4_XS": dequantize_iq4_xs,
}
