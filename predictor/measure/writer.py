"""Write a real quantized GGUF from a base model with our quantizers and llama-quantize's recipes.

The output is what `llama-quantize BASE OUT PRESET [--imatrix F]` writes: every KV pair of the base
is copied (tokenizer included), `general.file_type` is the preset's llama_ftype, tensors keep the
base's order, and each tensor is stored in the type `choose_tensor_types` picks, its bytes made by
`predictor.quant.quantize` (MoE expert tensors are quantized one expert slice at a time, each with
its own imatrix row). Tensors are streamed to disk one at a time, so memory stays bounded by the
largest tensor.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from predictor import quant
from predictor.errors import InputFileError, UnsupportedError, UsageError
from predictor.io.gguf import GGUFModel
from predictor.quant.recipes import RecipeModel, choose_tensor_types
from predictor.quant.types import get_type

__all__ = ["WrittenModel", "open_base_gguf", "plan_tensor_types", "sha256_file", "write_f32_base", "write_gguf"]

FLOAT_TYPES = ("F32", "F16", "BF16")
_FTYPE_ALL_F32 = 0


@dataclass
class WrittenModel:
    path: str
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type written
    n_bytes: int  # tensor data bytes
    n_weights: int
    file_type: int
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(1, self.n_weights)


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_tensor_types(
    base: GGUFModel, preset: str, *, has_imatrix: bool, only: Callable[[str], bool] | None = None
) -> dict[str, str]:
    """Per-tensor GGML types for `preset` on `base` (llama-quantize's choice).

    `only`: an ablation filter — tensors for which it is False keep their base type."""
    specs = [(t.name, t.ne) for t in base.tensors]
    sources = {t.name: t.dtype for t in base.tensors}
    types = choose_tensor_types(
        specs, RecipeModel.from_metadata(base.metadata), preset, has_imatrix=has_imatrix, source_types=sources
    )
    if only is not None:
        types = {n: (t if only(n) else sources[n]) for n, t in types.items()}
    return types


def _kv_type(gguf, type_name: str):
    """('ARRAY[INT32]' | 'UINT32' ...) -> (GGUFValueType, sub_type or None)."""
    if type_name.startswith("ARRAY["):
        sub = type_name[6:-1]
        if sub.startswith("ARRAY"):
            raise UnsupportedError(f"nested GGUF arrays ({type_name}) are not supported by the writer")
        return gguf.GGUFValueType.ARRAY, gguf.GGUFValueType[sub]
    return gguf.GGUFValueType[type_name], None


def _kv_value(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, bytes, int, float, bool)):
        return value
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):  # StringArray
        return [value[i] for i in range(len(value))]
    return value


def _stored_bytes(x: np.ndarray, qtype: str, imat_rows: list[np.ndarray | None]) -> np.ndarray:
    """float32 tensor (numpy shape) -> what to write: float array or uint8 ggml blocks."""
    if qtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    cols = x.shape[-1]
    mats = x.reshape(-1, x.shape[-2], cols) if x.ndim >= 3 else x.reshape(1, -1, cols)
    out = []
    for e, m in enumerate(mats):
        im = imat_rows[e] if e < len(imat_rows) else None
        out.append(quant.quantize(np.ascontiguousarray(m, dtype=np.float32), qtype, imatrix=im))
    q = np.concatenate(out, axis=0) if len(out) > 1 else out[0]
    return q.reshape(*x.shape[:-1], -1)


def write_gguf(
    base: GGUFModel,
    out_path: str | os.PathLike,
    tensor_types: Mapping[str, str],
    *,
    file_type: int,
    imatrix=None,
    extra_kv: Mapping[str, tuple[object, str]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> WrittenModel:
    """Write `base` with each tensor stored as `tensor_types[name]`.

    `imatrix`: a `predictor.io.imatrix.Imatrix`; tensors it has an entry for are quantized with it.
    `cache_dir`: quantized tensors are kept there as .npy keyed by (tensor, type, imatrix), so presets
    that share a tensor's type do not quantize it twice. Written to a temporary name, then renamed."""
    import gguf

    missing = [t.name for t in base.tensors if t.name not in tensor_types]
    if missing:
        raise UsageError(f"no type given for {len(missing)} tensors, e.g. {missing[0]}")
    for t in base.tensors:
        want = get_type(tensor_types[t.name]).name
        if want != t.dtype and want not in FLOAT_TYPES and want not in quant.QUANTIZERS:
            raise UnsupportedError(
                f"{t.name}: writing {want} is not supported (no exact quantizer) — choose another preset"
            )
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    arch = base.metadata.architecture or str(base.kv.get("general.architecture", ""))
    w = gguf.GGUFWriter(os.fspath(tmp), arch)
    w.kv_data[0].clear()
    overridden = {"general.file_type", "general.quantization_version", *(extra_kv or {})}
    for key, value in base.kv.items():
        if key in overridden:
            continue
        vtype, sub = _kv_type(gguf, base.header.kv_types[key])
        w.add_key_value(key, _kv_value(value), vtype, sub)
    w.add_key_value("general.file_type", int(file_type), gguf.GGUFValueType.UINT32)
    if int(file_type) != _FTYPE_ALL_F32 or "general.quantization_version" in base.kv:
        w.add_key_value("general.quantization_version", 2, gguf.GGUFValueType.UINT32)
    for key, (value, type_name) in (extra_kv or {}).items():
        vtype, sub = _kv_type(gguf, type_name)
        w.add_key_value(key, value, vtype, sub)

    imat_tag = "none"
    if imatrix is not None:
        imat_tag = hashlib.sha256(Path(imatrix.path).read_bytes()).hexdigest()[:12]
    written_types: dict[str, str] = {}
    plan = []
    n_bytes = n_weights = 0
    for t in base.tensors:
        qt = get_type(tensor_types[t.name]).name
        nb = get_type(qt).tensor_bytes(t.n_elements, t.cols)
        plan.append((t, qt, nb))
        written_types[t.name] = qt
        n_bytes += nb
        n_weights += t.n_elements
        gtype = gguf.GGMLQuantizationType[qt]
        # element shape + raw_dtype: the writer records the GGML type without converting the shape
        w.add_tensor_info(t.name, list(t.shape), np.dtype(np.float16 if qt == "F16" else np.float32), nb,
                          raw_dtype=None if qt in ("F32", "F16") else gtype)
    w.open_output_file()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for i, (t, qt, nb) in enumerate(plan):
            if progress:
                progress(i, len(plan), t.name)
            data = _tensor_data(base, t, qt, imatrix, imat_tag, cache_dir)
            if data.nbytes != nb:
                raise AssertionError(f"{t.name}: {data.nbytes} bytes, expected {nb}")
            w.write_tensor_data(data)
    finally:
        w.close()
    os.replace(tmp, out_path)
    counts: dict[str, int] = {}
    for qt in written_types.values():
        counts[qt] = counts.get(qt, 0) + 1
    return WrittenModel(os.fspath(out_path), written_types, n_bytes, n_weights, int(file_type), counts)


def _tensor_data(base: GGUFModel, t, qt: str, imatrix, imat_tag: str, cache_dir) -> np.ndarray:
    use_imat = imatrix is not None and t.name in imatrix and qt not in FLOAT_TYPES
    cache = None
    if cache_dir is not None and qt not in FLOAT_TYPES:
        key = f"{t.name}.{qt}.{imat_tag if use_imat else 'none'}.npy"
        cache = Path(cache_dir) / key
        if cache.exists():
            return np.load(cache)
    x = base.read_tensor(t.name)
    imat_rows: list[np.ndarray | None] = [None]
    if use_imat:
        n_mat = t.shape[-3] if len(t.shape) >= 3 else 1
        imat_rows = [np.ascontiguousarray(imatrix.vector(t.name, e, cols=t.cols), dtype=np.float32) for e in range(n_mat)]
    data = _stored_bytes(x, qt, imat_rows)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npy")
        np.save(tmp, data)
        os.replace(tmp, cache)
    return data


def write_f32_base(source: GGUFModel, out_path: str | os.PathLike, *, progress=None) -> WrittenModel:
    """The reference model: every tensor dequantized to F32 (what the quantized files are made from)."""
    types = {t.name: "F32" for t in source.tensors}
    return write_gguf(source, out_path, types, file_type=_FTYPE_ALL_F32, progress=progress)


def open_base_gguf(path: str | os.PathLike) -> GGUFModel:
    from predictor.io.gguf import is_gguf, open_gguf

    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputFileError(p, "file not found", "check the path")
    if os.path.isdir(p) or not is_gguf(p):
        raise InputFileError(
            p, "is not a GGUF file; measure runs models with llama.cpp, which needs GGUF",
            "convert it first (llama.cpp's convert_hf_to_gguf.py --outtype f32 or f16) and pass the .gguf",
        )
    return open_gguf(p)
