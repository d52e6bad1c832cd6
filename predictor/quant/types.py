"""Registry of GGML tensor types: block size, bytes per block, bits per weight.

Numbers are ggml's type traits (see tests/data/reference/PROVENANCE.md). Names follow the gguf
enum (`Q4_K`, `IQ4_XS`); lookups accept any case (`q4_K` as llama-quantize prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

from predictor.errors import UsageError


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: int
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_size:
            raise UsageError(
                f"row length {cols} is not a multiple of {self.name}'s block size {self.block_size}"
            )
        return cols // self.block_size * self.block_bytes

    def tensor_bytes(self, n_elements: int, cols: int) -> int:
        return n_elements // cols * self.row_bytes(cols)


_TABLE = [
    # name, ggml id, block, bytes
    ("F32", 0, 1, 4),
    ("F16", 1, 1, 2),
    ("Q4_0", 2, 32, 18),
    ("Q4_1", 3, 32, 20),
    ("Q5_0", 6, 32, 22),
    ("Q5_1", 7, 32, 24),
    ("Q8_0", 8, 32, 34),
    ("Q8_1", 9, 32, 36),
    ("Q2_K", 10, 256, 84),
    ("Q3_K", 11, 256, 110),
    ("Q4_K", 12, 256, 144),
    ("Q5_K", 13, 256, 176),
    ("Q6_K", 14, 256, 210),
    ("Q8_K", 15, 256, 292),
    ("IQ2_XXS", 16, 256, 66),
    ("IQ2_XS", 17, 256, 74),
    ("IQ3_XXS", 18, 256, 98),
    ("IQ1_S", 19, 256, 50),
    ("IQ4_NL", 20, 32, 18),
    ("IQ3_S", 21, 256, 110),
    ("IQ2_S", 22, 256, 82),
    ("IQ4_XS", 23, 256, 136),
    ("I8", 24, 1, 1),
    ("I16", 25, 1, 2),
    ("I32", 26, 1, 4),
    ("I64", 27, 1, 8),
    ("F64", 28, 1, 8),
    ("IQ1_M", 29, 256, 56),
    ("BF16", 30, 1, 2),
    ("TQ1_0", 34, 256, 54),
    ("TQ2_0", 35, 256, 66),
    ("MXFP4", 39, 32, 17),
    ("NVFP4", 40, 64, 36),
    ("Q1_0", 41, 128, 18),
    ("Q2_0", 42, 64, 18),
]

TYPES: dict[str, GGMLType] = {name: GGMLType(name, i, b, n) for name, i, b, n in _TABLE}
TYPES_BY_ID: dict[int, GGMLType] = {t.type_id: t for t in TYPES.values()}
_BY_UPPER = {name.upper(): t for name, t in TYPES.items()}


def get_type(name: str | int) -> GGMLType:
    """Look up a GGML type by name (any case) or numeric id."""
    if isinstance(name, int):
        try:
            return TYPES_BY_ID[name]
        except KeyError:
            raise UsageError(f"unknown GGML type id {name}") from None
    t = _BY_UPPER.get(str(name).upper())
    if t is None:
        raise UsageError(f"unknown GGML type {name!r}; known: {', '.join(TYPES)}")
    return t
