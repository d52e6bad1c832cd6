"""llama.cpp quantizers in vectorised numpy, byte-exact with ggml.

Public API:
    quantize(x, qtype, *, imatrix=None) -> uint8 array (rows, row_bytes), ggml's block layout
    dequantize(q, qtype, *, cols)       -> float32 array (rows, cols)

Each implementation module (`legacy`, `kquants`, `iquants`, `floats`) registers two dicts:
    QUANTIZERS[name](x: float32 (rows, cols), imatrix: float32 (cols,) | None) -> uint8 (rows, row_bytes)
    DEQUANTIZERS[name](q: uint8 (rows, row_bytes), cols: int) -> float32 (rows, cols)
Types we do not quantize ourselves are still dequantized through `gguf.quants` (bit-exact with ggml).
"""

from __future__ import annotations

import numpy as np

from predictor.errors import UnsupportedError, UsageError
from predictor.quant import floats, iquants, kquants, legacy
from predictor.quant.types import TYPES, GGMLType, get_type

QUANTIZERS: dict = {}
DEQUANTIZERS: dict = {}
for _module in (floats, legacy, kquants, iquants):
    QUANTIZERS.update(_module.QUANTIZERS)
    DEQUANTIZERS.update(_module.DEQUANTIZERS)

__all__ = [
    "QUANTIZERS",
    "DEQUANTIZERS",
    "TYPES",
    "GGMLType",
    "dequantize",
    "get_type",
    "quantize",
    "supported_types",
]


def supported_types() -> list[str]:
    """GGML type names `quantize` can produce."""
    return [name for name in TYPES if name in QUANTIZERS]


def quantize(x: np.ndarray, qtype: str, *, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float32 matrix row by row exactly as `ggml_quantize_chunk` does."""
    t = get_type(qtype)
    fn = QUANTIZERS.get(t.name)
    if fn is None:
        raise UnsupportedError(
            f"quantizing to {t.name} is not supported; supported: {', '.join(supported_types())}"
        )
    x = np.asarray(x)
    if x.ndim != 2:
        raise UsageError(f"quantize expects a 2-D (rows, cols) array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise UsageError(f"quantize expects float32 input, got {x.dtype}")
    rows, cols = x.shape
    if cols % t.block_size:
        raise UsageError(f"row length {cols} is not a multiple of {t.name}'s block size {t.block_size}")
    if not np.isfinite(x).all():
        raise UsageError("input contains NaN or Inf values; ggml would write an invalid tensor")
    if imatrix is not None:
        imatrix = np.asarray(imatrix)
        if imatrix.dtype != np.float32 or imatrix.shape != (cols,):
            raise UsageError(
                f"imatrix must be float32 of shape ({cols},), got {imatrix.dtype} {imatrix.shape}"
            )
        if not np.isfinite(imatrix).all():
            raise UsageError("imatrix contains NaN or Inf values")
    x = np.ascontiguousarray(x)
    out = fn(x, imatrix)
    assert out.shape == (rows, t.row_bytes(cols)) and out.dtype == np.uint8
    return out


def dequantize(q: np.ndarray, qtype: str, *, cols: int) -> np.ndarray:
    """Dequantize ggml blocks (rows, row_bytes) back to float32 (rows, cols)."""
    t = get_type(qtype)
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    row_bytes = t.row_bytes(cols)
    if q.ndim != 2 or q.shape[1] != row_bytes:
        raise UsageError(f"{t.name} rows of {cols} values need {row_bytes} bytes, got shape {q.shape}")
    fn = DEQUANTIZERS.get(t.name)
    if fn is not None:
        return fn(q, cols)
    return _dequantize_with_gguf(q, t, cols)


def _dequantize_with_gguf(q: np.ndarray, t: GGMLType, cols: int) -> np.ndarray:
    import gguf
    import gguf.quants

    try:
        gtype = gguf.GGMLQuantizationType[t.name]
        out = gguf.quants.dequantize(q, gtype)
    except (KeyError, NotImplementedError):
        raise UnsupportedError(f"dequantizing {t.name} is not supported") from None
    return np.asarray(out, dtype=np.float32).reshape(q.shape[0], cols)
