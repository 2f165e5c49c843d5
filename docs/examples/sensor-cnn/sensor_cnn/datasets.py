"""The two real multichannel datasets of the example, read from the files sktime ships.

Nothing is downloaded: both sets are bundled inside the ``sktime`` wheel
(``sktime/datasets/data/<Name>/<Name>_TRAIN.ts`` and ``_TEST.ts``), and sktime's loaders
read them from there. Only the machine that prepares the example's files needs sktime (the
``data`` extra); devices never do.

- ``japanese-vowels``: 12 LPC cepstrum coefficients of 9 male speakers uttering the vowel
  /ae/ (Kudo, Toyama, Shimbo 1999; UCI / UEA archive), one frame every 6.4 ms, 7 to 29
  frames per utterance; 270 training and 370 test utterances; the class is the speaker.
- ``basic-motions``: a smartwatch's 3-axis accelerometer and 3-axis gyroscope at 10 Hz,
  100 readings (10 s) per recording, four activities (badminton, running, standing,
  walking); 40 training and 40 test recordings (UEA archive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Recordings:
    """Recordings of one split: ``series[i]`` is ``(channels, length)``, its class
    ``labels[i]`` (an index into ``class_names``)."""

    series: list[np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    channels: tuple[str, ...]
    period_s: float  # seconds between two readings

    def __post_init__(self) -> None:
        """Refuse recordings whose channels or labels do not match."""
        if len(self.series) != len(self.labels):
            raise ValueError(f"{len(self.series)} recordings but {len(self.labels)} labels")
        for i, s in enumerate(self.series):
            if s.ndim != 2 or s.shape[0] != len(self.channels):
                raise ValueError(
                    f"recording {i} has shape {s.shape}, not ({len(self.channels)}, L)"
                )
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(
            self.class_names
        ):
            raise ValueError("labels outside the class names")


@dataclass(frozen=True)
class DatasetInfo:
    """What the example knows about one bundled dataset."""

    loader: str  # the sktime.datasets function
    channels: tuple[str, ...]
    period_s: float
    raw_classes: tuple[str, ...]  # the dataset's own labels, in class order
    class_names: tuple[str, ...]  # what a device writes in its label column


DATASETS = {
    "japanese-vowels": DatasetInfo(
        "load_japanese_vowels",
        channels=tuple(f"lpc{i:02d}" for i in range(1, 13)),
        period_s=0.0064,
        raw_classes=tuple(str(i) for i in range(1, 10)),
        class_names=tuple(f"speaker{i}" for i in range(1, 10)),
    ),
    "basic-motions": DatasetInfo(
        "load_basic_motions",
        channels=("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"),
        period_s=0.1,
        raw_classes=("badminton", "running", "standing", "walking"),
        class_names=("badminton", "running", "standing", "walking"),
    ),
}


def load(name: str, split: str) -> Recordings:
    """The ``train`` or ``test`` split of the bundled dataset ``name``, from sktime's files."""
    info = DATASETS[name]
    try:
        import sktime.datasets
    except ImportError:
        raise SystemExit(
            "the example's datasets ship with sktime: pip install 'fedmq-sensor-cnn[data]'"
        ) from None
    x, y = getattr(sktime.datasets, info.loader)(split=split, return_type="nested_univ")
    return from_nested(x, y, info)


def from_nested(x: Any, y: Any, info: DatasetInfo) -> Recordings:
    """Recordings from sktime's nested table (a row per recording, a cell per channel)."""
    series = [
        np.stack([np.asarray(x.iloc[i, c], dtype=np.float64) for c in range(x.shape[1])])
        for i in range(x.shape[0])
    ]
    labels = np.array([info.raw_classes.index(str(label)) for label in y], dtype=np.int64)
    return Recordings(series, labels, info.class_names, info.channels, info.period_s)
