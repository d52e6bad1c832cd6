"""Small exception tree. Every error a user can cause is a QuantPredictError whose str() is one line:
what file, what is wrong, what to do. Each class is also a builtin so callers can catch broadly."""

from __future__ import annotations

import os


class QuantPredictError(Exception):
    """Base of every error raised on purpose by quantpredict."""


class InputFileError(QuantPredictError, ValueError):
    """A file is malformed, truncated, hostile or of an unsupported kind."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str = ""):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        tail = f" — {fix}" if fix else ""
        super().__init__(f"{where}{problem}{tail}")


class UnsupportedError(QuantPredictError, NotImplementedError):
    """A valid request that quantpredict does not support (yet)."""


class MismatchError(QuantPredictError, ValueError):
    """Two inputs do not fit together (e.g. an imatrix made for another model)."""


class SchemaError(QuantPredictError, ValueError):
    """A table does not have the documented columns or types."""


class UsageError(QuantPredictError, ValueError):
    """A bad argument value (unknown preset, unknown task, ...)."""
