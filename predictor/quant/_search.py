"""Shared building blocks for the ggml quantizers, bit-exact with ggml-quants.c.

Conventions that every function here follows (and that exactness depends on):

* Everything is float32 and no operation is fused: `a*b + c` is two roundings, as in ggml-base,
  which is compiled without FMA contraction. Constants are np.float32 so that no float64 sneaks in.
* ggml accumulates with `sum += term` left to right in float32. Where such a sum feeds a decision
  we add the terms one element position at a time (`seq_sum`), never with numpy's pairwise `sum`.
* Rounding: `nearest_int` is ggml's magic-number trick (round half to even, bit-exact for every float
  including out-of-range ones); `rint_f32` is the same rounding for |v| <= 4194303, used in the hot
  search loops where the argument is bounded by construction (or checked, in make_qkx_quants_t).

Layouts. The public search functions take `(n_blocks, n)` arrays (one block per row) and return the
same. Internally everything runs "element-major", `(n, n_blocks)`: element position i of all
blocks is the contiguous row `a[i]`, so the sequential sums are n vector adds and the search loops
iterate in Python only over the element positions and search steps, never over blocks. The `_t`
variants take and return that transposed layout directly (the K-quant pipelines use them).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits

__all__ = [
    "F32",
    "GROUP_MAX_EPS",
    "fp16_bits",
    "fp16_round",
    "fp16_to_f32",
    "first_max",
    "first_min",
    "for_row_chunks",
    "get_num_threads",
    "set_num_threads",
    "make_q3_quants",
    "make_qkx2_quants",
    "make_qkx3_quants",
    "make_qp_quants",
    "make_qx_quants",
    "nearest_int",
    "rint_f32",
    "roundf",
    "seq_sum",
]


# ----------------------------------------------------------------------------------------- threads

_num_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Threads the quantizers may use (None: QUANTPREDICT_THREADS, else the CPUs we may run on, <= 8)."""
    global _num_threads
    _num_threads = None if n is None else max(1, int(n))


def get_num_threads() -> int:
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("QUANTPREDICT_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def for_row_chunks(rows: int, cols: int, target_elements: int, work: Callable[[int, int], None]) -> None:
    """Call work(r0, r1) over row ranges of about `target_elements` values each.

    Rows are quantized independently (as in ggml), so chunks may run on several threads: numpy
    releases the GIL inside its loops. `work` writes its own slice of the output."""
    step = max(1, target_elements // max(cols, 1))
    chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    n_threads = min(get_num_threads(), len(chunks))
    if n_threads <= 1:
        for r0, r1 in chunks:
            work(r0, r1)
        return
    with ThreadPoolExecutor(n_threads) as pool:
        for f in [pool.submit(work, r0, r1) for r0, r1 in chunks]:
            f.result()


def block_dequantizer(fn: Callable[[np.ndarray], np.ndarray], block_bytes: int, chunk_elements: int = 1 << 16):
    """Turn fn((n_blocks, block_bytes) uint8) -> (n_blocks, block) float32 into a DEQUANTIZERS entry
    (q (rows, row_bytes), cols) -> (rows, cols), run over row chunks to bound temporaries."""

    def dequantize(q: np.ndarray, cols: int) -> np.ndarray:
        rows = q.shape[0]
        out = np.empty((rows, cols), F32)

        def work(r0: int, r1: int) -> None:
            out[r0:r1] = fn(q[r0:r1].reshape(-1, block_bytes)).reshape(r1 - r0, cols)

        for_row_chunks(rows, cols, chunk_elements, work)
        return out

    return dequantize


# ----------------------------------------------------------------------------------------- scalars


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int` (round half to even) as int32, reproducing its bits for any float32.

    For |v| <= 4194303 this is exact rounding; beyond that ggml returns garbage low mantissa bits
    (its assert is compiled out), and so do we."""
    v = np.asarray(v, dtype=F32)
    return (np.asarray(v + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def rint_f32(v: np.ndarray) -> np.ndarray:
    """Round half to even, as float32. Equals `nearest_int` only for |v| <= 4194303."""
    return np.rint(v)


# The clip ufunc itself: np.clip's Python wrapper costs more than the clipping on our array sizes.
_clip = getattr(getattr(np, "_core", None), "umath", None)
_clip = getattr(_clip, "clip", None) or np.clip


def roundf(v: np.ndarray) -> np.ndarray:
    """C `roundf` (half away from zero), as float32. `v - trunc(v)` is exact, so no 0.49999997 trap."""
    t = np.trunc(v)
    frac = v - t
    return t + np.where(np.abs(frac) >= F32(0.5), np.sign(v), F32(0))


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even, subnormals included (= numpy's cast), as uint16."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_to_f32(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of stored uint16 halves."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value ggml reads back after storing `v` as fp16."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


# ------------------------------------------------------------------------------------ reductions


def _loop_sum(a: np.ndarray, start_with_first: bool) -> np.ndarray:
    acc = a[0].copy() if start_with_first else a[0] + F32(0)
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def _reduce_is_sequential() -> bool:
    """numpy reduces a C-contiguous (n, m>=2) float32 array over axis 0 row by row (the pairwise
    summation only applies along the innermost memory axis). Checked once at import on data where
    the orders disagree, so a numpy that behaves otherwise silently gets the explicit loop."""
    rng = np.random.default_rng(7)
    for n, m in ((5, 2), (33, 3), (256, 64)):
        a = (rng.standard_normal((n, m)) * 10.0 ** rng.uniform(-4, 4, (n, m))).astype(F32)
        if not np.array_equal(np.add.reduce(a, axis=0, initial=F32(0)), _loop_sum(a, False)):
            return False
    return True


_REDUCE_OK = _reduce_is_sequential()


def seq_sum(a: np.ndarray, axis: int = 0, *, start_with_first: bool = False) -> np.ndarray:
    """C's `float s = 0; for (i...) s += a[i];` along `axis`, in float32, in index order.

    `start_with_first=True` mimics `float s = a[0]; for (i = 1...) s += a[i];` (no `0 +`, which only
    differs for a leading -0.0). Fastest on element-major arrays with axis 0."""
    a = np.asarray(a, dtype=F32)
    if axis != 0:
        a = np.moveaxis(a, axis, 0)
    if not (_REDUCE_OK and 1 <= a.ndim <= 2 and a.shape[0] >= 1):
        return _loop_sum(a, start_with_first)
    if a.ndim == 1 or a.shape[1] == 1:
        # a single column would be summed pairwise: give it a zero companion column
        col = a.reshape(-1, 1)
        r = seq_sum(np.concatenate([col, np.zeros_like(col)], axis=1), start_with_first=start_with_first)[:1]
        return r.reshape(()) if a.ndim == 1 else r
    a = np.ascontiguousarray(a)  # row-by-row order needs axis 0 to be the outer memory axis
    r = np.add.reduce(a, axis=0, initial=F32(0))
    if start_with_first:
        # `a[0] + ...` and `0 + a[0] + ...` differ only for a column of nothing but -0.0
        z = r == 0
        if z.any():
            neg = np.all((a[:, z] == 0) & np.signbit(a[:, z]), axis=0)
            r[z] = np.where(neg, F32(-0.0), r[z])
    return r


def _first_zero_signed(a: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Fix the sign of zero results of a min/max scan: C keeps the first zero it meets."""
    zero = value == 0
    if zero.any():
        idx = np.argmax(a == 0, axis=0)
        firsts = np.take_along_axis(a, idx[None], axis=0)[0]
        value = np.where(zero, firsts, value)
    return value


def first_min(a: np.ndarray) -> np.ndarray:
    """`m = a[0]; if (a[i] < m) m = a[i];` over axis 0, signed zero included."""
    return _first_zero_signed(a, a.min(axis=0))


def first_max(a: np.ndarray) -> np.ndarray:
    """`m = a[0]; if (a[i] > m) m = a[i];` over axis 0, signed zero included."""
    return _first_zero_signed(a, a.max(axis=0))


def _signed_absmax(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the largest |a| and the signed value where it first occurs, over axis 0."""
    ax = np.abs(a)
    idx = np.argmax(ax, axis=0)
    amax = np.take_along_axis(ax, idx[None], axis=0)[0]
    mx = np.take_along_axis(a, idx[None], axis=0)[0]
    return amax, mx


# ---------------------------------------------------------------------------- make_qx_quants


def make_qx_quants_t(x: np.ndarray, nmax: int, weights: np.ndarray | None = None):
    """ggml `make_qx_quants(n, nmax, x, L, rmse_type=1, qw)` on element-major `x` (n, n_blocks).

    Symmetric search of 19 scales; weights default to x*x (rmse_type 1 with qw NULL).
    Returns (scale float32 (n_blocks,), L uint8 (n, n_blocks) in [0, 2*nmax))."""
    x = np.ascontiguousarray(x, dtype=F32)
    amax, mx = _signed_absmax(x)
    dead = amax < GROUP_MAX_EPS
    mx = np.where(dead, F32(1), mx)
    w = x * x if weights is None else np.ascontiguousarray(weights, dtype=F32)
    wx = w * x
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    l = np.empty_like(x)
    t = np.empty_like(x)

    def levels(iscale):
        np.multiply(x, iscale, out=l)
        np.rint(l, out=l)
        _clip(l, lo, hi, out=l)

    def sums(iscale):
        levels(iscale)
        np.multiply(wx, l, out=t)
        sumlx = seq_sum(t)
        np.multiply(w, l, out=t)
        np.multiply(t, l, out=t)
        return sumlx, seq_sum(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_iscale = F32(-nmax) / mx
        sumlx, suml2 = sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                best_iscale = np.where(better, iscale, best_iscale)
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
        levels(best_iscale)  # the levels of the winning step, recomputed once
    L = (l + fnmax).astype(np.uint8)
    L[:, dead] = 0
    scale = np.where(dead, F32(0), scale).astype(F32)
    return scale, L


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None):
    """`make_qx_quants` (rmse_type 1) on blocks `x` (n_blocks, n); weights (n_blocks, n) or None (x*x).

    Returns (scale (n_blocks,), L uint8 (n_blocks, n))."""
    w = None if weights is None else np.ascontiguousarray(np.asarray(weights, F32).T)
    scale, L = make_qx_quants_t(np.ascontiguousarray(np.asarray(x, F32).T), nmax, w)
    return scale, np.ascontiguousarray(L.T)


# ---------------------------------------------------------------------------- make_q3_quants


def _refine_levels(x, w, L, sumlx, suml2, lo, hi, qp_rules):
    """ggml's up to 5 passes of coordinate descent over the levels, shared by make_q3_quants
    (qp_rules False: L in [lo, hi], accept needs sl2 > 0) and make_qp_quants (qp_rules True:
    only `MIN(nmax, .)`, L stored as uint8, the pass needs slx > 0 and sl2 > 0 up front).

    Per block, a pass without change is a fixed point (ggml breaks there), so after each pass only
    the blocks that changed stay in the working set. Updates L, sumlx, suml2 in place."""
    n = x.shape[0]
    idx = None  # None: all blocks
    xa, wa, La, slxa, sl2a = x, w, L, sumlx, suml2
    lo, hi = np.int32(lo), np.int32(hi)
    for _ in range(5):
        wxa = wa * xa
        changed = np.zeros(xa.shape[1], bool)
        for i in range(n):
            Li, wi, wxi = La[i], wa[i], wxa[i]
            slx = slxa - wxi * Li
            sl2 = sl2a - (wi * Li) * Li
            ni = nearest_int((xa[i] * sl2) / slx)  # exact even when slx is tiny
            ni = np.minimum(ni, hi) if qp_rules else _clip(ni, lo, hi)
            new_l = ni.astype(F32)
            slx_n = slx + wxi * new_l
            sl2_n = sl2 + (wi * new_l) * new_l
            take = (slx > 0) & (new_l != Li) & ((slx_n * slx_n) * sl2a > (slxa * slxa) * sl2_n)
            take &= (sl2 > 0) if qp_rules else (sl2_n > 0)
            if take.any():
                changed |= take
                stored = (ni & 0xFF).astype(F32) if qp_rules else new_l
                La[i] = np.where(take, stored, Li)
                slxa = np.where(take, slx_n, slxa)
                sl2a = np.where(take, sl2_n, sl2a)
        if idx is None:
            sumlx[:], suml2[:] = slxa, sl2a
            idx = np.arange(x.shape[1])
        else:
            L[:, idx], sumlx[idx], suml2[idx] = La, slxa, sl2a
        if not changed.any():
            break
        idx = idx[changed]
        xa, wa, La, slxa, sl2a = x[:, idx], w[:, idx], L[:, idx], sumlx[idx], suml2[idx]


def make_q3_quants_t(x: np.ndarray, nmax: int):
    """ggml `make_q3_quants(n, nmax, x, L, do_rmse=true)` on element-major `x` (n, n_blocks).

    Returns (scale (n_blocks,), L uint8 (n, n_blocks) in [0, 2*nmax))."""
    x = np.ascontiguousarray(x, dtype=F32)
    amax, mx = _signed_absmax(x)
    dead = amax < GROUP_MAX_EPS
    mx = np.where(dead, F32(1), mx)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = rint_f32((F32(-nmax) / mx) * x)
        _clip(L, F32(-nmax), F32(nmax - 1), out=L)
        sumlx = seq_sum((w * x) * L)
        suml2 = seq_sum((w * L) * L)
        _refine_levels(x, w, L, sumlx, suml2, -nmax, nmax - 1, False)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = (L + F32(nmax)).astype(np.uint8)
    L[:, dead] = 0
    scale[dead] = 0
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int):
    """`make_q3_quants(do_rmse=true)` on blocks `x` (n_blocks, n) -> (scale, L uint8 (n_blocks, n))."""
    scale, L = make_q3_quants_t(np.ascontiguousarray(np.asarray(x, F32).T), nmax)
    return scale, np.ascontiguousarray(L.T)


# ------------------------------------------------------------------------- make_qkx2/3_quants


def make_qkx_quants_t(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """ggml `make_qkx2_quants` / `make_qkx3_quants` (identical when weights are given) on
    element-major `x`, `weights` (n, n_blocks): asymmetric scale+min search over nstep+1 steps.

    Returns (scale (n_blocks,), the_min (n_blocks,) = -min as ggml reports it, L uint8 (n, n_blocks))."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(weights, dtype=F32)
    fnmax, zero = F32(nmax), F32(0)
    rmin, rdelta = F32(rmin), F32(rdelta)
    mn = first_min(x)
    mx = first_max(x)
    x_lo = mn  # smallest value, before ggml clamps the min to <= 0
    sum_w = seq_sum(w, start_with_first=True)
    sum_x = seq_sum(w * x, start_with_first=True)
    mn = np.where(mn > 0, zero, mn)
    flat = mx == mn
    l = np.empty_like(x)  # this step's levels
    t = np.empty_like(x)  # scratch
    wl = np.empty_like(x)

    def levels(iscale, xm, m):
        np.multiply(xm, iscale, out=l)
        # |iscale*(x - m)| is about nmax unless a search step moved the min far from the data;
        # np.rint is nearest_int only below 2**22, so check the per-block bound (flat blocks: ignored)
        reach = np.abs(iscale) * np.maximum(np.abs(x_lo - m), np.abs(mx - m))
        if np.any(np.where(flat, zero, reach) > F32(4e6)):
            l[...] = nearest_int(l)
        else:
            np.rint(l, out=l)
        _clip(l, zero, fnmax, out=l)

    def error(scale, m):
        # C: diff = scale*l + min - x; err += w * (use_mad ? |diff| : diff*diff)
        np.multiply(l, scale, out=t)
        np.add(t, m, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(t, w, out=t)
        return seq_sum(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        xm = x - mn
        best_iscale, best_mn = fnmax / (mx - mn), mn
        levels(best_iscale, xm, mn)
        scale = F32(1) / best_iscale
        best = error(scale, mn)
        for step in range(nstep + 1) if nstep >= 1 else ():
            iscale = ((rmin + rdelta * F32(step)) + fnmax) / (mx - mn)
            levels(iscale, xm, mn)
            np.multiply(w, l, out=wl)
            sum_l = seq_sum(wl)
            np.multiply(wl, l, out=t)
            sum_l2 = seq_sum(t)
            np.multiply(wl, x, out=t)
            sum_xl = seq_sum(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, zero, this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min)
            better = (D > 0) & (cur < best) & ~flat
            if better.any():
                # remember how this step's levels were made (iscale and the min in force)
                best_iscale = np.where(better, iscale, best_iscale)
                best_mn = np.where(better, mn, best_mn)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
                np.subtract(x, mn, out=xm)
        np.subtract(x, best_mn, out=xm)
        levels(best_iscale, xm, best_mn)  # the winning step's levels, recomputed once
    l[:, flat] = 0  # (NaN there: 0 * inf)
    L = l.astype(np.uint8)
    scale = np.where(flat, zero, scale).astype(F32)
    return scale, (-mn).astype(F32), L


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad=False):
    """`make_qkx2_quants` on blocks (n_blocks, n) -> (scale, the_min, L uint8 (n_blocks, n))."""
    xt = np.ascontiguousarray(np.asarray(x, F32).T)
    wt = np.ascontiguousarray(np.asarray(weights, F32).T)
    scale, the_min, L = make_qkx_quants_t(xt, wt, nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, np.ascontiguousarray(L.T)


def make_qkx3_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad=False):
    """`make_qkx3_quants` on blocks (n_blocks, n); weights None means x*x (ggml's default)."""
    x = np.asarray(x, F32)
    if weights is None:
        weights = x * x
    return make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad)


# ---------------------------------------------------------------------------- make_qp_quants


def make_qp_quants_t(x: np.ndarray, nmax: int, quant_weights: np.ndarray):
    """ggml `make_qp_quants(n, nmax, x, L, quant_weights)` on element-major (n, n_blocks): the
    weighted search for non-negative sub-block scales/mins in the K-quants' imatrix paths.

    Returns (scale (n_blocks,), L uint8 (n, n_blocks)); L wraps like ggml's uint8_t stores."""
    n, nb = x.shape
    w = quant_weights
    fnmax = F32(nmax)
    zero = F32(0)
    mx = np.maximum(x.max(axis=0), zero)
    dead = mx < GROUP_MAX_EPS
    mx = np.where(dead, F32(1), mx)
    wx = w * x

    def mse(scale, l):
        diff = x - scale * l
        return seq_sum((w * diff) * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / mx
        L = nearest_int(iscale * x).astype(np.uint8).astype(F32)
        best = mse(F32(1) / iscale, L)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + fnmax) / mx
            l = np.minimum(nearest_int(iscale_is * x), nmax).astype(F32)
            cur = mse(F32(1) / iscale_is, l)
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_is, iscale)
        ni = np.minimum(nearest_int(iscale * x), nmax)
        l = ni.astype(F32)
        L = (ni & 0xFF).astype(F32)  # ggml stores the level in a uint8_t
        sumlx = seq_sum(wx * l)
        suml2 = seq_sum((w * l) * l)
        _refine_levels(x, w, L, sumlx, suml2, 0, nmax, True)
        scale = np.where(suml2 > 0, sumlx / suml2, zero).astype(F32)
    L = L.astype(np.uint8)
    L[:, dead] = 0
    scale[dead] = 0
    return scale, L


def make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray):
    """`make_qp_quants` on blocks (n_blocks, n) -> (scale, L uint8 (n_blocks, n))."""
    xt = np.ascontiguousarray(np.asarray(x, F32).T)
    wt = np.ascontiguousarray(np.asarray(quant_weights, F32).T)
    scale, L = make_qp_quants_t(xt, nmax, wt)
    return scale, np.ascontiguousarray(L.T)
