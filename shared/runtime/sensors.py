"""Sensor data on a device: tabular rows and time-series windows from CSV/Parquet files.

A device's data is sensor data when its settings name a label or target column
(:class:`SensorSource`); ``data`` is then one CSV/Parquet file or a directory of them.

- **Tabular** (``window = 0``): each row is a sample; its features are ``columns`` (default:
  every column but the label, targets and time) as an ``(F,)`` vector; its label is
  ``label_column`` (classification) or its targets ``target_columns`` (regression).
- **Time series** (``window > 0``): each file is one recording of channels (``columns``, in
  time order, sorted by ``time_column`` when given), cut into windows of ``window`` rows every
  ``stride`` rows (default: ``window``, no overlap); a sample is ``(channels, window)``. A
  window never spans two files. Its label (or its ``target_columns`` values, for regression)
  is the one at the window's **last** row: what a model judging "now" from the recent past
  sees. With ``horizon > 0`` it is instead a forecast: the targets are the next ``horizon``
  values of the one ``target_columns`` channel after the window (``horizon`` outputs); that
  channel's past is then an input too (by default), other targets never are.
- **Normalisation** (``normalize``, default on): each feature / channel is standardised with
  the mean and standard deviation the device computes on its own *training* split and
  applies identically to its validation split (:func:`split_and_normalize`). Targets stay in
  their own units.
- **Growing data**: with ``data`` a directory, the newest files (by modification time) are
  read, at most ``recent_files`` of them and none older than ``recent_max_age_s`` (0: no
  limit), newest first until ``max_rows`` rows: the agent re-reads them at every round, so a
  device trains on what it recorded lately, with bounded memory. Write each file whole and
  then move it into the directory (a half-written file is refused for that round).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.runtime.data import ArrayDataset, DataFormatError
from shared.runtime.tables import Kind, TooManyRows, header_of, is_table, read_columns

log = logging.getLogger("fedmq.data")

# Windows hold copies of their rows: at most this many float32 values (256 MiB) in all.
MAX_WINDOW_VALUES = 64 * 1024 * 1024
_STD_FLOOR = 1e-8


class NoDataYet(DataFormatError):
    """A directory of sensor files holds nothing within the window (yet)."""


@dataclass(frozen=True)
class SensorSource:
    """How a device reads its CSV/Parquet sensor data (the agent's data settings)."""

    columns: tuple[str, ...] = ()
    label_column: str = ""
    label_names: tuple[str, ...] = ()
    target_columns: tuple[str, ...] = ()
    time_column: str = ""
    window: int = 0
    stride: int = 0
    horizon: int = 0
    normalize: bool = True
    recent_files: int = 0
    recent_max_age_s: float = 0.0
    max_rows: int = 1_000_000

    def __post_init__(self) -> None:
        """Refuse settings that contradict each other, naming them."""
        for name in ("window", "stride", "horizon", "recent_files"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be ≥ 0")
        if self.recent_max_age_s < 0:
            raise ValueError("recent-max-age-s must be ≥ 0")
        if self.max_rows < 1:
            raise ValueError("max-rows must be ≥ 1")
        if not self.configured:
            return
        if self.label_column and self.target_columns:
            raise ValueError("label-column and target-columns exclude each other")
        if self.horizon and not self.window:
            raise ValueError("horizon needs window (a forecast follows a time-series window)")
        if self.horizon and (self.label_column or len(self.target_columns) != 1):
            raise ValueError(
                "horizon forecasts one channel: set exactly one target-columns, no label-column"
            )
        if self.label_names and not self.label_column:
            raise ValueError("label-names needs label-column")

    @property
    def configured(self) -> bool:
        """True when the settings name sensor data (a label or target column)."""
        return bool(self.label_column or self.target_columns)

    @property
    def task(self) -> str:
        """``classification`` with a label column, else ``regression``."""
        return "classification" if self.label_column else "regression"


def is_sensor_path(path: Path, source: SensorSource) -> bool:
    """True when ``path`` is to be read as sensor data (a table, or a directory of them)."""
    return source.configured and (path.is_dir() or is_table(path))


def load_sensor_data(path: str | Path, source: SensorSource, now: float) -> ArrayDataset:
    """The samples of a CSV/Parquet file, or of a directory's recent files (at time ``now``).

    Raises DataFormatError (NoDataYet: a directory with nothing in the window).
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    files = recent_files(path, source, now) if path.is_dir() else [path]
    if not is_table(files[0]):
        raise DataFormatError(f"{files[0]}: not a .csv or .parquet file")
    parts: list[ArrayDataset] = []
    rows_left = source.max_rows
    for file in reversed(files):  # newest first, while the row budget lasts
        try:
            columns = _read(file, source, rows_left)
        except TooManyRows:
            if not parts:
                raise  # the newest file alone is over max-rows: refused
            log.warning("%s and older files skipped: max-rows (%d) reached", file, source.max_rows)
            break
        rows_left -= len(next(iter(columns.values())))
        parts.append(_samples(file, columns, source))
    parts.reverse()  # oldest first: the last windows are the most recent
    return _concat(parts, source)


def recent_files(directory: Path, source: SensorSource, now: float) -> list[Path]:
    """The directory's CSV/Parquet files within the window, oldest first (NoDataYet if none).

    Hidden files (``.name``) are ignored: write a file under a hidden name, then rename it.
    """
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") or not is_table(entry) or not entry.is_file():
            continue
        mtime = entry.stat().st_mtime
        if source.recent_max_age_s and now - mtime > source.recent_max_age_s:
            continue
        found.append((mtime, entry.name, entry))
    found.sort(reverse=True)
    if source.recent_files:
        found = found[: source.recent_files]
    if not found:
        raise NoDataYet(
            f"{directory}: no .csv or .parquet file"
            + (f" newer than {source.recent_max_age_s:g}s" if source.recent_max_age_s else "")
        )
    return [entry for _, _, entry in reversed(found)]


def _features(path: Path, source: SensorSource) -> tuple[str, ...]:
    if source.columns:
        return source.columns
    excluded = {source.label_column, source.time_column}
    if not source.horizon:  # targets are inputs only to a forecast (their past values)
        excluded |= set(source.target_columns)
    features = tuple(c for c in header_of(path) if c not in excluded)
    if not features:
        raise DataFormatError(f"{path}: no feature columns besides the label/target/time")
    return features


def _read(path: Path, source: SensorSource, max_rows: int) -> dict[str, np.ndarray]:
    wanted: dict[str, Kind] = {c: "number" for c in _features(path, source)}
    if source.label_column:
        wanted[source.label_column] = "label"
    for target in source.target_columns:
        wanted.setdefault(target, "number")
    if source.time_column:
        wanted[source.time_column] = "time"
    columns = read_columns(path, wanted, label_names=source.label_names, max_rows=max_rows)
    if source.time_column:
        order = np.argsort(columns[source.time_column], kind="stable")
        columns = {name: values[order] for name, values in columns.items()}
    return columns


def _samples(path: Path, columns: dict[str, np.ndarray], source: SensorSource) -> ArrayDataset:
    features = np.stack([columns[c] for c in _features(path, source)], axis=1)
    if source.window:
        return _windows(path, features, columns, source)
    if source.label_column:
        y = columns[source.label_column]
    else:
        targets = np.stack([columns[c] for c in source.target_columns], axis=1)
        y = targets[:, 0] if targets.shape[1] == 1 else targets
        y = y.astype(np.float32)
    return ArrayDataset(features.astype(np.float32), y)


def _windows(
    path: Path, series: np.ndarray, columns: dict[str, np.ndarray], source: SensorSource
) -> ArrayDataset:
    """Windows ``(N, channels, window)`` of one recording and their labels or forecasts."""
    span = source.window + source.horizon
    rows, channels = series.shape
    if rows < span:
        raise DataFormatError(
            f"{path}: {rows} rows, fewer than one window needs ({source.window}"
            + (f" + horizon {source.horizon}" if source.horizon else "")
            + ")"
        )
    starts = np.arange(0, rows - span + 1, source.stride or source.window)
    if len(starts) * channels * source.window > MAX_WINDOW_VALUES:
        raise DataFormatError(
            f"{path}: {len(starts)} windows of {channels}×{source.window} values exceed "
            f"{MAX_WINDOW_VALUES} values; raise stride or lower max-rows / recent-files"
        )
    view = np.lib.stride_tricks.sliding_window_view(series, source.window, axis=0)
    x = view[starts].astype(np.float32)  # (N, channels, window), a copy
    last = starts + source.window - 1  # each window's last row: "now"
    if source.horizon:
        target = columns[source.target_columns[0]]
        ahead = np.lib.stride_tricks.sliding_window_view(target, source.horizon)
        y = ahead[last + 1].astype(np.float32)
        return ArrayDataset(x, y[:, 0] if source.horizon == 1 else y)
    if source.label_column:
        return ArrayDataset(x, columns[source.label_column][last])
    targets = np.stack([columns[c][last] for c in source.target_columns], axis=1)
    return ArrayDataset(x, (targets[:, 0] if targets.shape[1] == 1 else targets).astype(np.float32))


def _concat(parts: list[ArrayDataset], source: SensorSource) -> ArrayDataset:
    shapes = {p.input_shape for p in parts}
    if len(shapes) > 1:
        raise DataFormatError(f"files give samples of different shapes {sorted(shapes)}")
    if len(parts) == 1:
        return parts[0]
    return ArrayDataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


# --- split and normalisation -------------------------------------------------------------
def split_and_normalize(
    data: ArrayDataset, source: SensorSource, val_fraction: float, rng: np.random.Generator
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(train, validation) of sensor data, standardised with the training split's statistics.

    Windows are split in time (the most recent ``val_fraction`` validate: random windows
    would leak overlapping rows into validation); table rows at random.
    """
    n_val = round(len(data) * val_fraction) if val_fraction > 0 else 0
    if n_val and source.window:
        train, val = (
            data.subset(np.arange(len(data) - n_val)),
            data.subset(np.arange(len(data) - n_val, len(data))),
        )
    elif n_val:
        perm = rng.permutation(len(data))
        train, val = data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val]))
    else:
        train, val = data, None
    if not source.normalize or not len(train):
        return train, val
    mean, std = channel_statistics(train.x)
    return standardized(train, mean, std), (standardized(val, mean, std) if val else None)


def channel_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature (axis 1) over every other axis."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    # A constant channel (a stuck sensor) stays 0 instead of dividing by zero.
    return mean, np.where(std < _STD_FLOOR, 1.0, std)


def standardized(data: ArrayDataset, mean: np.ndarray, std: np.ndarray) -> ArrayDataset:
    """``data`` with each feature (axis 1) shifted by ``mean`` and scaled by ``std``."""
    shape = (1, -1) + (1,) * (data.x.ndim - 2)
    x = (data.x - mean.reshape(shape)) / std.reshape(shape)
    return ArrayDataset(x.astype(np.float32), data.y)
