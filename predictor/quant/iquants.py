"""Non-linear and ternary quantizers (IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4 ...), byte-exact with ggml.

Everything is float32 and vectorised over blocks. Where ggml sums in a sequential float32 loop and the
sum feeds a decision, we add the element axis one step at a time (never `np.sum`, which is pairwise).
Arrays inside the searches are laid out element-major, `(block_size, n_blocks)`, so that such a loop
works on contiguous `(n_blocks,)` vectors.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256

# Elements per chunk: bounds the temporaries of the searches (a few dozen arrays this size).
_CHUNK_ELEMENTS = 1 << 19


# ---------------------------------------------------------------------------------------------- helpers


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 left to right in float32, as a C `for` loop does."""
    s = a[0].copy()
    for k in range(1, a.shape[0]):
        s += a[k]
    return s


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (magic-number trick) is round-half-to-even, i.e. rint, for |v| < 2**22."""
    return np.rint(v).astype(np.int32)


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 (round to nearest even, like GGML_FP32_TO_FP16) as (n, 2) little-endian bytes."""
    return np.ascontiguousarray(d, dtype=F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_value(d: np.ndarray) -> np.ndarray:
    """The float32 value ggml reads back from a stored fp16 scale."""
    return np.asarray(d, dtype=F32).astype(np.float16).astype(F32)


def _safe_recip(d: np.ndarray) -> np.ndarray:
    """`d ? 1/d : 0` in float32."""
    out = np.zeros_like(d)
    nz = d != 0
    np.divide(F32(1), d, out=out, where=nz)
    return out


def _blockwise(x, imatrix, super_block, block_bytes, fn):
    """Run fn(xb (n, super_block), qwb (n, super_block) | None) -> uint8 (n, block_bytes) in chunks.

    ggml quantizes rows independently and each super-block only sees its own importance slice, so the
    whole matrix is a flat list of super-blocks; the imatrix slice of super-block g is g mod blocks/row."""
    rows, cols = x.shape
    per_row = cols // super_block
    flat = x.reshape(-1, super_block)
    qw_blocks = None if imatrix is None else np.asarray(imatrix, dtype=F32).reshape(per_row, super_block)
    n = flat.shape[0]
    out = np.empty((n, block_bytes), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // super_block)
    for start in range(0, n, step):
        stop = min(n, start + step)
        qwb = None
        if qw_blocks is not None:
            qwb = qw_blocks[np.arange(start, stop) % per_row]
        out[start:stop] = fn(flat[start:stop], qwb)
    return out.reshape(rows, -1)


# ------------------------------------------------------------------------------------ IQ4_NL / IQ4_XS

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_VALS = KVALUES_IQ4NL.astype(F32)


def _build_index_tables(values: np.ndarray):
    """Tables for best_index_int8 over integer grid values, indexed by floor(clip(x)) - values[0].

    For x in [k, k+1), ml is the last value <= x (kept within 0..n-2) and lo/hi the two candidates."""
    v = values.astype(np.int64)
    ks = np.arange(v[0], v[-1])  # floor values after clipping x to [v0, v_last - 1]
    ml = np.searchsorted(v, ks, side="right") - 1
    ml = np.clip(ml, 0, len(v) - 2)
    return ml.astype(np.int8), v[ml].astype(F32), v[ml + 1].astype(F32)


_IQ4_ML, _IQ4_LO, _IQ4_HI = _build_index_tables(KVALUES_IQ4NL)


def _best_index_iq4(al: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, al) element-wise: the nearer of the two neighbouring
    values, ties (in float32 arithmetic `al - lo < hi - al`) going to the upper one."""
    k = np.clip(al, F32(-127), F32(112))
    np.floor(k, out=k)
    k += F32(127)
    k = k.astype(np.intp)
    lo = _IQ4_LO[k]
    hi = _IQ4_HI[k]
    up = (al - lo) >= (hi - al)
    return _IQ4_ML[k] + up  # int8 + bool -> int8 in 0..15


def _iq4_sums(X, W, inv):
    """sum(w*q*x) and sum(w*q*q) for the grid indices chosen at scale 1/inv, in ggml's order."""
    q = _IQ4_VALS[_best_index_iq4(inv * X)]
    wq = W * q
    return _seq_sum(wq * X), _seq_sum(wq * q)


def _iq4_block_scales(X, W, ntry=7):
    """Scale search of quantize_row_iq4_nl_impl for 32-element blocks, X and W (32, n)."""
    n = X.shape[1]
    ax = np.abs(X)
    imax = np.argmax(ax, axis=0)  # first index of the largest |x|, as the strict `>` loop
    cols = np.arange(n)
    amax = ax[imax, cols]
    mx = X[imax, cols]
    empty = amax < F32(1e-15)
    mx = np.where(empty, F32(1), mx)  # avoid 1/0 warnings; these blocks get scale 0 below
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (-mx) / F32(KVALUES_IQ4NL[0]) if ntry > 0 else mx / F32(KVALUES_IQ4NL[0])
        sumqx, sumq2 = _iq4_sums(X, W, F32(1) / d)
        pos = sumq2 > 0
        d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            inv = F32(itry + int(KVALUES_IQ4NL[0])) / mx
            sumqx, sumq2 = _iq4_sums(X, W, inv)
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


QUANTIZERS: dict = {
    "IQ4_NL": quantize_iq4_nl,
    "IQ4_XS": quantize_iq4_xs,
}
DEQUANTIZERS: dict = {
    "IQ4_NL": dequantize_iq4_nl,
    "IQ4_XS": dequantize_iq4_xs,
}
