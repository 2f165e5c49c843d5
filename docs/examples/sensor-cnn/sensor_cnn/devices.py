"""Recordings as devices would hold them: per-device directories of timestamped CSV files.

A device records one file per recording (an utterance, an activity bout): a ``time``
column (ISO 8601), one column per channel and the recording's class as text in a label
column. Files are written under a hidden name and renamed, and their modification time is
the end of the recording, as a device writing into its growing data directory would leave
them (``fedmq-agent --data DIR`` reads them in that order).

The split is **non-IID**: each class's recordings are divided among the devices by
Dirichlet(``alpha``) proportions (:func:`aggregator.ops.datasets.partition_dirichlet`, the
split of ``fedmq demo``), so every device hears a few speakers (or sees a few activities)
much more often than the rest; smaller ``alpha`` is more skewed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from aggregator.ops.datasets import partition_dirichlet
from sensor_cnn.datasets import Recordings
from shared.runtime.data import ArrayDataset
from shared.runtime.sensors import SensorSource, load_sensor_data, split_and_normalize

TIME_COLUMN = "time"
# Recordings of a device are this far apart (they never overlap, whatever their length).
GAP = timedelta(minutes=5)


def split_non_iid(
    labels: np.ndarray, devices: int, alpha: float, seed: int, min_recordings: int
) -> list[np.ndarray]:
    """Each device's recording indices (sorted): a Dirichlet(``alpha``) label skew in which
    every device holds at least ``min_recordings``."""
    rng = np.random.default_rng(seed)
    return partition_dirichlet(labels, devices, alpha, rng, min_size=min_recordings)


def write_recordings(
    directory: Path,
    recordings: Recordings,
    indices: np.ndarray,
    label_column: str,
    start: datetime,
) -> list[Path]:
    """Write recordings ``indices`` into ``directory``, one CSV per recording, oldest first."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    begin = start
    for k, i in enumerate(indices):
        path = directory / f"rec-{k:04d}.csv"
        end = write_csv(
            path,
            recordings.series[i],
            recordings.channels,
            recordings.period_s,
            begin,
            label=(label_column, recordings.class_names[recordings.labels[i]]),
        )
        paths.append(path)
        begin = end + GAP
    return paths


def write_csv(
    path: Path,
    series: np.ndarray,
    channels: tuple[str, ...],
    period_s: float,
    start: datetime,
    label: tuple[str, str],
) -> datetime:
    """One recording ``(channels, length)`` as ``time,<channels>,<label>`` rows; returns the
    time of its last reading (also the file's modification time)."""
    column, text = label
    stamps = [start + timedelta(seconds=period_s * r) for r in range(series.shape[1])]
    hidden = path.with_name(f".{path.name}")
    with open(hidden, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([TIME_COLUMN, *channels, column])
        for r, stamp in enumerate(stamps):
            values = (f"{v:.6g}" for v in series[:, r])
            writer.writerow([stamp.isoformat(timespec="microseconds"), *values, text])
    hidden.rename(path)
    os.utime(path, (stamps[-1].timestamp(), stamps[-1].timestamp()))
    return stamps[-1]


def held_out_windows(directory: Path, source: SensorSource) -> ArrayDataset:
    """The windows of a directory of recordings, cut and standardised as a device does with
    its own data (its own statistics): the aggregator's evaluation data."""
    every_file = replace(source, recent_files=0, recent_max_age_s=0.0)
    data = load_sensor_data(directory, every_file, now=datetime.now().timestamp())
    windows, _ = split_and_normalize(data, source, 0.0, np.random.default_rng(0))
    return windows


def label_counts(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> list[list[int]]:
    """Recordings of each class on each device (rows: devices)."""
    return [np.bincount(labels[p], minlength=classes).tolist() for p in parts]
