"""Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, byte-exact with ggml_quantize_chunk.

Without an imatrix these are ggml's `quantize_row_*_ref` (closed-form scale, truncating casts; Q8_0 uses
`roundf`). With an imatrix Q4_0/Q5_0 switch to the symmetric scale search `make_qx_quants` and
Q4_1/Q5_1 to the scale+min search `make_qkx3_quants`, weighting element j by
`qw[j] * sqrt(sigma2 + x[j]^2)` with `sigma2 = sum(x^2 over the whole row) / n_per_row`.
Q8_0 ignores the imatrix.

Block layouts (little endian, 32 weights each):
    Q4_0  d:f16 | qs[16]                      qs[j] = q[j] | q[j+16] << 4
    Q4_1  d:f16 | m:f16 | qs[16]
    Q5_0  d:f16 | qh:u32 | qs[16]              qh bit j = bit 4 of q[j]; qs holds the low nibbles
    Q5_1  d:f16 | m:f16 | qh:u32 | qs[16]
    Q8_0  d:f16 | qs:i8[32]
"""

from __future__ import annotations

import numpy as np

from predictor.quant._search import (
    block_dequantizer,
    F32,
    first_max,
    first_min,
    for_row_chunks,
    fp16_bits,
    fp16_to_f32,
    make_qkx_quants_t,
    make_qx_quants_t,
    seq_sum,
)

QK = 32
# Row chunk size (elements) for the search paths: big enough to amortise Python overhead, small
# enough that the ~20 float32 temporaries of a search step stay in cache (and memory stays bounded).
CHUNK_ELEMENTS = 1 << 16
CHUNK_ELEMENTS_SIMPLE = 1 << 16
_HALF_DOWN = np.nextafter(F32(0.5), F32(0))  # roundf(v) == trunc(v + copysign(0.49999997, v))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q (nb, 32) uint8 < 16 -> (nb, 16): low nibble element j, high nibble element j+16."""
    return q[:, :16] | (q[:, 16:] << 4)


def _truncate_capped(v: np.ndarray, top: int) -> np.ndarray:
    """ggml `MIN(top, (int8_t)v)` for v in [0, top + 2): the cast truncates, `top + 1` drops to top."""
    q = v.astype(np.uint8)
    q -= q >> top.bit_length()  # only top + 1 has that bit (top is 15 or 31)
    return q


def _pack_qh(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 values -> 4 bytes, element j at bit j (little endian u32)."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> fp16 as little-endian bytes (n, 2)."""
    return fp16_bits(v).astype("<u2", copy=False).reshape(-1, 1).view(np.uint8)


# ------------------------------------------------------------------------- no-imatrix (_ref)


# Reductions over the 32 values of each block are done on integer views of the float bits:
# numpy's float min/max/argmax along a short last axis cost several times more than integer ones.
_ABS = np.int32(0x7FFFFFFF)


def _abs_bits(xb: np.ndarray) -> np.ndarray:
    return xb.view(np.int32) & _ABS  # |x| as int32: same order as the floats


def _abs_max_rows(xb: np.ndarray) -> np.ndarray:
    """max |x| per block (ggml `amax = MAX(amax, fabsf(v))`)."""
    return _abs_bits(xb).max(axis=1).view(F32)


def _signed_absmax_rows(xb: np.ndarray) -> np.ndarray:
    """Signed value of largest |x| (first one), +0 for an all-zero block (ggml starts from 0.0f)."""
    ab = _abs_bits(xb)
    amax = ab.max(axis=1)
    # bit j set where element j reaches the max; the lowest set bit is ggml's first hit
    hits = np.packbits(ab == amax[:, None], axis=1, bitorder="little").view("<u4")[:, 0]
    signs = np.packbits(np.signbit(xb), axis=1, bitorder="little").view("<u4")[:, 0]
    first = hits & (~hits + np.uint32(1))
    a = amax.view(F32)
    return np.where(amax == 0, F32(0), np.where((first & signs) != 0, -a, a))


def _ordered(xb: np.ndarray) -> np.ndarray:
    """float32 -> int32 with the same order (negative floats get their magnitude bits flipped)."""
    s = xb.view(np.int32)
    return s ^ ((s >> 31) & _ABS)


def _unordered(k: np.ndarray) -> np.ndarray:
    return (k ^ ((k >> 31) & _ABS)).view(F32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))


def _q8_0_ref(xb: np.ndarray) -> np.ndarray:
    d = _abs_max_rows(xb) / F32(127)
    v = xb * _inverse(d)[:, None]
    q = (v + np.copysign(_HALF_DOWN, v)).astype(np.int8)  # the cast truncates: roundf
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _q4_0_ref(xb: np.ndarray) -> np.ndarray:
    d = _signed_absmax_rows(xb) / F32(-8)
    v = xb * _inverse(d)[:, None]  # within [-8, 8] up to rounding, so v + 8.5 is in (0, 17)
    v += F32(8.5)
    q = _truncate_capped(v, 15)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _q5_0_ref(xb: np.ndarray) -> np.ndarray:
    d = _signed_absmax_rows(xb) / F32(-16)
    v = xb * _inverse(d)[:, None]
    v += F32(16.5)
    q = _truncate_capped(v, 31)
    return np.concatenate([_f16_bytes(d), _pack_qh(q), _pack_nibbles(q & 0x0F)], axis=1)


def _min_max_rows(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `if (v < min) min = v; if (v > max) max = v;` per block. The fp16 of min is stored, so
    a zero result takes the sign of the first zero met, as the strict comparisons do."""
    k = _ordered(xb)
    mn, mx = _unordered(k.min(axis=1)), _unordered(k.max(axis=1))
    zero = (mn == 0) | (mx == 0)
    if zero.any():
        rows = np.flatnonzero(zero)
        sub = xb[rows].T
        mn[rows] = first_min(sub)
        mx[rows] = first_max(sub)
    return mn, mx


def _q4_1_ref(xb: np.ndarray) -> np.ndarray:
    mn, mx = _min_max_rows(xb)
    d = (mx - mn) / F32(15)
    v = (xb - mn[:, None]) * _inverse(d)[:, None]  # within [0, 15] up to rounding
    v += F32(0.5)
    q = _truncate_capped(v, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], axis=1)


def _q5_1_ref(xb: np.ndarray) -> np.ndarray:
    mn, mx = _min_max_rows(xb)
    d = (mx - mn) / F32(31)
    v = (xb - mn[:, None]) * _inverse(d)[:, None]
    v += F32(0.5)
    q = v.astype(np.uint8)  # ggml has no MIN here: (x - min)/d <= 31 up to rounding
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_qh(q), _pack_nibbles(q & 0x0F)], axis=1)


# ---------------------------------------------------------------------------- imatrix paths


def _weights_t(x: np.ndarray, imatrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-major blocks xt (32, nb) and weights qw * sqrt(sigma2 + x^2), sigma2 per whole row."""
    rows, cols = x.shape
    nbr = cols // QK
    sigma2 = seq_sum(np.ascontiguousarray((x * x).T)) / F32(cols)  # (rows,), sequential like C
    xt = np.ascontiguousarray(x.reshape(rows * nbr, QK).T)
    qw = np.tile(imatrix.reshape(nbr, QK).T, (1, rows))
    w = qw * np.sqrt(np.repeat(sigma2, nbr)[None, :] + xt * xt)
    return xt, w


def _q4_0_imat(x, imatrix):
    xt, w = _weights_t(x, imatrix)
    d, L = make_qx_quants_t(xt, 8, w)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(L.T)], axis=1)


def _q5_0_imat(x, imatrix):
    xt, w = _weights_t(x, imatrix)
    d, L = make_qx_quants_t(xt, 16, w)
    q = np.ascontiguousarray(L.T)
    return np.concatenate([_f16_bytes(d), _pack_qh(q), _pack_nibbles(q & 0x0F)], axis=1)


def _q4_1_imat(x, imatrix):
    xt, w = _weights_t(x, imatrix)
    d, the_min, L = make_qkx_quants_t(xt, w, 15, -0.9, 0.05, 36, False)
    return np.concatenate([_f16_bytes(d), _f16_bytes(-the_min), _pack_nibbles(L.T)], axis=1)


def _q5_1_imat(x, imatrix):
    xt, w = _weights_t(x, imatrix)
    d, the_min, L = make_qkx_quants_t(xt, w, 31, -0.9, 0.05, 36, False)
    q = np.ascontiguousarray(L.T)
    return np.concatenate([_f16_bytes(d), _f16_bytes(-the_min), _pack_qh(q), _pack_nibbles(q & 0x0F)], axis=1)


# ------------------------------------------------------------------------------ registration


def _quantizer(ref, imat, block_bytes):
    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        rows, cols = x.shape
        nbr = cols // QK
        out = np.empty((rows, nbr * block_bytes), np.uint8)
        if imatrix is None or imat is None:

            def work(r0: int, r1: int) -> None:
                out[r0:r1] = ref(x[r0:r1].reshape(-1, QK)).reshape(r1 - r0, -1)

            for_row_chunks(rows, cols, CHUNK_ELEMENTS_SIMPLE, work)
        else:
            imatrix = np.asarray(imatrix, F32)

            def work(r0: int, r1: int) -> None:
                out[r0:r1] = imat(x[r0:r1], imatrix).reshape(r1 - r0, -1)

            for_row_chunks(rows, cols, CHUNK_ELEMENTS, work)
        return out

    return quantize


# ----------------------------------------------------------------------------- dequantizers


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _unpack_qh(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    d = fp16_to_f32(np.ascontiguousarray(b[:, :2]).view(np.uint16))
    return b[:, 2:].view(np.int8).astype(F32) * d


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    d = fp16_to_f32(np.ascontiguousarray(b[:, :2]).view(np.uint16))
    v = _unpack_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return v.astype(F32) * d


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    d = fp16_to_f32(np.ascontiguousarray(b[:, :2]).view(np.uint16))
    m = fp16_to_f32(np.ascontiguousarray(b[:, 2:4]).view(np.uint16))
    v = _unpack_nibbles(b[:, 4:]).astype(F32)
    return v * d + m


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    d = fp16_to_f32(np.ascontiguousarray(b[:, :2]).view(np.uint16))
    v = (_unpack_nibbles(b[:, 6:]) | _unpack_qh(b[:, 2:6])).astype(np.int8) - np.int8(16)
    return v.astype(F32) * d


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    d = fp16_to_f32(np.ascontiguousarray(b[:, :2]).view(np.uint16))
    m = fp16_to_f32(np.ascontiguousarray(b[:, 2:4]).view(np.uint16))
    v = (_unpack_nibbles(b[:, 8:]) | _unpack_qh(b[:, 4:8])).astype(F32)
    return v * d + m


QUANTIZERS = {
    "Q4_0": _quantizer(_q4_0_ref, _q4_0_imat, 18),
    "Q4_1": _quantizer(_q4_1_ref, _q4_1_imat, 20),
    "Q5_0": _quantizer(_q5_0_ref, _q5_0_imat, 22),
    "Q5_1": _quantizer(_q5_1_ref, _q5_1_imat, 24),
    "Q8_0": _quantizer(_q8_0_ref, None, 34),
}
DEQUANTIZERS = {
    "Q4_0": block_dequantizer(_dq_q4_0, 18, CHUNK_ELEMENTS_SIMPLE),
    "Q4_1": block_dequantizer(_dq_q4_1, 20, CHUNK_ELEMENTS_SIMPLE),
    "Q5_0": block_dequantizer(_dq_q5_0, 22, CHUNK_ELEMENTS_SIMPLE),
    "Q5_1": block_dequantizer(_dq_q5_1, 24, CHUNK_ELEMENTS_SIMPLE),
    "Q8_0": block_dequantizer(_dq_q8_0, 34, CHUNK_ELEMENTS_SIMPLE),
}
