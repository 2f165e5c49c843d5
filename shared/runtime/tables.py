"""Reading columns of CSV and Parquet files into numpy arrays, refusing bad values by name.

Three kinds of column are read (:data:`Kind`): ``number`` (features, channels, regression
targets: float64), ``label`` (class labels: int64 ``>= 0``, or names looked up in a list) and
``time`` (timestamps, for ordering rows: numbers, ISO 8601 text, or Parquet timestamps, as
float seconds). A missing column, a value that is not a number (with its line or row and
column), an empty cell, NaN or infinity, and more rows than ``max_rows`` are
:class:`~shared.runtime.data.DataFormatError`, never a silent skip.

CSV uses the standard library (a header row, then one row per reading; only the wanted
columns are converted, row by row, so memory is that of the result). Parquet uses pyarrow,
the ``sensors`` extra (``pip install 'fedmq[sensors]'``); without it, a Parquet file is refused
with an error naming the extra.
"""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.runtime.data import DataFormatError

Kind = Literal["number", "label", "time"]
TABLE_SUFFIXES = (".csv", ".parquet")
PARQUET_EXTRA = "pyarrow is needed to read Parquet files: pip install 'fedmq[sensors]'"


class TooManyRows(DataFormatError):
    """A file holds more rows than the reader may take (``max_rows``)."""


def is_table(path: Path) -> bool:
    """True when ``path`` names a CSV or Parquet file (by its suffix)."""
    return path.suffix.lower() in TABLE_SUFFIXES


def header_of(path: Path) -> list[str]:
    """The column names of a CSV or Parquet file, in file order."""
    if path.suffix.lower() == ".parquet":
        return list(_parquet_file(path).schema_arrow.names)
    with _open_csv(path) as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataFormatError(f"{path}: empty CSV file (a header row is required)")
    return [name.strip() for name in header]


def read_columns(
    path: Path, wanted: Mapping[str, Kind], *, label_names: Sequence[str] = (), max_rows: int
) -> dict[str, np.ndarray]:
    """The ``wanted`` columns of ``path``: name → array (float64, int64 labels, float64 times).

    ``label_names``: class names a ``label`` column may hold (a name's class is its index);
    empty: labels are integers.
    """
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, wanted, label_names, max_rows)
    return _read_csv(path, wanted, label_names, max_rows)


# --- CSV ---------------------------------------------------------------------------------
def _open_csv(path: Path) -> Any:
    try:
        return open(path, newline="", encoding="utf-8")  # the callers close it (`with`)
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc})") from exc


def _read_csv(
    path: Path, wanted: Mapping[str, Kind], label_names: Sequence[str], max_rows: int
) -> dict[str, np.ndarray]:
    names = {name: i for i, name in enumerate(label_names)}
    with _open_csv(path) as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        index = _positions(path, header, wanted)
        values: dict[str, array[Any]] = {
            c: array("q" if k == "label" else "d") for c, k in wanted.items()
        }
        rows = 0
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataFormatError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, "
                        f"the header has {len(header)}"
                    )
                rows += 1
                if rows > max_rows:
                    raise TooManyRows(_too_many_rows(path, max_rows))
                for column, kind in wanted.items():
                    cell = row[index[column]].strip()
                    where = f"{path}: line {reader.line_num}, column {column!r}"
                    values[column].append(_parse(cell, kind, names, where))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataFormatError(f"{path}: not a readable CSV file ({exc})") from exc
    return {c: np.frombuffer(v, dtype=np.dtype(v.typecode)).copy() for c, v in values.items()}


def _positions(path: Path, header: list[str], wanted: Mapping[str, Kind]) -> dict[str, int]:
    if not header:
        raise DataFormatError(f"{path}: empty CSV file (a header row is required)")
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(
            f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(header)}"
        )
    return {c: header.index(c) for c in wanted}


def _parse(cell: str, kind: Kind, names: Mapping[str, int], where: str) -> float | int:
    if kind == "label":
        return _label(cell, names, where)
    if kind == "time":
        return _time(cell, where)
    return _number(cell, where)


def _number(cell: str, where: str) -> float:
    if not cell:
        raise DataFormatError(f"{where}: empty value (missing reading)")
    try:
        value = float(cell)
    except ValueError:
        raise DataFormatError(f"{where}: {cell[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: {cell!r} (NaN or infinity) is not a usable reading")
    return value


def _label(cell: str, names: Mapping[str, int], where: str) -> int:
    if names:
        if cell not in names:
            raise DataFormatError(
                f"{where}: label {cell[:40]!r} is not one of label_names ({', '.join(names)})"
            )
        return names[cell]
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataFormatError(
            f"{where}: label {cell[:40]!r} is not a class number >= 0 "
            "(text labels need label_names)"
        )
    return int(value)


def _time(cell: str, where: str) -> float:
    try:
        return _number(cell, where)
    except DataFormatError:
        pass
    try:
        return datetime.fromisoformat(cell).timestamp()
    except ValueError:
        raise DataFormatError(
            f"{where}: {cell[:40]!r} is neither a number nor an ISO 8601 time"
        ) from None


def _too_many_rows(path: Path, max_rows: int) -> str:
    return (
        f"{path}: more than {max_rows} rows (max_rows bounds the memory a device spends on "
        "its data; split the file or raise max-rows)"
    )


# --- Parquet -----------------------------------------------------------------------------
def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(f"{path}: {PARQUET_EXTRA}") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_parquet(
    path: Path, wanted: Mapping[str, Kind], label_names: Sequence[str], max_rows: int
) -> dict[str, np.ndarray]:
    parquet = _parquet_file(path)
    header = list(parquet.schema_arrow.names)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(
            f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(header)}"
        )
    if parquet.metadata.num_rows > max_rows:  # known before anything is read
        raise TooManyRows(_too_many_rows(path, max_rows))
    try:
        table = parquet.read(columns=list(wanted))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = {name: i for i, name in enumerate(label_names)}
    return {
        c: _parquet_column(table.column(c), kind, names, f"{path}: column {c!r}")
        for c, kind in wanted.items()
    }


def _parquet_column(column: Any, kind: Kind, names: Mapping[str, int], where: str) -> np.ndarray:
    import pyarrow as pa

    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataFormatError(f"{where}, row {first + 1}: empty value (missing reading)")
    kind_of = column.type
    if kind == "time" and pa.types.is_timestamp(kind_of):
        return column.cast(pa.timestamp("ns")).cast(pa.int64()).to_numpy().astype(np.float64) / 1e9
    if pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of):
        texts = column.to_pylist()
        return np.array(
            [_parse(t, kind, names, f"{where}, row {i + 1}") for i, t in enumerate(texts)],
            dtype=np.int64 if kind == "label" else np.float64,
        )
    if not (pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of)):
        raise DataFormatError(f"{where}: type {kind_of} is not numeric")
    values = column.to_numpy().astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataFormatError(f"{where}, row {int(bad[0]) + 1}: NaN or infinity")
    if kind != "label":
        return values
    if names:
        raise DataFormatError(f"{where}: numeric labels, but label_names is set (text labels)")
    wrong = np.flatnonzero((values < 0) | (values != np.round(values)))
    if len(wrong):
        raise DataFormatError(
            f"{where}, row {int(wrong[0]) + 1}: label {float(values[wrong[0]]):g} is not a "
            "class number >= 0"
        )
    return values.astype(np.int64)
