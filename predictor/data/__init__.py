"""Training data: the curated published measurements, the model registry, and ingestion of new results.

    from predictor.data import load_training_data
    td = load_training_data()          # training_data/ of this repository
    td.measurements, td.distortion, td.registry, td.excluded   # polars frames, validated

The schemas (one comment per column) are in `predictor.schema`; training_data/README.md shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from predictor.data.registry import ModelMatch, identify_model, resolve_model
from predictor.data.store import TABLE_FILES, read_table, validate_frame
from predictor.errors import InputFileError

ENV_VAR = "QUANTPREDICT_TRAINING_DATA"


@dataclass(frozen=True)
class TrainingData:
    measurements: pl.DataFrame  # one row per (model, quant, imatrix, task, metric, n-shot, source)
    distortion: pl.DataFrame  # PPL / KLD / Δp rows; join measurements on (model, quant, imatrix)
    registry: pl.DataFrame  # architecture facts and training tokens per model, with citations
    excluded: pl.DataFrame  # raw published rows left out, with the reason
    directory: Path


def default_training_dir() -> Path:
    """$QUANTPREDICT_TRAINING_DATA if set, else training_data/ of the repository this package lives in."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "training_data"


def load_training_data(dir: str | os.PathLike | None = None) -> TrainingData:
    """Load and validate every table of a training-data directory.

    Raises SchemaError naming missing/extra columns or bad values, InputFileError if a table is absent.
    """
    directory = Path(dir) if dir is not None else default_training_dir()
    if not directory.is_dir():
        raise InputFileError(directory, "is not a training-data directory",
                             f"pass the training_data folder or set {ENV_VAR}")
    frames = {name: read_table(directory / fname, name) for name, fname in TABLE_FILES.items()}
    return TrainingData(frames["measurements"], frames["distortion"], frames["registry"], frames["excluded"], directory)


__all__ = [
    "ENV_VAR",
    "ModelMatch",
    "TrainingData",
    "default_training_dir",
    "identify_model",
    "load_training_data",
    "read_table",
    "resolve_model",
    "validate_frame",
]
