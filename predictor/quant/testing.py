"""Byte-level comparison of quantized tensors, for tests and checks: which blocks differ, and the worst."""

from __future__ import annotations

import numpy as np

from predictor.quant.types import get_type


def describe_block_mismatch(actual: np.ndarray, expected: np.ndarray, qtype: str) -> str | None:
    """None when the bytes are identical, else a short report: how many blocks differ and the worst one.

    The worst block is the one with the most differing bytes (ties: the first)."""
    t = get_type(qtype)
    actual = np.asarray(actual, dtype=np.uint8)
    expected = np.asarray(expected, dtype=np.uint8)
    if actual.shape != expected.shape:
        return f"{t.name}: shape {actual.shape} != expected {expected.shape}"
    if np.array_equal(actual, expected):
        return None
    rows = expected.shape[0] if expected.ndim == 2 else 1
    a = actual.reshape(rows, -1, t.block_bytes)
    e = expected.reshape(rows, -1, t.block_bytes)
    diff = (a != e).sum(axis=2)  # (rows, blocks_per_row)
    n_bad = int((diff > 0).sum())
    r, b = np.unravel_index(int(np.argmax(diff)), diff.shape)
    offsets = np.flatnonzero(a[r, b] != e[r, b])
    return (
        f"{t.name}: {n_bad} of {diff.size} blocks differ; worst is row {r} block {b} "
        f"(elements {b * t.block_size}..{(b + 1) * t.block_size - 1}) with {len(offsets)} of "
        f"{t.block_bytes} bytes different at offsets {offsets[:12].tolist()}\n"
        f"  got      {a[r, b].tobytes().hex()}\n  expected {e[r, b].tobytes().hex()}"
    )


def assert_same_blocks(actual: np.ndarray, expected: np.ndarray, qtype: str, context: str = "") -> None:
    report = describe_block_mismatch(actual, expected, qtype)
    if report is not None:
        raise AssertionError(f"{context}: {report}" if context else report)
