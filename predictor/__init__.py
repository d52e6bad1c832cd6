"""quantpredict: predict llama.cpp quantization damage from a model's weights, without running it."""

from predictor.errors import (
    InputFileError,
    MismatchError,
    QuantPredictError,
    SchemaError,
    UnsupportedError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "InputFileError",
    "MismatchError",
    "QuantPredictError",
    "SchemaError",
    "UnsupportedError",
    "UsageError",
    "__version__",
]
