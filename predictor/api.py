"""Public entry points: what the CLI and other tools call."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from predictor import quant
from predictor.errors import InputFileError
from predictor.features.weight_error import (
    DEFAULT_SAMPLE_WEIGHTS,
    FLOAT_TYPES,
    sample_model,
    summarize_preset,
)
from predictor.io import open_model
from predictor.io.imatrix import read_imatrix
from predictor.quant.recipes import (
    STANDARD_PRESETS,
    RecipeModel,
    choose_tensor_types,
    get_preset,
    is_quantizable,
)
from predictor.quant.sizes import preset_size

GIB = 1024**3


@dataclass
class PresetReport:
    preset: str
    tensor_bytes: int
    bits_per_weight: float
    tensor_types: dict[str, str]
    type_counts: dict[str, int]
    errors: dict | None  # overall / by_role / by_depth ErrorSummary, None if not computable
    note: str = ""

    def as_dict(self) -> dict:
        d = {
            "preset": self.preset,
            "tensor_bytes": self.tensor_bytes,
            "gib": self.tensor_bytes / GIB,
            "bits_per_weight": self.bits_per_weight,
            "tensor_types": self.tensor_types,
            "type_counts": self.type_counts,
            "note": self.note,
        }
        if self.errors and self.errors["overall"] is not None:
            d.update(self.errors["overall"].as_dict())
            d["by_role"] = {k: v.as_dict() for k, v in self.errors["by_role"].items() if v}
            d["by_depth"] = {k: v.as_dict() for k, v in self.errors["by_depth"].items() if v}
        else:
            d.update({"rel_rmse": None, "rel_rmse_se": None, "weighted_rel_rmse": None})
        return d


@dataclass
class InspectReport:
    model: dict
    imatrix: str | None
    exact: bool
    sample_weights: int | None
    seed: int
    seconds: float
    presets: list[PresetReport]
    tensor_stats: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "imatrix": self.imatrix,
            "sampling": {
                "exact": self.exact,
                "sample_weights_per_tensor": self.sample_weights,
                "seed": self.seed,
            },
            "seconds": self.seconds,
            "presets": [p.as_dict() for p in self.presets],
            "tensor_stats": self.tensor_stats,
        }


def inspect_model(
    path: str | os.PathLike,
    *,
    imatrix: str | os.PathLike | None = None,
    presets: list[str] | None = None,
    exact: bool = False,
    sample_weights: int = DEFAULT_SAMPLE_WEIGHTS,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> InspectReport:
    """Sizes, per-tensor GGML types and simulated weight error of each preset for one model."""
    t0 = time.perf_counter()
    preset_names = [get_preset(p).name for p in (presets or STANDARD_PRESETS)]
    with open_model(path) as reader:
        if not reader.tensors:
            raise InputFileError(
                path, "holds no tensors (config only)", "inspect needs weights: pass a safetensors or GGUF model"
            )
        imat = None
        if imatrix is not None:
            imat = read_imatrix(imatrix)
            imat.check_against(reader.tensors)
        meta = reader.metadata
        recipe_model = RecipeModel.from_metadata(meta)
        specs = [(t.name, t.ne) for t in reader.tensors]
        source_types = {t.name: t.dtype for t in reader.tensors}
        has_imatrix = imat is not None

        plans = {}
        for p in preset_names:
            types = choose_tensor_types(specs, recipe_model, p, has_imatrix=has_imatrix, source_types=source_types)
            plans[p] = (types, preset_size(specs, recipe_model, p, has_imatrix=has_imatrix, source_types=source_types))

        supported = set(quant.supported_types())
        wanted: dict[str, set[str]] = {}
        for types, _ in plans.values():
            for name, t in types.items():
                if t != source_types[name] and t in supported:
                    wanted.setdefault(name, set()).add(t)
        # Norms, biases, routers ... are never quantized; every other tensor is sampled once.
        sampled = [t for t in reader.tensors if is_quantizable(t.name, t.ne)]
        samples = sample_model(
            reader,
            sampled,
            wanted,
            imatrix=imat,
            sample_weights=None if exact else sample_weights,
            seed=seed,
            progress=progress,
        )
        reports = []
        for p in preset_names:
            types, size = plans[p]
            unsupported = sorted(
                {t for n, t in types.items() if t != source_types[n] and t not in supported and t not in FLOAT_TYPES}
            )
            errors, note = None, ""
            if unsupported:
                note = f"weight error not computed: no exact quantizer for {', '.join(unsupported)}"
            else:
                errors = summarize_preset(samples, types, meta.n_layers)
            counts: dict[str, int] = {}
            for t in types.values():
                counts[t] = counts.get(t, 0) + 1
            reports.append(
                PresetReport(
                    preset=p,
                    tensor_bytes=size.tensor_bytes,
                    bits_per_weight=size.bits_per_weight,
                    tensor_types=types,
                    type_counts=counts,
                    errors=errors,
                    note=note,
                )
            )
        model = meta.as_dict()
        model.update(
            {
                "path": os.fspath(path),
                "n_tensors": len(reader.tensors),
                "source_types": _count(source_types.values()),
                "unmapped_tensors": list(reader.unmapped),
            }
        )
        stats = [
            {"tensor": s.info.name, "role": s.role, "layer": s.layer, "rows_sampled": len(s.rows),
             "rows_total": s.rows_total, **s.stats}
            for s in samples
        ]
    return InspectReport(
        model=model,
        imatrix=None if imatrix is None else os.fspath(imatrix),
        exact=exact,
        sample_weights=None if exact else sample_weights,
        seed=seed,
        seconds=time.perf_counter() - t0,
        presets=reports,
        tensor_stats=stats,
    )


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
