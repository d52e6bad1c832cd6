"""Exact tensor-data sizes of a model under each llama-quantize preset.

Bytes are what `llama-quantize --dry-run` adds up: rows × row bytes for each tensor's chosen type
(GGUF header and alignment padding not included). Bits per weight = 8 · bytes / elements over all
tensors, norms and other unquantized tensors included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from predictor.errors import UnsupportedError, UsageError
from predictor.quant.recipes import (
    PRESETS,
    RecipeModel,
    choose_tensor_types,
    get_preset,
    requires_imatrix,
)
from predictor.quant.types import get_type


def tensor_bytes(type_name: str, ne: Sequence[int]) -> int:
    """Bytes of one tensor of ggml shape `ne` (ne[0] = row length) stored as `type_name`."""
    ne = [int(d) for d in ne]
    if not ne or any(d < 1 for d in ne):
        raise UsageError(f"tensor shape ne={ne} must have positive dimensions")
    n_rows = 1
    for d in ne[1:]:
        n_rows *= d
    return n_rows * get_type(type_name).row_bytes(ne[0])


def n_elements(ne: Sequence[int]) -> int:
    n = 1
    for d in ne:
        n *= int(d)
    return n


@dataclass
class PresetSize:
    """Size of a model under one preset."""

    preset: str
    tensor_bytes: int  # all tensor data, unquantized tensors included
    n_weights: int  # elements of all tensors
    bits_per_weight: float  # 8 * tensor_bytes / n_weights
    bytes_by_type: dict[str, int]  # GGML type -> bytes
    tensor_types: dict[str, str]  # every tensor -> GGML type, llama-quantize's processing order
    needs_imatrix: bool  # llama-quantize refuses this preset without --imatrix

    @property
    def gib(self) -> float:
        return self.tensor_bytes / 2**30


def preset_size(
    tensors: Sequence[tuple[str, Sequence[int]]],
    model: RecipeModel,
    preset: str,
    *,
    has_imatrix: bool,
    source_types: Mapping[str, str] | None = None,
) -> PresetSize:
    """Exact tensor bytes and bits per weight of `tensors` quantized with `preset`."""
    p = get_preset(preset)
    types = choose_tensor_types(tensors, model, p, has_imatrix=has_imatrix, source_types=source_types)
    shapes = {name: list(ne) for name, ne in tensors}
    total = 0
    n_weights = 0
    by_type: dict[str, int] = {}
    for name, t in types.items():
        b = tensor_bytes(t, shapes[name])
        total += b
        n_weights += n_elements(shapes[name])
        by_type[t] = by_type.get(t, 0) + b
    return PresetSize(
        preset=p.name,
        tensor_bytes=total,
        n_weights=n_weights,
        bits_per_weight=8.0 * total / n_weights if n_weights else 0.0,
        bytes_by_type=by_type,
        tensor_types=types,
        needs_imatrix=requires_imatrix(p, types),
    )


def preset_sizes(
    tensors: Sequence[tuple[str, Sequence[int]]],
    model: RecipeModel,
    presets: Sequence[str] | None = None,
    *,
    has_imatrix: bool,
    source_types: Mapping[str, str] | None = None,
) -> tuple[dict[str, PresetSize], dict[str, str]]:
    """Sizes for several presets (default: all). Returns (sizes, refused) where `refused` maps
    each preset llama-quantize would refuse for this model to the reason."""
    sizes: dict[str, PresetSize] = {}
    refused: dict[str, str] = {}
    for name in presets if presets is not None else PRESETS:
        try:
            size = preset_size(tensors, model, name, has_imatrix=has_imatrix, source_types=source_types)
        except UnsupportedError as e:
            refused[get_preset(name).name] = str(e)
            continue
        sizes[size.preset] = size
    return sizes, refused
