"""Importance-matrix (imatrix) files: the GGUF format and the legacy `.dat`, read exactly as llama-quantize.

Both give, per weight tensor, the per-column **mean squared activation** that llama-quantize passes to
ggml as `quant_weights` (llama.cpp common/imatrix-loader.cpp and tools/quantize/quantize.cpp):

* GGUF (`general.type = "imatrix"`): F32 tensors `<W>.in_sum2` (ne = n_cols, n_mat) and `<W>.counts`
  (n_mat values); value = in_sum2 / float(lround(count)) in float32; an expert with count 0 gets 1s.
* legacy `.dat` (no magic): stored values are mean x ncall; value = stored / ncall in float32
  (ncall <= 0: unchanged). MoE experts are concatenated, so entries are kept flat as (1, nval) and
  sliced per expert by `Imatrix.vector(name, expert, cols=...)` exactly as llama-quantize slices.

Like llama.cpp, `read_imatrix` tries GGUF first (by magic) and falls back to `.dat`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, NoReturn, Sequence

import numpy as np

from predictor.errors import InputFileError, MismatchError, UsageError
from predictor.io.base import TensorInfo
from predictor.io.gguf import GGUF_MAGIC, open_gguf, write_staged_gguf

__all__ = ["Imatrix", "read_imatrix", "write_imatrix_gguf"]

MAX_DAT_NAME_BYTES = 4096
_I32 = struct.Struct("<i")
_FIX_GET_NEW = "recompute it with llama-imatrix, or pass the file it wrote"
_ALLOWED_ABSENT = ("token_embd.weight", "output.weight")  # never collected (lookup / no --process-output)


@dataclass
class Imatrix:
    """One imatrix file, normalised to what llama-quantize uses."""

    path: str
    entries: dict[str, np.ndarray]  # float32 (n_mat, n_cols); legacy .dat: (1, nval) with experts concatenated
    counts: dict[str, np.ndarray]  # int64: GGUF lround(count) per matrix; .dat: [ncall]
    chunk_count: int | None
    chunk_size: int | None  # tokens per chunk; unknown (None) for .dat
    datasets: list[str] = field(default_factory=list)
    format: str = "gguf"  # "gguf" or "dat"

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def n_values(self) -> int:
        return sum(int(v.size) for v in self.entries.values())

    def vector(self, name: str, expert: int = 0, *, cols: int | None = None) -> np.ndarray:
        """float32 (n_cols,) weights for one matrix (one expert of a 3-D tensor).

        `cols` (the tensor's row length) slices the flat vector the way llama-quantize does; it is
        needed for MoE tensors read from a legacy .dat, which does not record the expert count."""
        e = self.entries.get(name)
        if e is None:
            raise UsageError(f"{self.path}: the imatrix has no entry {name!r}")
        flat = e.reshape(-1)
        cols = e.shape[1] if cols is None else cols
        if cols <= 0 or flat.size % cols:
            raise MismatchError(
                f"{self.path}: imatrix entry {name} has {flat.size} values, not a multiple of {cols} columns"
            )
        n_mat = flat.size // cols
        if not 0 <= expert < n_mat:
            raise UsageError(f"{self.path}: imatrix entry {name} has {n_mat} matrices; expert {expert} out of range")
        return flat[expert * cols : (expert + 1) * cols]

    def check_against(self, tensors: Sequence[TensorInfo], *, require_all: bool = True) -> None:
        """Raise MismatchError (one line) unless this imatrix fits the model's tensors.

        Checked: every entry names a model tensor; its value count equals cols x n_experts (the size
        llama-quantize requires; token_embd is exempt as there); with `require_all`, every 2-D+
        `blk.*.weight` tensor has an entry (token_embd/output may be absent, they are never collected)."""
        model = {t.name: t for t in tensors}
        unknown = sorted(n for n in self.entries if n not in model)
        wrong = []
        for name, e in self.entries.items():
            t = model.get(name)
            if t is None or name == "token_embd.weight":
                continue
            n_mat = t.shape[-3] if len(t.shape) >= 3 else 1
            if e.size != t.cols * n_mat or (self.format == "gguf" and e.shape != (n_mat, t.cols)):
                wrong.append(f"{name} (imatrix {e.shape[0]}x{e.shape[1]}, model {n_mat}x{t.cols})")
        missing = []
        if require_all:
            missing = [
                t.name
                for t in tensors
                if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2
                and t.name not in self.entries and t.name not in _ALLOWED_ABSENT
            ]
        if not (unknown or wrong or missing):
            return
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} entries name tensors the model does not have: {_some(unknown)}")
        if wrong:
            parts.append(f"{len(wrong)} column counts differ: {_some(wrong)}")
        if missing:
            parts.append(f"{len(missing)} model tensors have no entry: {_some(missing)}")
        raise MismatchError(
            f"{self.path}: imatrix does not match the model: {'; '.join(parts)} — use an imatrix computed "
            "for this model (llama-imatrix -m MODEL -f TEXT)"
        )


def _some(names: list[str], k: int = 4) -> str:
    more = f", and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (decided by magic bytes, as llama.cpp does)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise InputFileError(path, "file not found", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a folder, not an imatrix file", "pass the .gguf or .dat file") from None
    except OSError as e:
        raise InputFileError(path, f"cannot read the file ({e.strerror or e})", "check the path") from None
    if magic == GGUF_MAGIC:
        return _read_gguf_imatrix(path)
    return _read_dat_imatrix(path)


# -- GGUF format ------------------------------------------------------------------------------

def _lround(x: np.ndarray) -> np.ndarray:
    """C lround: nearest integer, halves away from zero (in float64, so 0.49999997f stays 0)."""
    x64 = x.astype(np.float64)
    return np.trunc(x64 + np.copysign(0.5, x64)).astype(np.int64)


def _read_gguf_imatrix(path: str) -> Imatrix:
    def bad(problem: str) -> NoReturn:
        raise InputFileError(path, problem, _FIX_GET_NEW)

    with open_gguf(path, check_finite=False) as g:
        kv, kv_types = g.kv, g.header.kv_types
        needed = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        absent = [k for k in needed if k not in kv]
        if absent:
            raise InputFileError(
                path,
                f"GGUF file is not an imatrix (general.type={kv.get('general.type')!r}; no {', '.join(absent)})",
                "pass the imatrix file written by llama-imatrix, not a model",
            )
        if kv_types["imatrix.datasets"] != "ARRAY[STRING]":
            bad(f"imatrix.datasets is {kv_types['imatrix.datasets']}, not an array of strings")
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
            if not kv_types[k].startswith(("UINT", "INT")):
                bad(f"{k} is {kv_types[k]}, not an integer")
        datasets = list(kv["imatrix.datasets"])

        pairs: dict[str, list] = {}
        for t in g.tensors:
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if t.name.endswith(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
        if not pairs:
            bad("imatrix has no <name>.in_sum2 / <name>.counts tensors")

        entries, counts = {}, {}
        for name in sorted(pairs):
            t_sum, t_cnt = pairs[name]
            if t_sum is None or t_cnt is None:
                bad(f"imatrix entry {name} has only one of .in_sum2 / .counts")
            if t_sum.dtype != "F32" or t_cnt.dtype != "F32":
                bad(f"imatrix entry {name} is stored as {t_sum.dtype}/{t_cnt.dtype}, not F32")
            sums = g.read_tensor(t_sum.name).reshape(-1)
            cnt = g.read_tensor(t_cnt.name).reshape(-1)
            n_mat = cnt.size
            if sums.size % n_mat:
                bad(f"imatrix entry {name}: {sums.size} sums do not split into {n_mat} matrices")
            if not (np.isfinite(sums).all() and np.isfinite(cnt).all()):
                bad(f"imatrix entry {name} contains NaN or Inf")
            if (cnt < 0).any() or (cnt > 2.0**62).any():
                bad(f"imatrix entry {name} has impossible counts {cnt[:4].tolist()}")
            n = _lround(cnt)
            nf = n.astype(np.float32)  # C: (float) int64 count, then a float32 division
            with np.errstate(divide="ignore", invalid="ignore"):
                values = sums.reshape(n_mat, -1) / nf[:, None]
            values[n == 0] = np.float32(1.0)
            entries[name] = _frozen(values)
            counts[name] = _frozen(n)
        chunk_count, chunk_size = int(kv["imatrix.chunk_count"]), int(kv["imatrix.chunk_size"])
        return Imatrix(path, entries, counts, chunk_count, chunk_size, datasets, "gguf")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# -- legacy .dat format -------------------------------------------------------------------------
#
#   i32 n_entries
#   n_entries x ( i32 name_len | name bytes | i32 ncall | i32 nval | nval x f32 )
#   optional trailer: i32 chunk_count | i32 dataset_len | dataset bytes
#   (little-endian, no padding, no magic)

class _DatCursor:
    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, problem: str) -> NoReturn:
        raise InputFileError(
            self.path,
            f"not a GGUF imatrix, and not a valid legacy .dat imatrix: {problem}",
            "pass the imatrix file written by llama-imatrix; if it was copied, copy it again",
        )

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            left = self.size - self.pos
            self.fail(f"truncated at {what} (needs {n} bytes at offset {self.pos}, {left} left)")
        start = self.pos
        self.pos += n
        return start

    def i32(self, what: str) -> int:
        return _I32.unpack_from(self.buf, self.take(4, what))[0]


def _read_dat_imatrix(path: str) -> Imatrix:
    size = os.path.getsize(path)
    if size < 4:
        _DatCursor(b"", size, path).fail(f"the file is only {size} bytes")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_dat(buf, size, path)
    finally:
        try:
            buf.close()
        except BufferError:
            pass


def _parse_dat(buf, size: int, path: str) -> Imatrix:
    cur = _DatCursor(buf, size, path)
    n_entries = cur.i32("entry count")
    # smallest entry: name_len + 1 name byte + ncall + nval + one float = 17 bytes
    if n_entries < 1 or n_entries * 17 > cur.remaining():
        cur.fail(f"entry count {n_entries} is impossible for a file of {size} bytes")
    entries, counts = {}, {}
    for i in range(n_entries):
        name_len = cur.i32(f"name length of entry {i}")
        if not 1 <= name_len <= min(MAX_DAT_NAME_BYTES, cur.remaining()):
            cur.fail(f"entry {i} has name length {name_len} (file has {cur.remaining()} bytes left)")
        raw = bytes(buf[cur.take(name_len, f"name of entry {i}") : cur.pos])
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            cur.fail(f"entry {i} name is not UTF-8 ({raw[:40]!r})")
        if "\0" in name:
            cur.fail(f"entry {i} name contains a NUL byte ({raw[:40]!r})")
        if name in entries:
            cur.fail(f"duplicate entry {name!r}")
        ncall = cur.i32(f"ncall of {name}")
        nval = cur.i32(f"value count of {name}")
        if nval < 1 or nval * 4 > cur.remaining():
            left = cur.remaining()
            cur.fail(f"entry {name} claims {nval} values but {left} bytes remain (truncated or corrupt)")
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=cur.take(4 * nval, f"values of {name}"))
        values = values.astype(np.float32)  # copy out of the mapping
        if not np.isfinite(values).all():
            cur.fail(f"entry {name} contains NaN or Inf values")
        if ncall > 0:
            values = values / np.float32(ncall)  # C: float / (int64 -> float)
        entries[name] = _frozen(values.reshape(1, -1))
        counts[name] = _frozen(np.array([ncall], dtype=np.int64))

    chunk_count, datasets = None, []
    if cur.remaining():
        chunk_count = cur.i32("trailer chunk count")
        if cur.remaining():
            n = cur.i32("trailer dataset length")
            if n < 0 or n > cur.remaining():
                cur.fail(f"trailer dataset length {n} but {cur.remaining()} bytes remain")
            if n > 0:
                raw = bytes(buf[cur.take(n, "dataset name") : cur.pos])
                datasets.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
        if cur.remaining():
            cur.fail(f"{cur.remaining()} unexpected bytes after the trailer")
    return Imatrix(path, entries, counts, chunk_count, None, datasets, "dat")


# -- writer -------------------------------------------------------------------------------------

def write_imatrix_gguf(
    path: str | os.PathLike,
    sums: dict[str, np.ndarray],
    counts: dict[str, np.ndarray],
    *,
    chunk_count: int,
    chunk_size: int,
    datasets: Iterable[str],
) -> None:
    """Write a GGUF imatrix exactly as llama-imatrix lays it out.

    sums[W]: (n_mat, n_cols) raw sums of squared activations (1-D = one matrix); counts[W]: (n_mat,)
    activation rows accumulated. Tensors `<W>.in_sum2`, `<W>.counts` in F32, sorted by name."""
    import gguf

    datasets = [str(d) for d in datasets]
    if set(sums) != set(counts):
        differ = _some(sorted(set(sums) ^ set(counts)))
        raise UsageError(f"sums and counts must have the same names; they differ in {differ}")
    if not sums:
        raise UsageError("an imatrix needs at least one entry")
    if not datasets:
        raise UsageError("give at least one dataset name (llama-quantize requires imatrix.datasets)")
    for k, v in (("chunk_count", chunk_count), ("chunk_size", chunk_size)):
        if not isinstance(v, (int, np.integer)) or not 0 <= v < 2**32:
            raise UsageError(f"{k} must be an integer in [0, 2^32), got {v!r}")
    prepared = []
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        c = np.asarray(counts[name], dtype=np.float32).reshape(-1)
        if s.ndim != 2 or c.size != s.shape[0]:
            raise UsageError(
                f"{name}: sums must be (n_mat, n_cols) with n_mat = len(counts); got {s.shape} and {c.size} counts"
            )
        if not (np.isfinite(s).all() and np.isfinite(c).all()) or (c < 0).any():
            raise UsageError(f"{name}: sums and counts must be finite and counts non-negative")
        # GGUF records ggml_n_dims: trailing dimensions of 1 are dropped (dense: 1-D sums, 1 count).
        n_mat = s.shape[0]
        prepared.append((name, s[0] if n_mat == 1 else s, c if n_mat == 1 else c.reshape(n_mat, 1)))

    w = gguf.GGUFWriter(os.fspath(path), arch="")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # imatrix files carry no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", datasets)
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, s, c in prepared:
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(s))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(c))
    write_staged_gguf(w)
