"""Reading, validating and atomically writing the CSV tables of a training-data directory.

Every read goes through `validate_frame`, which names missing/extra columns, unparsable values and
values outside the allowed set, so a hand-edited CSV fails loudly instead of training on garbage.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl

from predictor.errors import InputFileError, SchemaError
from predictor.schema import ENUMS, NOT_NULL, SCHEMAS

# A curated table is a few MB; anything far larger is not one of ours.
MAX_TABLE_BYTES = 256 * 1024 * 1024

TABLE_FILES = {name: f"{name}.csv" for name in SCHEMAS}


def _check_columns(columns: list[str], table: str, where: str) -> None:
    expected = list(SCHEMAS[table].names())
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if missing or extra or dupes:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"extra columns {extra}")
        if dupes:
            parts.append(f"duplicate columns {dupes}")
        raise SchemaError(
            f"{where}: {table} table has {'; '.join(parts)} — the columns must be exactly those documented "
            f"in predictor/schema.py (training_data/README.md)"
        )


def _cast_column(s: pl.Series, dtype, table: str, where: str) -> pl.Series:
    """String column -> typed column; the first bad value is named in the error."""
    if dtype == pl.String:
        return s
    if dtype == pl.Boolean:
        low = s.str.strip_chars().str.to_lowercase()
        bad = ~(low.is_in(["true", "false"]) | low.is_null() | (low == ""))
        if bad.any():
            idx = int(bad.arg_max())
            raise SchemaError(f"{where}: {table}.{s.name} row {idx + 1}: {s[idx]!r} is not true/false — fix the value")
        return pl.Series(s.name, [None if v in (None, "") else v == "true" for v in low.to_list()], dtype=pl.Boolean)
    stripped = s.str.strip_chars()
    stripped = pl.Series(s.name, [None if v == "" else v for v in stripped.to_list()], dtype=pl.String)
    cast = stripped.cast(dtype, strict=False)
    bad = cast.is_null() & stripped.is_not_null()
    if bad.any():
        idx = int(bad.arg_max())
        raise SchemaError(
            f"{where}: {table}.{s.name} row {idx + 1}: {s[idx]!r} is not a valid {dtype} — fix the value"
        )
    return cast


def validate_frame(df: pl.DataFrame, table: str, where: str = "<frame>") -> pl.DataFrame:
    """Check a frame against the documented schema and return it with the documented dtypes.

    Accepts frames whose columns are strings (as read from CSV) or already typed. Raises SchemaError
    naming missing/extra columns, the first unparsable value, nulls in required columns and values
    outside the allowed set.
    """
    if table not in SCHEMAS:
        raise SchemaError(f"unknown table {table!r} — expected one of {sorted(SCHEMAS)}")
    _check_columns(list(df.columns), table, where)
    schema = SCHEMAS[table]
    cols = []
    for name, dtype in schema.items():
        s = df.get_column(name)
        if s.dtype == dtype:
            cols.append(s)
        elif s.dtype in (pl.String, pl.Null):
            cols.append(_cast_column(s.cast(pl.String), dtype, table, where))
        else:
            try:
                cols.append(s.cast(dtype, strict=True))
            except Exception as exc:  # polars raises several exception types for a failed cast
                raise SchemaError(f"{where}: {table}.{name} has type {s.dtype}, expected {dtype} ({exc})") from None
    out = pl.DataFrame(cols, schema=schema)
    for name in NOT_NULL[table]:
        s = out.get_column(name)
        if s.null_count():
            idx = int(s.is_null().arg_max())
            raise SchemaError(f"{where}: {table}.{name} is empty on row {idx + 1} — this column is required")
    for name, allowed in ENUMS[table].items():
        s = out.get_column(name).drop_nulls()
        bad = sorted(set(s.to_list()) - set(allowed))
        if bad:
            raise SchemaError(f"{where}: {table}.{name} has values {bad} — allowed: {list(allowed)}")
    if "row_id" in out.columns:
        dup = out.get_column("row_id").is_duplicated()
        if dup.any():
            idx = int(dup.arg_max())
            raise SchemaError(
                f"{where}: {table}.row_id {out['row_id'][idx]!r} occurs more than once — rows must be unique"
            )
    return out


def empty_table(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[table])


def read_capped_bytes(path: Path, max_bytes: int, what: str, fix: str) -> bytes:
    """The bytes of a result file, refusing (one line, before reading) anything over `max_bytes`."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror})", "check the path") from None
    if size > max_bytes:
        raise InputFileError(path, f"{size} bytes is too large for {what}", fix)
    return path.read_bytes()


def read_table(path: str | os.PathLike, table: str) -> pl.DataFrame:
    """Read one CSV table and validate it. Every column is read as text first, then cast, so a bad
    value is reported by column and row instead of as a polars parse error."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputFileError(path, f"cannot read the {table} table ({exc.strerror})",
                             "run `python -m predictor.data.curate` to rebuild training_data/") from None
    if size > MAX_TABLE_BYTES:
        raise InputFileError(path, f"{size} bytes is more than a {table} table can be ({MAX_TABLE_BYTES})",
                             "point at the training_data directory")
    if size == 0:
        raise SchemaError(f"{path}: {table} table is empty (no header) — the columns must be those documented in predictor/schema.py")
    try:
        df = pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # polars' CSV errors are not a stable hierarchy
        raise InputFileError(path, f"not a readable CSV ({str(exc).splitlines()[0]})", "fix or regenerate the file") from None
    return validate_frame(df, table, str(path))


def to_csv_frame(df: pl.DataFrame) -> pl.DataFrame:
    """Booleans as lowercase text so the CSV round-trips through `read_table` unchanged."""
    return df.with_columns(
        [pl.col(c).cast(pl.String).str.to_lowercase() for c, t in df.schema.items() if t == pl.Boolean]
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tables_atomic(directory: str | os.PathLike, frames: dict[str, pl.DataFrame]) -> list[Path]:
    """Validate, then write every table to a temporary file in `directory`, then rename them all into
    place. Nothing is renamed unless every table validated and was written completely."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checked = {name: validate_frame(df, name, f"{directory}/{TABLE_FILES[name]}") for name, df in frames.items()}
    temps: list[tuple[Path, Path]] = []
    try:
        for name, df in checked.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".csv.tmp", dir=directory)
            os.close(fd)
            temps.append((Path(tmp), directory / TABLE_FILES[name]))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; tables are ordinary files
            to_csv_frame(df).write_csv(tmp)
        for tmp, final in temps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()
    return [final for _, final in temps]
