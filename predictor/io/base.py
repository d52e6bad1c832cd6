"""Shared shapes of what every model reader returns.

A reader is opened cheaply (headers only, memory-mapped data) and converts tensor data to float32
only when asked, one tensor (or a few rows of one) at a time, so memory stays bounded by the largest
tensor, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

# Hard caps that keep hostile files from making us allocate without bound.
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors JSON header / GGUF metadata
MAX_TENSORS = 1_000_000
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored. `shape` is numpy order: (..., rows, cols), cols = ggml ne[0]."""

    name: str  # GGUF-style name (blk.3.attn_v.weight); mapped from HF names for safetensors
    source_name: str  # the name inside the file
    shape: tuple[int, ...]
    dtype: str  # GGML type name: F32, F16, BF16, Q4_K, ...
    file: str
    offset: int  # absolute byte offset of the data in `file`
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Number of rows of length `cols` (all leading dims flattened, experts included)."""
        return self.n_elements // self.shape[-1] if self.shape else 1

    @property
    def ne(self) -> list[int]:
        """ggml dimension order (ne[0] = row length)."""
        return list(reversed(self.shape))


@dataclass
class ModelMetadata:
    """Architecture facts from config.json or GGUF keys. None = unknown."""

    architecture: str | None = None  # llama, qwen2, gemma3, phi3, ... (GGUF arch names)
    name: str | None = None
    n_layers: int | None = None
    hidden_size: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_size: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool | None = None
    n_experts: int | None = None
    n_params: int | None = None  # counted from tensors when they are known, else estimated
    context_length: int | None = None
    head_dim: int | None = None
    source: str = ""  # "config.json", "gguf", ...
    extra: dict = field(default_factory=dict)

    @property
    def n_gqa(self) -> int | None:
        if self.n_heads and self.n_kv_heads:
            return self.n_heads // self.n_kv_heads
        return None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["n_gqa"] = self.n_gqa
        return d


class ModelReader(Protocol):
    """What `predictor.io.open_model` returns (safetensors file/shards/folder, GGUF, config only)."""

    path: str
    metadata: ModelMetadata
    tensors: list[TensorInfo]  # in file order; GGUF names
    unmapped: list[str]  # source names that could not be mapped to GGUF names (reported, kept)

    def read_tensor(self, name: str) -> np.ndarray:
        """Whole tensor as float32 in numpy shape (dequantized if stored quantized)."""

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Selected rows (indices into the flattened (rows, cols) view) as float32 (len(rows), cols)."""

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Each tensor as float32, one at a time."""

    def close(self) -> None: ...
