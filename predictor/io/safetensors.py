"""safetensors reader: our own parser (no `safetensors` package), memory-mapped, float32 at read time.

File layout (all little-endian):

    +----------------+----------------------------+------------------------------------------+
    | u64 header_len | header: JSON, header_len B | data area: tensors at [begin, end) of it |
    +----------------+----------------------------+------------------------------------------+
    0                8                            8 + header_len

    header = {"__metadata__": {str: str}?, NAME: {"dtype": "BF16", "shape": [rows, cols],
              "data_offsets": [begin, end]}, ...}   (offsets relative to the data area)

Every length is checked against the file size before anything is allocated or mapped. Tensor data
stays in the page cache behind an mmap; `read_tensor` / `read_rows` copy out only what is asked for
and convert it to float32 (BF16 by a 16-bit shift, F16 by numpy's cast).

Resident memory: reads madvise the mapping (RANDOM for scattered rows, DONTNEED once copied out), so
sampling every tensor of an 8B BF16 model stays under ~100 MB RSS and a whole-tensor read peaks at the
float32 result plus one 64 MiB slice.

NaN/Inf policy: with `check_finite=True` (the default) every read checks its result (min/max, no
extra array) and raises InputFileError naming the file and tensor. `read_rows` checks only the rows it
returns, so a sampled pass can miss a bad value elsewhere; an exact pass (`read_tensor`) cannot.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from predictor.errors import InputFileError, UnsupportedError, UsageError
from predictor.io.base import MAX_HEADER_BYTES, MAX_TENSORS, ModelMetadata, TensorInfo
from predictor.io.hf import (
    complete_metadata,
    map_tensor_names,
    parse_json_object,
    read_hf_config,
    read_json_object,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SAFETENSORS_DIMS = 8  # ggml stops at 4; vision towers may hold 5-D conv weights

# Every dtype the safetensors format defines, with its size in bytes. Only the first three are read.
READABLE_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


@dataclass(frozen=True)
class RawTensor:
    """A tensor entry of one safetensors header, offsets made absolute."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class SafetensorsHeader:
    """What `read_header` finds: tensors in file (offset) order, the optional __metadata__."""

    path: str
    file_size: int
    data_start: int
    tensors: list[RawTensor]
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Header parsing


def _bad(path, problem, fix="the file is corrupt, truncated or not safetensors; re-download it"):
    return InputFileError(path, problem, fix)


def _parse_entry(path, name: str, entry, data_size: int, data_start: int) -> RawTensor:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _bad(path, f"tensor {name!r} has no {key!r} in the header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or not dtype:
        raise _bad(path, f"tensor {name!r} has dtype {dtype!r}, expected a string like 'BF16'")
    if (not isinstance(shape, list) or len(shape) > MAX_SAFETENSORS_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
        raise _bad(path, f"tensor {name!r} has shape {str(shape)[:80]}, expected up to "
                         f"{MAX_SAFETENSORS_DIMS} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has data_offsets {str(offsets)[:80]}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"tensor {name!r} has data_offsets [{begin}, {end}] (begin must be <= end)")
    if end > data_size:
        raise _bad(path, f"tensor {name!r} ends at data byte {end}, past the end of the data area "
                         f"({data_size} bytes): the file is truncated or its header is wrong")
    size = DTYPE_SIZES.get(dtype)
    if size is not None:
        expected = math.prod(shape) * size
        if expected != end - begin:
            raise _bad(path, f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its "
                             f"data_offsets span {end - begin}")
    # Unknown dtype strings (future formats) are listed; reading them raises UnsupportedError.
    return RawTensor(name, dtype, tuple(shape), data_start + begin, end - begin)


def parse_header(path: str | os.PathLike, prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Validate and parse a header given the file's first 8 + header_len bytes and its size."""
    path = os.fspath(path)
    if file_size < 8 or len(prefix) < 8:
        raise _bad(path, f"file is {file_size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise _bad(path, f"header length {header_len} is larger than the file "
                         f"({file_size} bytes): the file is truncated or not safetensors")
    raw = prefix[8:8 + header_len]
    if len(raw) != header_len:
        raise _bad(path, f"could read only {len(raw)} of the {header_len} header bytes")
    header = parse_json_object(raw, path, "safetensors header")
    if len(header) > MAX_TENSORS + 1:
        raise _bad(path, f"header lists {len(header)} entries, over the {MAX_TENSORS} limit")

    data_start = 8 + header_len
    data_size = file_size - data_start
    meta = header.pop("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _bad(path, "header __metadata__ is not an object")
    tensors = [_parse_entry(path, name, entry, data_size, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.offset, t.n_bytes))

    # Sorted by start, tensors must not overlap (empty tensors take no bytes and cannot clash).
    prev = None
    for t in tensors:
        if t.n_bytes == 0:
            continue
        if prev is not None and t.offset < prev.offset + prev.n_bytes:
            raise _bad(path, f"tensors {prev.name!r} and {t.name!r} overlap in the data area",
                       "the file is corrupt or hostile; re-download or re-export it")
        prev = t
    return SafetensorsHeader(path, file_size, data_start, tensors, meta)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and check one file's header (cheap: reads 8 + header_len bytes, maps nothing)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    prefix += f.read(n)
    except IsADirectoryError:
        raise InputFileError(path, "is a folder, not a safetensors file",
                             "pass the folder to open_model / open_safetensors instead") from None
    except OSError as e:
        raise InputFileError(path, f"cannot read the file ({e.strerror or e})",
                             "check the path and its permissions") from None
    return parse_header(path, prefix, size)


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """`model.safetensors.index.json` -> {tensor name: shard file name}, checked."""
    path = os.fspath(path)
    index = read_json_object(path, what="safetensors index", max_bytes=MAX_HEADER_BYTES)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _bad(path, "index has no 'weight_map' object", "re-download model.safetensors.index.json")
    if len(weight_map) > MAX_TENSORS:
        raise _bad(path, f"index lists {len(weight_map)} tensors, over the {MAX_TENSORS} limit")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise _bad(path, f"index maps {name!r} to {shard!r}, expected a shard file name")
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts:
            raise _bad(path, f"index maps {name!r} to {shard!r}, outside the model folder",
                       "shard names must be plain file names next to the index")
    return weight_map


# ---------------------------------------------------------------------------------------------------
# The reader


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        out = raw.astype(np.uint32)  # bf16 is the top half of an f32
        out <<= 16
        return out.view(np.float32)
    return raw.astype(np.float32)  # copies F32 too, so callers never hold a view of the mmap


def _convert_into(out: np.ndarray, raw: np.ndarray, dtype: str) -> None:
    if dtype == "BF16":
        u = out.view(np.uint32)
        u[...] = raw
        u <<= 16
    else:
        out[...] = raw


_READ_SLICE_BYTES = 64 * 1024 * 1024


class _MappedFile:
    """One open safetensors file, mapped lazily on first read."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._mm: mmap.mmap | None = None

    def buffer(self) -> mmap.mmap:
        if self._mm is None:
            path = self.header.path
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != self.header.file_size:
                        raise InputFileError(path, f"changed size since its header was read "
                                                   f"({self.header.file_size} -> {size} bytes)",
                                             "do not modify model files while reading them")
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise InputFileError(path, f"cannot map the file ({e.strerror or e})",
                                     "check the path and its permissions") from None
        return self._mm

    def advise(self, offset: int, n_bytes: int, option: str) -> None:
        """madvise a byte range (no-op where unsupported). Used as:
        RANDOM before reading scattered rows: no readahead, which on kernels with large page-cache
          folios would otherwise map ~2 MB per row touched (measured: 256 rows -> +430 MB RSS);
        SEQUENTIAL before a whole-tensor read; DONTNEED after copying out, so resident memory stays
          bounded by what we hold, not by what we have read (the page cache keeps the data)."""
        mm = self._mm
        flag = getattr(mmap, "MADV_" + option, None)
        if mm is None or n_bytes <= 0 or flag is None:
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(offset + n_bytes, len(mm))
        try:
            mm.madvise(flag, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # an array still views the map; the GC will close it later
                pass
            self._mm = None


class SafetensorsReader:
    """ModelReader over one safetensors file, a sharded set, or a model folder.

    `tensors` carry GGUF names (HF names mapped); `unmapped` lists source names kept as they are;
    `ignored` lists tensors llama.cpp drops (with the reason). Reads accept GGUF or source names.
    """

    def __init__(self, path: str | os.PathLike, headers: list[SafetensorsHeader],
                 config_metadata: ModelMetadata | None = None, *, check_finite: bool = True):
        self.path = os.fspath(path)
        self.check_finite = check_finite
        self.files = [h.path for h in headers]
        self.header_metadata = headers[0].metadata if headers else {}
        self._files = {h.path: _MappedFile(h) for h in headers}

        seen: dict[str, str] = {}
        raw: list[tuple[RawTensor, str]] = []
        for h in headers:
            for t in h.tensors:
                if t.name in seen:
                    raise InputFileError(h.path, f"tensor {t.name!r} is also in {seen[t.name]}",
                                         "each tensor must be in exactly one shard; re-download")
                seen[t.name] = h.path
                raw.append((t, h.path))

        meta = config_metadata or ModelMetadata(source="safetensors")
        if config_metadata is not None:
            meta.source = "config.json + safetensors"
        if not meta.name:
            p = Path(self.path)
            meta.name = p.parent.name if p.is_file() and p.name.startswith("model") else p.stem
        mapping = map_tensor_names([t.name for t, _ in raw], meta.architecture)
        self.unmapped = mapping.unmapped
        self.ignored = mapping.ignored
        self.tensors: list[TensorInfo] = []
        self._by_name: dict[str, TensorInfo] = {}
        for t, file in raw:
            if t.name in mapping.ignored:
                continue
            info = TensorInfo(mapping.names[t.name], t.name, t.shape, t.dtype, file, t.offset, t.n_bytes)
            if info.name in self._by_name:
                other = self._by_name[info.name].source_name
                raise InputFileError(file, f"tensors {other!r} and {t.name!r} both map to {info.name!r}",
                                     "the checkpoint holds the same weight twice; remove one copy")
            self.tensors.append(info)
            self._by_name[info.name] = info
        self._by_source = {t.source_name: t for t in self.tensors}
        self.metadata = complete_metadata(meta, self.tensors)

    # -- lookup ---------------------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        """TensorInfo by GGUF name or by the name inside the file."""
        info = self._by_name.get(name) or self._by_source.get(name)
        if info is None:
            raise UsageError(f"{self.path}: no tensor named {name!r} — list reader.tensors for names")
        return info

    def __contains__(self, name: str) -> bool:
        return name in self._by_name or name in self._by_source

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """Flat read-only view of the stored elements (still in the file's dtype)."""
        np_dtype = READABLE_DTYPES.get(info.dtype)
        if np_dtype is None:
            raise UnsupportedError(
                f"{info.file}: tensor {info.source_name!r} is stored as {info.dtype}, which "
                f"quantpredict cannot read — use a BF16, F16 or F32 checkpoint of this model")
        if info.n_bytes == 0:
            return np.zeros(0, np_dtype)
        return np.frombuffer(self._files[info.file].buffer(), dtype=np_dtype,
                             count=info.n_bytes // np_dtype.itemsize, offset=info.offset)

    def _check(self, info: TensorInfo, x: np.ndarray, what: str) -> np.ndarray:
        if self.check_finite and x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            n_bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise InputFileError(info.file, f"tensor {info.source_name!r} has {n_bad} NaN/Inf "
                                            f"values{what}",
                                 "the weights are corrupt or overflowed; re-download or re-export "
                                 "the model")
        return x

    # -- reads ----------------------------------------------------------------------------------------

    def read_tensor(self, name: str) -> np.ndarray:
        """Whole tensor as float32 in its numpy shape."""
        info = self.tensor(name)
        raw = self._raw(info)
        f = self._files[info.file]
        f.advise(info.offset, info.n_bytes, "SEQUENTIAL")
        # Convert in slices, unmapping each after use: peak memory = the float32 result + one slice.
        x = np.empty(raw.size, np.float32)
        step = _READ_SLICE_BYTES // raw.itemsize if raw.size else 1
        for s in range(0, raw.size, step):
            _convert_into(x[s:s + step], raw[s:s + step], info.dtype)
            f.advise(info.offset + s * raw.itemsize, step * raw.itemsize, "DONTNEED")
        del raw
        return self._check(info, x.reshape(info.shape), "")

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Rows `rows` (indices into the (n_rows, cols) view, any order, repeats allowed) as float32.

        Only those rows are copied out of the mapping, so memory is len(rows) * cols * 4 bytes."""
        info = self.tensor(name)
        n_rows, cols = _rows_cols(info.shape)
        idx = np.asarray(rows)
        if idx.size == 0:
            return np.zeros((0, cols), np.float32)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise UsageError(f"read_rows({name!r}): rows must be a 1-D integer array")
        if idx.min() < 0 or idx.max() >= n_rows:
            raise UsageError(f"read_rows({name!r}): row index out of range 0..{n_rows - 1}")
        mat = self._raw(info).reshape(n_rows, cols)
        f = self._files[info.file]
        f.advise(info.offset, info.n_bytes, "RANDOM")
        x = _to_float32(mat[idx], info.dtype)
        del mat
        f.advise(info.offset, info.n_bytes, "DONTNEED")
        return self._check(info, x, " in the rows read")

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Each tensor as float32, one at a time, in file order."""
        for info in self.tensors:
            yield info, self.read_tensor(info.name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"SafetensorsReader({self.path!r}, {len(self.files)} file(s), {len(self.tensors)} "
                f"tensors, architecture={self.metadata.architecture!r})")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    cols = shape[-1]
    return (math.prod(shape[:-1]) if len(shape) > 1 else 1), cols


# ---------------------------------------------------------------------------------------------------
# Opening files, shard sets and folders


def _config_next_to(path: Path) -> ModelMetadata | None:
    cfg = path / "config.json"
    return read_hf_config(cfg) if cfg.is_file() else None


def _headers_from_index(index_path: Path) -> list[SafetensorsHeader]:
    weight_map = read_index(index_path)
    folder = index_path.parent
    shard_names = list(dict.fromkeys(weight_map.values()))  # first-seen order
    headers = []
    for shard in shard_names:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise InputFileError(index_path, f"lists shard {shard!r}, which is missing from {folder}",
                                 "download every shard the index names")
        headers.append(read_header(shard_path))
    present = {t.name: h.path for h in headers for t in h.tensors}
    for name, shard in weight_map.items():
        if name not in present:
            raise InputFileError(index_path, f"says tensor {name!r} is in {shard!r}, but it is not",
                                 "the index and shards do not match; re-download the model")
    return headers


def open_safetensors(path: str | os.PathLike, *, check_finite: bool = True) -> SafetensorsReader:
    """Open a .safetensors file, a model.safetensors.index.json, or a model folder (headers only).

    config.json next to the weights supplies the architecture (for name mapping) and metadata."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return open_safetensors(p / INDEX_NAME, check_finite=check_finite)
        if (p / SINGLE_NAME).is_file():
            files = [p / SINGLE_NAME]
        else:
            files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise InputFileError(p, "has no .safetensors files",
                                 "pass a folder with model.safetensors (or an index and shards)")
        headers = [read_header(f) for f in files]
        return SafetensorsReader(p, headers, _config_next_to(p), check_finite=check_finite)
    if not p.exists():
        raise InputFileError(p, "does not exist", "check the path")
    if p.name.endswith(".json"):
        return open_safetensors_index(p, check_finite=check_finite)
    return SafetensorsReader(p, [read_header(p)], _config_next_to(p.parent), check_finite=check_finite)


def open_safetensors_index(path: str | os.PathLike, *, check_finite: bool = True) -> SafetensorsReader:
    """Open a sharded model through its index json (every shard must exist and match the index)."""
    p = Path(path)
    return SafetensorsReader(p, _headers_from_index(p), _config_next_to(p.parent),
                             check_finite=check_finite)


__all__ = [
    "DTYPE_SIZES",
    "INDEX_NAME",
    "READABLE_DTYPES",
    "RawTensor",
    "SafetensorsHeader",
    "SafetensorsReader",
    "open_safetensors",
    "open_safetensors_index",
    "parse_header",
    "read_header",
    "read_index",
]
