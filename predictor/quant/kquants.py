"""K-quant super-block types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, byte-exact with ggml_quantize_chunk.

Each 256-weight super-block is split into sub-blocks (16 weights for Q2_K/Q3_K/Q6_K, 32 for
Q4_K/Q5_K). A search picks each sub-block's scale (and min), the sub-block scales are quantized
against one fp16 super-block scale, and the weights are finally re-quantized with the scales
exactly as stored. Without an imatrix ggml runs `quantize_row_*_ref`; with one, the `_impl`
variants, whose search weights are (see tests/data/reference/README):
    Q2_K        qw * sqrt(sigma2 + x^2),  sigma2 = sum(x^2 over super-block) / 256
    Q3/4/5_K    qw * sqrt(sigma2 + x^2),  sigma2 = 2 * sum(x^2 over super-block) / 256
    Q6_K        qw

Arrays are element-major: sub-block element i of every sub-block is the contiguous row `xt[i]`,
sub-block index = super-block * (256 / n) + j (see predictor/quant/_search.py).
"""

from __future__ import annotations

import numpy as np

from predictor.quant._search import (
    block_dequantizer,
    F32,
    GROUP_MAX_EPS,
    fp16_bits,
    fp16_to_f32,
    for_row_chunks,
    make_q3_quants_t,
    make_qkx_quants_t,
    make_qp_quants_t,
    make_qx_quants_t,
    nearest_int,
    seq_sum,
)

QK_K = 256
# Elements per row chunk: the searches keep ~20 float32 temporaries of this size alive, so this
# bounds memory and keeps them cache-resident; big enough to amortise per-call Python overhead.
CHUNK_ELEMENTS = 1 << 16


# --------------------------------------------------------------------------------- helpers


def _sub_t(x: np.ndarray, n: int) -> np.ndarray:
    """(rows, cols) -> element-major sub-blocks (n, n_sub)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _imatrix_t(imatrix: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Per-column importance laid out like `_sub_t` of a (rows, cols) chunk."""
    return np.tile(imatrix.reshape(-1, n).T, (1, rows))


def _superblock_sumsq(x: np.ndarray) -> np.ndarray:
    """`for (j < 256) sum += x[j]*x[j]` per super-block, sequential float32 -> (n_super,)."""
    xs = x.reshape(-1, QK_K)
    return seq_sum(np.ascontiguousarray((xs * xs).T))


def _per_sub(v: np.ndarray, n: int) -> np.ndarray:
    """Super-block values (n_super,) -> one per sub-block (1, n_sub) for broadcasting."""
    return np.repeat(v, QK_K // n)[None, :]


def _requantize(xt, L, d, dm, lo, hi, offset):
    """ggml's final pass: `if (!d) continue; l = nearest_int((x + dm)/d)` clamped, per sub-block.

    d, dm: (n_sub,) float32 as re-read from the stored scales (dm None: no min). Sub-blocks with
    d == 0 keep the search's L."""
    keep = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        num = xt if dm is None else xt + dm[None, :]
        l = np.clip(nearest_int(num / d[None, :]), lo, hi) + offset
    return np.where(keep[None, :], L, l.astype(np.uint8))


def _natural(L: np.ndarray, n: int) -> np.ndarray:
    """Element-major (n, n_sub) -> (n_super, 256) in memory order."""
    return L.T.reshape(-1, QK_K)


def _bytes(halves: np.ndarray) -> np.ndarray:
    """uint16 fp16 bits (n,) -> their little-endian bytes (n, 2)."""
    return halves.astype("<u2", copy=False).reshape(-1, 1).view(np.uint8)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nsb, 256) values 0..3 -> 64 bytes: byte h*32+l holds L[h*128 + 32k + l] at bits 2k."""
    r = L.reshape(-1, 2, 4, 32)
    q = r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)
    return q.reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_2bit`: (nsb, 64) -> (nsb, 256)."""
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


#   Q4_K / Q5_K 12-byte scales, 8 sub-blocks j with 6-bit scale ls[j] and min lm[j]:
#     byte j   (j<4): ls[j] low 6 bits | ls[j+4] >> 4 in bits 6-7
#     byte j+4 (j<4): lm[j] low 6 bits | lm[j+4] >> 4 in bits 6-7
#     byte j+8 (j<4): ls[j+4] & 15 | (lm[j+4] & 15) << 4
def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """ls, lm uint8 (nsb, 8) -> (nsb, 12), with ggml's uint8 truncations."""
    s = np.empty((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml `get_scale_min_k4` for j = 0..7: (nsb, 12) -> sc, m uint8 (nsb, 8)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


#   Q3_K 12-byte scales, 16 sub-blocks with 6-bit value v[j] (signed scale + 32):
#     byte j (j<8): v[j] & 15 | (v[j+8] & 15) << 4
#     byte 8+k:     bits 2i..2i+1 hold v[4i+k] >> 4, for i = 0..3
def _pack_q3_scales(v: np.ndarray) -> np.ndarray:
    s = np.empty((v.shape[0], 12), np.uint8)
    s[:, 0:8] = (v[:, 0:8] & 0xF) | ((v[:, 8:16] & 0xF) << 4)
    hi = (v >> 4).reshape(-1, 4, 4)  # [i, k] = v[4i + k] >> 4
    s[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return s


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """(nsb, 12) -> signed scales int8 (nsb, 16)."""
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3
    return (low | (hi.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)


def _qp_scales_and_mins(scales, mins, sw, n, nmax):
    """`make_qp_quants` for the sub-block scales and for the mins, in one call (blocks are independent).

    scales, mins: (n_sub,); sw: (n, n_super). Returns (d, dmin, Ls, Lm) with L* (n, n_super)."""
    nsb = sw.shape[1]
    both = np.concatenate([scales.reshape(-1, n).T, mins.reshape(-1, n).T], axis=1)
    d, L = make_qp_quants_t(both, nmax, np.concatenate([sw, sw], axis=1))
    return d[:nsb], d[nsb:], L[:, :nsb], L[:, nsb:]


def _first_absmax(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over axis 1: (largest |v|, the signed value where it first occurs)."""
    a = np.abs(v)
    idx = np.argmax(a, axis=1)[:, None]
    return np.take_along_axis(a, idx, axis=1)[:, 0], np.take_along_axis(v, idx, axis=1)[:, 0]


# -------------------------------------------------------------------------------------- Q6_K


def _q6_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    rows = x.shape[0]
    xt = _sub_t(x, 16)
    qw = None if imatrix is None else _imatrix_t(imatrix, rows, 16)
    scales, L = make_qx_quants_t(xt, 32, qw)
    sc = scales.reshape(-1, 16)
    nsb = sc.shape[0]
    max_abs, max_scale = _first_absmax(sc)
    dead = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(dead, F32(1), max_scale)
        d_bits = fp16_bits(F32(1) / iscale)
        ls = np.minimum(nearest_int(iscale[:, None] * sc), 127).astype(np.int8)
    d_sub = (fp16_to_f32(d_bits)[:, None] * ls.astype(F32)).reshape(-1)
    L = _requantize(xt, L, d_sub, None, -32, 31, 32)
    Ln = _natural(L, 16).reshape(-1, 2, 4, 32)  # [half, k, l] = L[128 half + 32 k + l]
    ql = np.empty((nsb, 2, 2, 32), np.uint8)
    ql[:, :, 0] = (Ln[:, :, 0] & 0xF) | ((Ln[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (Ln[:, :, 1] & 0xF) | ((Ln[:, :, 3] & 0xF) << 4)
    h = Ln >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nsb, 128), qh.reshape(nsb, 64), ls.view(np.uint8), _bytes(d_bits)], axis=1)
    out[dead] = 0
    return out


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(F32)
    d = fp16_to_f32(np.ascontiguousarray(b[:, 208:210]).view(np.uint16))
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [half, k] with k = 0,1 low, 2,3 high nibbles
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return ((d * sc)[:, :, None] * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


# -------------------------------------------------------------------------------------- Q3_K


def _q3_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    rows = x.shape[0]
    xt = _sub_t(x, 16)
    if imatrix is None:
        scales, L = make_q3_quants_t(xt, 4)
        sc = scales.reshape(-1, 16)
        amax, max_scale = _first_absmax(sc)
        has = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / np.where(has, max_scale, F32(1))
            l = nearest_int(iscale[:, None] * sc).astype(np.int8)
            v = (np.clip(l, -32, 31) + 32).astype(np.uint8)
            d = np.where(has, F32(1) / iscale, F32(0))
        v[~has] = 0
        packed = _pack_q3_scales(v)
    else:
        sigma2 = (F32(2) * _superblock_sumsq(x)) / F32(QK_K)
        w = _imatrix_t(imatrix, rows, 16) * np.sqrt(_per_sub(sigma2, 16) + xt * xt)
        sw = seq_sum(w)
        scales, L = make_qx_quants_t(xt, 4, w)
        d, Ls = make_qx_quants_t(scales.reshape(-1, 16).T.copy(), 32, sw.reshape(-1, 16).T.copy())
        packed = _pack_q3_scales(np.ascontiguousarray(Ls.T))
    nsb = packed.shape[0]
    d_bits = fp16_bits(d)
    d_sub = (fp16_to_f32(d_bits)[:, None] * _unpack_q3_scales(packed).astype(F32)).reshape(-1)
    L = _natural(_requantize(xt, L, d_sub, None, -4, 3, 4), 16)
    high = L > 3
    hmask = np.packbits(high.reshape(nsb, 8, 32), axis=1, bitorder="little").reshape(nsb, 32)
    qs = _pack_2bit(np.where(high, L - 4, L).astype(np.uint8))
    return np.concatenate([hmask, qs, packed, _bytes(d_bits)], axis=1)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    hmask = b[:, 0:32]
    q = _unpack_2bit(b[:, 32:96]).astype(np.int8)
    sc = _unpack_q3_scales(b[:, 96:108]).astype(F32)
    d = fp16_to_f32(np.ascontiguousarray(b[:, 108:110]).view(np.uint16))
    hm = np.unpackbits(hmask.reshape(-1, 1, 32), axis=1, bitorder="little").reshape(-1, QK_K)
    q -= ((hm ^ 1) << 2).view(np.int8)  # a clear high bit means -4
    return ((d * sc)[:, :, None] * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


# -------------------------------------------------------------------------------------- Q2_K


def _q2_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    rows = x.shape[0]
    xt = _sub_t(x, 16)
    if imatrix is None:
        scales, mins, L = make_qkx_quants_t(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
        sc, mn = scales.reshape(-1, 16), mins.reshape(-1, 16)
        max_scale = np.maximum(sc.max(axis=1), F32(0))
        max_min = np.maximum(mn.max(axis=1), F32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = nearest_int((F32(15) / max_scale)[:, None] * sc)
            lm = nearest_int((F32(15) / max_min)[:, None] * mn)
        ls = np.where((max_scale > 0)[:, None], ls, 0)
        lm = np.where((max_min > 0)[:, None], lm, 0)
        packed = (ls | (lm << 4)).astype(np.uint8)
        d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
        dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    else:
        sigma2 = _superblock_sumsq(x) / F32(QK_K)
        w = _imatrix_t(imatrix, rows, 16) * np.sqrt(_per_sub(sigma2, 16) + xt * xt)
        sw = seq_sum(w).reshape(-1, 16).T.copy()
        scales, mins, L = make_qkx_quants_t(xt, w, 3, -0.9, 0.05, 36, False)
        d, dmin, Ls, Lm = _qp_scales_and_mins(scales, mins, sw, 16, 15)
        packed = np.ascontiguousarray((Ls | (Lm << 4)).T)
    d_bits, dmin_bits = fp16_bits(d), fp16_bits(dmin)
    d_sub = (fp16_to_f32(d_bits)[:, None] * (packed & 0xF).astype(F32)).reshape(-1)
    m_sub = (fp16_to_f32(dmin_bits)[:, None] * (packed >> 4).astype(F32)).reshape(-1)
    L = _natural(_requantize(xt, L, d_sub, m_sub, 0, 3, 0), 16)
    return np.concatenate([packed, _pack_2bit(L), _bytes(d_bits), _bytes(dmin_bits)], axis=1)


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    sc = b[:, 0:16]
    q = _unpack_2bit(b[:, 16:80]).astype(F32)
    d = fp16_to_f32(np.ascontiguousarray(b[:, 80:82]).view(np.uint16))
    dmin = fp16_to_f32(np.ascontiguousarray(b[:, 82:84]).view(np.uint16))
    dl = (d * (sc & 0xF).astype(F32))[:, :, None]
    ml = (dmin * (sc >> 4).astype(F32))[:, :, None]
    return (dl * q.reshape(-1, 16, 16) - ml).reshape(-1, QK_K)


# ------------------------------------------------------------------------------- Q4_K / Q5_K


def _scale_min_search(x, imatrix, nmax, ref_params):
    """Sub-block search + 6-bit scale/min quantization shared by Q4_K and Q5_K.

    Returns (xt, L, packed scales (nsb, 12), d_bits, dmin_bits)."""
    rows = x.shape[0]
    xt = _sub_t(x, 32)
    if imatrix is None:
        av_x = np.sqrt(seq_sum(xt * xt) / F32(32))
        scales, mins, L = make_qkx_quants_t(xt, av_x[None, :] + np.abs(xt), nmax, *ref_params, False)
        sc, mn = scales.reshape(-1, 8), mins.reshape(-1, 8)
        max_scale = np.maximum(sc.max(axis=1), F32(0))
        max_min = np.maximum(mn.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * sc).astype(np.uint8), 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mn).astype(np.uint8), 63)
        d, dmin = max_scale / F32(63), max_min / F32(63)
    else:
        sigma2 = (F32(2) * _superblock_sumsq(x)) / F32(QK_K)
        w = _imatrix_t(imatrix, rows, 32) * np.sqrt(_per_sub(sigma2, 32) + xt * xt)
        sw = seq_sum(w).reshape(-1, 8).T.copy()
        scales, mins, L = make_qkx_quants_t(xt, w, nmax, -0.9, 0.05, 36, False)
        d, dmin, Ls, Lm = _qp_scales_and_mins(scales, mins, sw, 8, 63)
        ls, lm = np.ascontiguousarray(Ls.T), np.ascontiguousarray(Lm.T)
        if nmax == 31:  # only Q5_K's impl clamps here
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = _pack_scale_min_k4(ls, lm)
    d_bits, dmin_bits = fp16_bits(d), fp16_bits(dmin)
    sc, m = _unpack_scale_min_k4(packed)
    d_sub = (fp16_to_f32(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    m_sub = (fp16_to_f32(dmin_bits)[:, None] * m.astype(F32)).reshape(-1)
    L = _natural(_requantize(xt, L, d_sub, m_sub, 0, nmax, 0), 32)
    return L, packed, d_bits, dmin_bits


def _q4_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    L, packed, d_bits, dmin_bits = _scale_min_search(x, imatrix, 15, (-1.0, 0.1, 20))
    r = L.reshape(-1, 4, 2, 32)
    qs = (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)
    head = np.stack([d_bits, dmin_bits], axis=1).astype("<u2", copy=False).view(np.uint8)
    return np.concatenate([head, packed, qs], axis=1)


def _q5_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    L, packed, d_bits, dmin_bits = _scale_min_search(x, imatrix, 31, (-0.5, 0.1, 15))
    r = L.reshape(-1, 4, 2, 32)  # [pair p, half, l] = L[64 p + 32 half + l]
    qs = ((r[:, :, 0] & 0xF) | ((r[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # qh[l] bit 2p + half = bit 4 of L[64 p + 32 half + l]
    qh = np.packbits((r >> 4).reshape(-1, 8, 32), axis=1, bitorder="little").reshape(-1, 32)
    head = np.stack([d_bits, dmin_bits], axis=1).astype("<u2", copy=False).view(np.uint8)
    return np.concatenate([head, packed, qh, qs], axis=1)


def _dq_scale_min(b):
    d = fp16_to_f32(np.ascontiguousarray(b[:, 0:2]).view(np.uint16))
    dmin = fp16_to_f32(np.ascontiguousarray(b[:, 2:4]).view(np.uint16))
    sc, m = _unpack_scale_min_k4(b[:, 4:16])
    return (d * sc.astype(F32))[:, :, None], (dmin * m.astype(F32))[:, :, None]


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    d1, m1 = _dq_scale_min(b)
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    return (d1 * q.astype(F32) - m1).reshape(-1, QK_K)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    d1, m1 = _dq_scale_min(b)
    qh = np.unpackbits(b[:, 16:48].reshape(-1, 1, 32), axis=1, bitorder="little").reshape(-1, QK_K)
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, QK_K) + (qh << 4)
    return (d1 * q.reshape(-1, 8, 32).astype(F32) - m1).reshape(-1, QK_K)


# ------------------------------------------------------------------------------ registration


def _quantizer(fn, block_bytes):
    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        rows, cols = x.shape
        out = np.empty((rows, cols // QK_K * block_bytes), np.uint8)
        imatrix = None if imatrix is None else np.asarray(imatrix, F32)

        def work(r0: int, r1: int) -> None:
            out[r0:r1] = fn(np.asarray(x[r0:r1], F32), imatrix).reshape(r1 - r0, -1)

        for_row_chunks(rows, cols, CHUNK_ELEMENTS, work)
        return out

    return quantize


QUANTIZERS = {
    "Q2_K": _quantizer(_q2_k, 84),
    "Q3_K": _quantizer(_q3_k, 110),
    "Q4_K": _quantizer(_q4_k, 144),
    "Q5_K": _quantizer(_q5_k, 176),
    "Q6_K": _quantizer(_q6_k, 210),
}
DEQUANTIZERS = {
    "Q2_K": block_dequantizer(_dq_q2_k, 84, CHUNK_ELEMENTS),
    "Q3_K": block_dequantizer(_dq_q3_k, 110, CHUNK_ELEMENTS),
    "Q4_K": block_dequantizer(_dq_q4_k, 144, CHUNK_ELEMENTS),
    "Q5_K": block_dequantizer(_dq_q5_k, 176, CHUNK_ELEMENTS),
    "Q6_K": block_dequantizer(_dq_q6_k, 210, CHUNK_ELEMENTS),
}
