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


def __getattr__(name: str):
    # predictor.predict / predictor.load_model without importing LightGBM on `import predictor`
    if name in ("predict", "load_model"):
        import predictor.model as _model

        return getattr(_model, name)
    raise AttributeError(f"module 'predictor' has no attribute {name!r}")


__all__ = [
    "InputFileError",
    "MismatchError",
    "QuantPredictError",
    "SchemaError",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "load_model",
    "predict",
]
