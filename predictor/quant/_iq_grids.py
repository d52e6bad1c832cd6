"""Lattice grids of the IQ1/IQ2/IQ3 quants and ggml's neighbour lists for off-grid points.

The grids come from gguf's own dequantization tables (`gguf.quants.IQ2_XXS.grid` ...), read back as level
indices l (the stored value is the l-th entry of the type's `grid_map`); ggml's quantizer works with
the odd integers 2l+1. The neighbour lists follow `iq2xs_init_impl` / `iq3xs_init_impl`: for a level
vector u that is not a grid point, every grid point whose squared distance to 2u+1 is among the
`n_want` smallest distinct distances, ordered by (distance, grid index).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from predictor.errors import UnsupportedError

# name: (gguf class, bits per level in the index code, n_want neighbour distances, levels searched)
_SPECS = {
    "IQ2_XXS": ("IQ2_XXS", 2, 2, 3),
    "IQ2_XS": ("IQ2_XS", 2, 2, 3),
    "IQ2_S": ("IQ2_S", 2, 1, 3),
    "IQ1": ("IQ1_S", 2, 3, 3),
    "IQ3_XXS": ("IQ3_XXS", 3, 2, 8),
    "IQ3_S": ("IQ3_S", 3, 3, 8),
}


@dataclass(frozen=True)
class GridTables:
    levels: np.ndarray  # (n_grid, m) uint8: level l of each element of each grid point
    pos: np.ndarray  # (n_grid, m) float32: 2l+1, the values ggml's searches compare against
    kmap: np.ndarray  # (n_codes,) int32: grid index of level code u, -1 if u is not on the grid
    pos_t: np.ndarray  # (m, n_grid) float32: pos transposed
    levels_t: np.ndarray  # (m, n_grid) intp: levels transposed
    nb_flat: np.ndarray  # all neighbour lists back to back (int32 grid indices)
    nb_start: np.ndarray  # (n_codes,) int64: where the list of code u starts in nb_flat
    nb_count: np.ndarray  # (n_codes,) int64: its length (0 for grid points and unreachable codes)
    bits: int  # bits per level in a code u = sum(l_i << bits*i)

    @property
    def group_size(self) -> int:
        return self.levels.shape[1]

    def codes(self, L: np.ndarray) -> np.ndarray:
        """Level code u for the last axis of L (levels)."""
        shifts = (self.bits * np.arange(L.shape[-1])).astype(np.int32)
        return (L.astype(np.int32) << shifts).sum(axis=-1)


def _grid_levels(class_name: str) -> np.ndarray:
    import gguf.quants

    cls = getattr(gguf.quants, class_name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=np.float32)
    assert np.all(np.diff(grid_map) > 0)
    return np.searchsorted(grid_map, values).astype(np.uint8)


@lru_cache(maxsize=None)
def grid_tables(name: str) -> GridTables:
    class_name, bits, n_want, n_levels = _SPECS[name]
    levels = _grid_levels(class_name)
    n_grid, m = levels.shape
    shifts = bits * np.arange(m)
    n_codes = 1 << (bits * m)
    grid_codes = (levels.astype(np.int64) << shifts).sum(axis=1)
    kmap = np.full(n_codes, -1, np.int32)
    kmap[grid_codes] = np.arange(n_grid, dtype=np.int32)

    # only codes whose levels are all < n_levels can come out of a search
    reach = np.stack(np.meshgrid(*[np.arange(n_levels)] * m, indexing="ij"), axis=-1).reshape(-1, m)
    reach_codes = (reach.astype(np.int64) << shifts).sum(axis=1)
    off = kmap[reach_codes] < 0
    off_levels = reach[off]
    off_codes = reach_codes[off]

    p = 2 * off_levels.astype(np.int64) + 1  # (n_off, m)
    g = 2 * levels.astype(np.int64) + 1  # (n_grid, m)
    dist = (p * p).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2 * p @ g.T  # exact integers
    # distance rank among the distinct values of each row; keep ranks < n_want
    lists = []
    for row in dist:
        distinct = np.unique(row)[:n_want]
        keep = np.flatnonzero(row <= distinct[-1])
        order = np.lexsort((keep, row[keep]))  # by distance, then grid index (ggml's qsort key)
        lists.append(keep[order])
    nb_count = np.zeros(n_codes, np.int64)
    nb_count[off_codes] = [len(v) for v in lists]
    nb_start = np.zeros(n_codes, np.int64)
    nb_start[off_codes] = np.cumsum([0] + [len(v) for v in lists[:-1]])
    return GridTables(
        levels=levels,
        pos=(2 * levels.astype(np.float32) + 1),
        pos_t=np.ascontiguousarray(2 * levels.T.astype(np.float32) + 1),
        levels_t=np.ascontiguousarray(levels.T.astype(np.intp)),
        kmap=kmap,
        nb_flat=np.concatenate(lists).astype(np.int32),
        nb_start=nb_start,
        nb_count=nb_count,
        bits=bits,
    )


def best_neighbours(t: GridTables, codes, xval, waux, scale, level_values=None) -> np.ndarray:
    """ggml's iq2/iq3_find_best_neighbour (and iq1_find_best_neighbour2) for M off-grid groups at once.

    codes (M,) off-grid level codes; xval, waux (M, m) float32; scale (M,) float32. For each group the
    neighbour minimising sum_i (waux_i*diff_i)*diff_i, diff = scale*q - xval, summed left to right;
    the first in list order wins ties. q is 2l+1, or level_values[item, l] when given (IQ1).
    Returns grid indices (M,)."""
    n_items = len(codes)
    out = np.empty(n_items, np.int32)
    if n_items == 0:
        return out
    cnt = t.nb_count[codes]
    if np.any(cnt == 0):
        raise AssertionError("code without neighbour list")  # ggml asserts here too
    # Lists differ in length (1 to a few hundred): group the items by length class and pad each
    # class to its longest list, so every step below is a dense (items, width) array operation.
    width_class = np.ceil(np.log2(cnt)).astype(np.int64)
    order = np.argsort(width_class, kind="stable")
    bounds = np.searchsorted(width_class[order], np.arange(width_class.max() + 2))
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        sel = order[a:b]
        lv = None if level_values is None else level_values[sel]
        out[sel] = _best_neighbours_dense(t, codes[sel], cnt[sel], xval[sel], waux[sel], scale[sel], lv)
    return out


def _best_neighbours_dense(t, codes, cnt, xval, waux, scale, level_values):
    width = int(cnt.max())
    slot = np.arange(width)
    pad = slot[None, :] >= cnt[:, None]
    flat = t.nb_start[codes][:, None] + np.minimum(slot[None, :], (cnt - 1)[:, None])
    cand = t.nb_flat[flat]  # (items, width); padding repeats the last neighbour
    d2 = np.zeros(cand.shape, np.float32)
    for i in range(xval.shape[1]):
        if level_values is None:
            q = t.pos_t[i].take(cand)
        else:
            q = np.take_along_axis(level_values, t.levels_t[i].take(cand), axis=1)
        diff = scale[:, None] * q
        diff -= xval[:, i : i + 1]
        prod = waux[:, i : i + 1] * diff
        prod *= diff
        d2 += prod
    d2[pad] = np.inf
    best = np.argmin(d2, axis=1)  # first minimum, as ggml's strict `<` scan
    rows = np.arange(len(codes))
    if not np.all(d2[rows, best] < np.finfo(np.float32).max):
        # ggml starts from FLT_MAX and finds nothing: it then aborts (or, for IQ1, reads out of bounds)
        raise UnsupportedError("values too large for this quantization type: no grid neighbour fits")
    return cand[rows, best]
