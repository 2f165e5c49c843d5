"""The device's own samples: read once, or re-read every round from a growing directory.

Image data (npz, IDX, image folders) and single sensor files are read at start-up. A
directory of CSV/Parquet sensor files (:mod:`shared.runtime.sensors`) grows while the device
records: it is re-read before every round the device trains, so each round learns from the
newest files within the configured window. A file that cannot be read then costs that round
only (the agent skips it, saying why); a directory with no file in the window yet gives no
samples until one arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.config import AgentConfig
from shared.runtime.data import ArrayDataset, DataFormatError, load_device_data, train_val_split
from shared.runtime.sensors import (
    NoDataYet,
    is_sensor_path,
    load_sensor_data,
    split_and_normalize,
)

log = logging.getLogger("fedmq.agent")

# What a growing directory of sensor files holds before its first file arrives.
NO_SAMPLES = ArrayDataset(np.zeros((0, 1), np.float32), np.zeros(0, np.int64))


class DeviceData:
    """(training, validation) samples of one device; ``now`` is its clock's wall time."""

    def __init__(self, cfg: AgentConfig, now: Callable[[], float]) -> None:
        """Read the data now: DataFormatError (or OSError) when it is not usable at all."""
        self.cfg = cfg
        self.source = cfg.source()
        self.now = now
        path = Path(cfg.data)
        self.growing = path.is_dir() and is_sensor_path(path, self.source)
        self.no_data = ""  # why a growing directory gave no samples
        self.train, self.val = self._load()

    def reload(self) -> str:
        """Re-read a growing directory (each round); why the round cannot be trained, or ""."""
        if not self.growing:
            return ""
        try:
            self.train, self.val = self._load()
        except (DataFormatError, OSError) as exc:  # a half-written or bad file: this round only
            return f"data not usable this round: {exc}"
        log.info(
            "%s: read %d recent samples from %s", self.cfg.client_id, len(self.train), self.cfg.data
        )
        return "" if len(self.train) else f"no samples yet: {self.no_data}"

    def _load(self) -> tuple[ArrayDataset, ArrayDataset | None]:
        """Sensor data is split and normalised here (statistics of its training split)."""
        path, rng = Path(self.cfg.data), np.random.default_rng(0)
        if is_sensor_path(path, self.source):
            try:
                data = load_sensor_data(path, self.source, now=self.now())
            except NoDataYet as exc:
                if not self.growing:
                    raise
                log.warning("%s: %s: no samples until files arrive", self.cfg.client_id, exc)
                self.no_data = str(exc)
                return NO_SAMPLES, None
            return split_and_normalize(data, self.source, self.cfg.val_fraction, rng)
        data = load_device_data(path)
        if self.cfg.val_fraction <= 0:
            return data, None
        return train_val_split(data, self.cfg.val_fraction, rng)
