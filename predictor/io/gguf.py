"""GGUF model reader: a bounds-checked parse of the header, memory-mapped tensor data, float32 on demand.

gguf 0.19.0's `GGUFReader` trusts every length and offset in the file, so a hostile file can make it
allocate without bound or read past the end. Validating the header means walking every byte of it,
so the validator *is* the parser: we keep our own walk and never hand unchecked bytes to anyone.
The `gguf` package still supplies the dequantizers for types we do not implement (through
`predictor.quant.dequantize`) and the writer (fixtures, imatrix files); tests cross-check this
parser against `gguf.GGUFReader` on well-formed files.

File layout (little-endian; versions 2 and 3):

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  string key | u32 value_type | value
    n_tensors x  string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset
    zero padding up to a multiple of `general.alignment` (default 32)  <- data section starts here
    tensor data, tensor i at data_start + offset_i (each offset a multiple of the alignment)

    string = u64 n_bytes | UTF-8 bytes        array = u32 item_type | u64 count | items
    ne[0] is the row length (numpy shape = reversed ne)

NaN/Inf: every read (`read_tensor`, `read_rows`, `iter_tensors`) checks the float32 it returns and
raises InputFileError naming the file and tensor, because a non-finite weight makes every statistic
meaningless and llama-quantize cannot quantize it. `open_gguf(..., check_finite=False)` turns this off.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np

from predictor.errors import InputFileError, UsageError
from predictor.io.base import MAX_DIMS, MAX_HEADER_BYTES, MAX_TENSORS, ModelMetadata, TensorInfo
from predictor.quant import dequantize
from predictor.quant.types import TYPES_BY_ID, get_type

__all__ = [
    "GGUF_MAGIC",
    "GGUFHeader",
    "GGUFModel",
    "StringArray",
    "is_gguf",
    "open_gguf",
    "read_gguf_header",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_KV = 1_000_000
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminator
MAX_KEY_BYTES = 65_535
_FIXED_HEADER = 24  # magic + version + n_tensors + n_kv
_MIN_KV_BYTES = 14  # u64 key length + 1 key byte + u32 type + 1 value byte
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1 name byte, n_dims, one ne, type, offset
_READ_CHUNK_VALUES = 1 << 22  # dequantize at most ~4M values (16 MiB float32) per step
_FIX_CORRUPT = "the file is corrupt or not a GGUF file; obtain it again"

# GGUF value types: id -> (name, numpy dtype for scalars and arrays). 8 = string, 9 = array.
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<u1"),
    1: ("INT8", "<i1"),
    2: ("UINT16", "<u2"),
    3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"),
    5: ("INT32", "<i4"),
    6: ("FLOAT32", "<f4"),
    7: ("BOOL", "<u1"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<u8"),
    11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# Plain numeric tensor types that predictor.quant does not dequantize: cast directly.
_PLAIN_TENSOR_DTYPES = {"I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "F64": "<f8"}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class StringArray(Sequence[str]):
    """A GGUF array of strings decoded on access, so a 150k-token vocabulary costs 8 bytes an entry.

    Valid while the file it came from is open (the mapping is kept alive by this object)."""

    def __init__(self, buf: mmap.mmap, starts: array):
        self._buf = buf
        self._starts = starts  # offset of each item's u64 length prefix

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        pos = self._starts[i]
        (n,) = _U64.unpack_from(self._buf, pos)
        return bytes(self._buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace")

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


@dataclass
class GGUFHeader:
    """Everything before the tensor data, validated."""

    path: str
    version: int
    kv: dict[str, Any]  # scalars as Python values, numeric arrays as numpy, string arrays as StringArray
    kv_types: dict[str, str]  # GGUF value type per key: "UINT32", "STRING", "ARRAY[STRING]", ...
    tensors: list[TensorInfo]  # file order, numpy shapes, GGML type names, absolute offsets
    alignment: int
    data_offset: int  # absolute offset of the data section
    file_size: int


def write_staged_gguf(writer) -> None:
    """Write a `gguf.GGUFWriter` whose KV pairs and tensors are all added, then close it (also on error)."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic (no other check)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _open_mapping(path: str) -> tuple[mmap.mmap, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _FIXED_HEADER:
                magic = f.read(4)
                if len(magic) == 4 and magic != GGUF_MAGIC:
                    _raise_bad_magic(path, magic)
                raise InputFileError(
                    path,
                    f"file is {size} bytes, too short for a GGUF header ({_FIXED_HEADER} bytes)",
                    "the file is truncated or empty; download or convert it again",
                )
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except FileNotFoundError:
        raise InputFileError(path, "file not found", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a folder, not a GGUF file", "pass the .gguf file itself") from None
    except PermissionError:
        raise InputFileError(path, "permission denied", "make the file readable") from None
    except OSError as e:
        raise InputFileError(path, f"cannot read the file ({e.strerror or e})", "check the path") from None


def _raise_bad_magic(path: str, magic: bytes) -> NoReturn:
    raise InputFileError(
        path,
        f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
        "pass a .gguf file; safetensors models are read by open_model",
    )


class _Cursor:
    """Sequential little-endian reads that check every length against the bytes left."""

    def __init__(self, buf: mmap.mmap, size: int, path: str):
        self.buf = buf
        self.size = size
        self.limit = min(size, MAX_HEADER_BYTES)  # the header may not extend past this
        self.path = path
        self.pos = 0

    def fail(self, problem: str, fix: str = _FIX_CORRUPT) -> NoReturn:
        raise InputFileError(self.path, problem, fix)

    def remaining(self) -> int:
        return self.limit - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.limit - self.pos:
            if self.limit < self.size:
                self.fail(
                    f"GGUF header is larger than the {MAX_HEADER_BYTES // (1 << 20)} MiB cap (at {what})",
                    "metadata this large means the file is corrupt or not a model",
                )
            self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos} but only "
                f"{self.size - self.pos} remain",
                "the file is incomplete; download or convert it again",
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str, max_bytes: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if max_bytes is not None and n > max_bytes:
            self.fail(f"{what} is {n} bytes long, more than the limit of {max_bytes}")
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def name(self, what: str, max_bytes: int) -> str:
        raw = self.raw_string(what, max_bytes)
        if not raw:
            self.fail(f"{what} is empty")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        self.fail(f"{what} is not valid UTF-8 ({raw[:40]!r})")

    def numeric(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        self.need(count * itemsize, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * itemsize
        return out

    def string_array(self, count: int, what: str) -> StringArray:
        # Every item needs at least its 8-byte length, so `count` is bounded by the bytes left.
        self.need(count * 8, what)
        starts = array("Q", bytes(8 * count))
        buf, pos, limit, unpack = self.buf, self.pos, self.limit, _U64.unpack_from
        for i in range(count):
            if pos + 8 > limit:
                self.pos = pos
                self.need(8, f"{what} item {i}")
            starts[i] = pos
            (n,) = unpack(buf, pos)
            if n > limit - pos - 8:
                self.pos = pos + 8
                self.need(n, f"{what} item {i}")
            pos += 8 + n
        self.pos = pos
        return StringArray(buf, starts)


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, str]:
    if vtype == _STRING:
        return cur.raw_string(f"value of {key!r}").decode("utf-8", "replace"), "STRING"
    if vtype == _ARRAY:
        item_type = cur.u32(f"item type of {key!r}")
        if item_type not in _VALUE_TYPES:
            cur.fail(f"key {key!r} is an array of unknown GGUF value type {item_type}")
        if item_type == _ARRAY:
            cur.fail(f"key {key!r} is an array of arrays, which GGUF readers do not accept")
        count = cur.u64(f"length of array {key!r}")
        item_name, dtype = _VALUE_TYPES[item_type]
        if item_type == _STRING:
            return cur.string_array(count, f"array {key!r}"), "ARRAY[STRING]"
        arr = cur.numeric(dtype, count, f"array {key!r}")
        return (arr.astype(bool) if item_type == _BOOL else arr), f"ARRAY[{item_name}]"
    if vtype not in _VALUE_TYPES:
        cur.fail(f"key {key!r} has unknown GGUF value type {vtype}")
    name, dtype = _VALUE_TYPES[vtype]
    v = cur.numeric(dtype, 1, f"value of {key!r}")[0]
    return (bool(v) if vtype == _BOOL else v.item()), name


def _parse_header(buf: mmap.mmap, size: int, path: str) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    cur.need(4, "magic")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        _raise_bad_magic(path, magic)
    cur.pos = 4
    version = cur.u32("version")
    if version and version & 0xFFFF == 0:
        cur.fail(f"version field {version:#x} looks byte-swapped", "big-endian GGUF files are not supported")
    if version not in (2, 3):
        cur.fail(
            f"GGUF version {version} is not supported (only 2 and 3)",
            "convert the model again with a current llama.cpp",
        )
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key-value count")
    for what, n, cap, min_bytes in (
        ("tensor count", n_tensors, MAX_TENSORS, _MIN_TENSOR_INFO_BYTES),
        ("key-value count", n_kv, MAX_KV, _MIN_KV_BYTES),
    ):
        if n > cap:
            cur.fail(f"{what} {n} is above the limit of {cap}")
        if n * min_bytes > cur.remaining():
            cur.fail(f"{what} {n} does not fit in the {size}-byte file (truncated or corrupt)")

    kv: dict[str, Any] = {}
    kv_types: dict[str, str] = {}
    for i in range(n_kv):
        key = cur.name(f"key {i}", MAX_KEY_BYTES)
        if key in kv:
            cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"value type of {key!r}")
        kv[key], kv_types[key] = _read_value(cur, vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        alignment = kv["general.alignment"]
        if kv_types["general.alignment"] != "UINT32" or alignment <= 0 or alignment & (alignment - 1):
            cur.fail(f"general.alignment {alignment!r} is not a power of two stored as UINT32")

    raw = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.name(f"tensor name {i}", MAX_NAME_BYTES)
        if name in seen:
            cur.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.u64(f"dimension {j} of {name!r}") for j in range(n_dims)]
        if min(ne) == 0:
            cur.fail(f"tensor {name!r} has a zero dimension {ne}")
        type_id = cur.u32(f"type of {name!r}")
        gtype = TYPES_BY_ID.get(type_id)
        if gtype is None:
            cur.fail(
                f"tensor {name!r} has unknown GGML type id {type_id}",
                "the file needs a newer reader or is corrupt",
            )
        if ne[0] % gtype.block_size:
            cur.fail(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of "
                f"{gtype.name}'s block size {gtype.block_size}"
            )
        offset = cur.u64(f"data offset of {name!r}")
        if offset % alignment:
            cur.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        n_elements = 1
        for d in ne:
            n_elements *= d
        n_bytes = n_elements // gtype.block_size * gtype.block_bytes
        raw.append((name, tuple(reversed(ne)), gtype.name, offset, n_bytes))

    data_offset = -(-cur.pos // alignment) * alignment
    if raw and data_offset > size:
        cur.fail(
            f"data section would start at {data_offset}, past the end of the {size}-byte file",
            "the file is truncated; download or convert it again",
        )

    tensors = []
    for name, shape, tname, offset, n_bytes in raw:
        start = data_offset + offset
        if start + n_bytes > size:
            cur.fail(
                f"tensor {name!r} data [{start}, {start + n_bytes}) runs past the end of the {size}-byte file",
                "the file is truncated or corrupt; download or convert it again",
            )
        tensors.append(TensorInfo(name, name, shape, tname, path, start, n_bytes))
    by_start = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_start, by_start[1:]):
        if b.offset < a.offset + a.n_bytes:
            cur.fail(f"tensors {a.name!r} and {b.name!r} overlap in the file")
    return GGUFHeader(path, version, kv, kv_types, tensors, alignment, data_offset, size)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate the header only (cheap: no tensor data is touched)."""
    path = os.fspath(path)
    buf, size = _open_mapping(path)
    return _parse_header(buf, size, path)


def _int_value(kv: dict, key: str, path: str, extra: dict) -> int | None:
    """An integer key; per-layer arrays (some architectures) give their maximum and go to `extra`."""
    v = kv.get(key)
    if v is None:
        return None
    if isinstance(v, np.ndarray) and v.size and np.issubdtype(v.dtype, np.integer):
        extra[key] = v.tolist()
        return int(v.max())
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise InputFileError(
        path, f"metadata key {key!r} should be an integer, found {v!r}", "fix the GGUF metadata (gguf-set-metadata)"
    )


def _build_metadata(header: GGUFHeader) -> ModelMetadata:
    kv, path = header.kv, header.path
    extra: dict[str, Any] = {"gguf_version": header.version, "alignment": header.alignment}
    arch = kv.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def arch_int(suffix: str) -> int | None:
        return _int_value(kv, f"{arch}.{suffix}", path, extra) if arch else None

    names = {t.name: t for t in header.tensors}
    n_heads = arch_int("attention.head_count")
    hidden = arch_int("embedding_length")
    n_kv_heads = arch_int("attention.head_count_kv")
    if n_kv_heads is None:
        n_kv_heads = n_heads  # llama.cpp's default when the key is absent
    head_dim = arch_int("attention.key_length")
    if head_dim is None and hidden and n_heads:
        head_dim = hidden // n_heads
    vocab = None
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (StringArray, np.ndarray)):
        vocab = len(tokens)
    if vocab is None:
        vocab = arch_int("vocab_size")
    if vocab is None and "token_embd.weight" in names:
        vocab = names["token_embd.weight"].shape[0]
    for key in ("general.file_type", "general.quantization_version"):
        if isinstance(kv.get(key), int):
            extra[key.split(".", 1)[1]] = kv[key]
    n_used = arch_int("expert_used_count")
    if n_used is not None:
        extra["n_experts_used"] = n_used
    type_counts: dict[str, int] = {}
    for t in header.tensors:
        type_counts[t.dtype] = type_counts.get(t.dtype, 0) + 1
    extra["tensor_type_counts"] = type_counts
    name = kv.get("general.name")
    return ModelMetadata(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        n_layers=arch_int("block_count"),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_size=arch_int("feed_forward_length"),
        vocab_size=vocab,
        tied_embeddings=("output.weight" not in names) if header.tensors else None,
        n_experts=(arch_int("expert_count") or 0) if arch else None,
        n_params=sum(t.n_elements for t in header.tensors),
        context_length=arch_int("context_length"),
        head_dim=head_dim,
        source="gguf",
        extra=extra,
    )


class GGUFModel:
    """A validated, memory-mapped GGUF file (implements predictor.io.base.ModelReader)."""

    def __init__(self, path: str | os.PathLike, *, check_finite: bool = True):
        self.path = os.fspath(path)
        self.check_finite = check_finite
        self._buf, size = _open_mapping(self.path)
        try:
            self.header = _parse_header(self._buf, size, self.path)
        except BaseException:
            self._buf.close()
            raise
        self.kv = self.header.kv
        self.tensors: list[TensorInfo] = self.header.tensors
        self.unmapped: list[str] = []  # GGUF names are already llama.cpp names
        self.metadata = _build_metadata(self.header)
        self._by_name = {t.name: t for t in self.tensors}

    # -- lookup -----------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        t = self._by_name.get(name)
        if t is None:
            raise UsageError(f"{self.path}: no tensor named {name!r} ({len(self.tensors)} tensors in the file)")
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _blocks(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a (rows, row_bytes) view of the mapping (nothing is read yet)."""
        if self._buf is None or self._buf.closed:
            raise UsageError(f"{self.path}: the GGUF file is closed")
        row_bytes = get_type(t.dtype).row_bytes(t.cols)
        flat = np.frombuffer(self._buf, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        return flat.reshape(t.rows, row_bytes)

    def _check_rows(self, t: TensorInfo, rows) -> np.ndarray:
        idx = np.asarray(rows)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise UsageError(f"rows must be a 1-D array of integer row indices, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= t.rows):
            raise UsageError(f"row indices for {t.name} must lie in [0, {t.rows}), got {idx.min()}..{idx.max()}")
        return idx

    # -- raw bytes ----------------------------------------------------------------------------
    def read_raw_rows(self, name: str, rows) -> np.ndarray:
        """The stored bytes of the selected rows, uint8 (len(rows), row_bytes), ggml block layout."""
        t = self.tensor(name)
        return self._blocks(t)[self._check_rows(t, rows)]

    # -- float32 ------------------------------------------------------------------------------
    def _decode(self, t: TensorInfo, raw: np.ndarray, first_row: int, row_ids: np.ndarray | None) -> np.ndarray:
        plain = _PLAIN_TENSOR_DTYPES.get(t.dtype)
        if plain is not None:
            out = np.ascontiguousarray(raw).view(plain).astype(np.float32)
        else:
            out = dequantize(raw, t.dtype, cols=t.cols)
        if self.check_finite and not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
            row = int(row_ids[bad]) if row_ids is not None else first_row + bad
            raise InputFileError(
                self.path,
                f"tensor {t.name} contains NaN or Inf values (first in row {row})",
                "repair or re-export the model; llama-quantize cannot quantize non-finite weights",
            )
        return out

    def _read(self, t: TensorInfo, row_ids: np.ndarray | None) -> np.ndarray:
        blocks = self._blocks(t)
        n = t.rows if row_ids is None else len(row_ids)
        out = np.empty((n, t.cols), dtype=np.float32)
        step = max(1, _READ_CHUNK_VALUES // t.cols)  # bounds the dequantizer's temporaries
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            ids = None if row_ids is None else row_ids[r0:r1]
            raw = blocks[r0:r1] if ids is None else blocks[ids]
            out[r0:r1] = self._decode(t, raw, r0, ids)
        return out

    def read_tensor(self, name: str) -> np.ndarray:
        """Whole tensor as float32 in numpy shape (dequantized if stored quantized)."""
        t = self.tensor(name)
        return self._read(t, None).reshape(t.shape)

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Selected rows of the flattened (rows, cols) view as float32 (len(rows), cols).

        Only the blocks of those rows are read and dequantized (memory ~ len(rows) x cols)."""
        t = self.tensor(name)
        return self._read(t, self._check_rows(t, rows))

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Each tensor as float32, one at a time, in file order."""
        for t in self.tensors:
            yield t, self.read_tensor(t.name)

    def close(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            try:
                buf.close()
            except BufferError:
                pass  # a caller still holds a view (e.g. StringArray); the mapping goes when it does

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({self.path!r}, {len(self.tensors)} tensors, arch={self.metadata.architecture})"


def open_gguf(path: str | os.PathLike, *, check_finite: bool = True) -> GGUFModel:
    """Open a GGUF file: validate the whole header, memory-map the data, read nothing else yet."""
    return GGUFModel(path, check_finite=check_finite)
