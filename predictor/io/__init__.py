"""Model readers. `open_model(path)` picks the reader from the file's first bytes, not its extension:

- GGUF file (magic b"GGUF")                         -> predictor.io.gguf.open_gguf
- safetensors file (u64 header length, then b"{")   -> SafetensorsReader
- model.safetensors.index.json (JSON + weight_map)  -> SafetensorsReader over the shards
- config.json (JSON with model_type/architectures)  -> ConfigOnlyReader (metadata, no tensors)
- a folder: index / model.safetensors / *.safetensors, else a single *.gguf, else config.json alone

A file whose bytes match nothing but whose name ends in .safetensors goes to the safetensors parser, only
so that the error says precisely what is broken (truncated, bad header length, ...).
Every reader is cheap to open (headers only) and a context manager.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from predictor.errors import InputFileError
from predictor.io.base import MAX_HEADER_BYTES, ModelMetadata, ModelReader, TensorInfo
from predictor.io.hf import (
    ConfigOnlyReader,
    map_tensor_names,
    parse_json_object,
    read_hf_config,
)
from predictor.io.safetensors import (
    INDEX_NAME,
    SafetensorsReader,
    open_safetensors,
    open_safetensors_index,
    read_header,
)

ACCEPTED = ("a GGUF file, a .safetensors file, a model.safetensors.index.json, a config.json, "
            "or a Hugging Face model folder")
_CONFIG_KEYS = ("model_type", "architectures", "text_config", "hidden_size")


def _sniff_file(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
    except OSError as e:
        raise InputFileError(p, f"cannot read the file ({e.strerror or e})",
                             "check the path and its permissions") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:  # ASCII JSON read as a u64 would be far larger than any file
            return "safetensors"
    if head.lstrip()[:1] == b"{":
        if size > MAX_HEADER_BYTES:
            raise InputFileError(p, f"is a {size}-byte JSON file, over the {MAX_HEADER_BYTES}-byte "
                                    "limit", f"expected {ACCEPTED}")
        obj = parse_json_object(p.read_bytes(), p, "JSON file")
        if "weight_map" in obj:
            return "safetensors-index"
        if any(k in obj for k in _CONFIG_KEYS):
            return "hf-config"
        raise InputFileError(p, "is JSON but neither a safetensors index (weight_map) nor a "
                                "Hugging Face config.json (model_type)", f"expected {ACCEPTED}")
    if head[8:9] == b"{" or p.suffix == ".safetensors":
        return "safetensors"  # broken safetensors: let its parser say precisely what is wrong
    if head[:4] in (b"PK\x03\x04",) or head[:2] == b"\x80\x02":
        raise InputFileError(p, "looks like a PyTorch pickle/zip checkpoint, which is not supported",
                             "use the model's .safetensors files or a GGUF")
    raise InputFileError(p, f"is not a recognised model file (starts with {head[:8]!r})",
                         f"expected {ACCEPTED}")


def _sniff_folder(p: Path) -> tuple[str, Path]:
    if (p / INDEX_NAME).is_file() or any(f.is_file() for f in p.glob("*.safetensors")):
        return "safetensors-folder", p
    ggufs = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(f.name for f in ggufs[:5])
        raise InputFileError(p, f"holds {len(ggufs)} GGUF files ({names})", "pass one of them")
    if (p / "config.json").is_file():
        return "hf-config", p / "config.json"
    if any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth")):
        raise InputFileError(p, "holds only PyTorch .bin/.pt weights, which are not supported",
                             "download the .safetensors version of the model")
    raise InputFileError(p, "holds no model files", f"expected {ACCEPTED}")


def detect_format(path: str | os.PathLike) -> str:
    """'gguf', 'safetensors', 'safetensors-index', 'safetensors-folder' or 'hf-config'."""
    p = Path(path)
    if p.is_dir():
        return _sniff_folder(p)[0]
    if not p.exists():
        raise InputFileError(p, "does not exist", f"check the path; expected {ACCEPTED}")
    return _sniff_file(p)


def open_model(path: str | os.PathLike, *, check_finite: bool = True) -> ModelReader:
    """Open any supported model input (headers only; tensors are read lazily)."""
    p = Path(path)
    if p.is_dir():
        kind, target = _sniff_folder(p)
    elif not p.exists():
        raise InputFileError(p, "does not exist", f"check the path; expected {ACCEPTED}")
    else:
        kind, target = _sniff_file(p), p
    if kind == "gguf":
        from predictor.io.gguf import open_gguf  # lazy: only GGUF input needs the gguf package

        return open_gguf(target, check_finite=check_finite)
    if kind == "safetensors-folder":
        return open_safetensors(target, check_finite=check_finite)
    if kind == "safetensors":
        return open_safetensors(target, check_finite=check_finite)
    if kind == "safetensors-index":
        return open_safetensors_index(target, check_finite=check_finite)
    return ConfigOnlyReader(target)


def read_model_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Model facts from headers/config only (cheap: no tensor data is read)."""
    reader = open_model(path)
    try:
        return reader.metadata
    finally:
        reader.close()


__all__ = [
    "ConfigOnlyReader",
    "ModelMetadata",
    "ModelReader",
    "SafetensorsReader",
    "TensorInfo",
    "detect_format",
    "map_tensor_names",
    "open_model",
    "open_safetensors",
    "read_header",
    "read_hf_config",
    "read_model_metadata",
]
