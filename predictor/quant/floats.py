"""Plain float 'quantizers' (F32, F16, BF16), converted exactly as ggml does."""

from __future__ import annotations

import numpy as np


def _to_f32(x, imatrix):
    return x.astype("<f4").view(np.uint8)


def _to_f16(x, imatrix):
    return x.astype("<f2").view(np.uint8)


def _to_bf16(x, imatrix):
    # ggml_compute_fp32_to_bf16: NaN stays quiet NaN, otherwise round to nearest even on bit 16.
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    r = np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
    return r.astype("<u2").view(np.uint8)


def _from_f32(q, cols):
    return q.view("<f4").astype(np.float32)


def _from_f16(q, cols):
    return q.view("<f2").astype(np.float32)


def _from_bf16(q, cols):
    return (q.view("<u2").astype(np.uint32) << 16).view(np.float32)


QUANTIZERS = {"F32": _to_f32, "F16": _to_f16, "BF16": _to_bf16}
DEQUANTIZERS = {"F32": _from_f32, "F16": _from_f16, "BF16": _from_bf16}
