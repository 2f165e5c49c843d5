"""Generated data for tests: a small learnable image task and a sensor task; no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shared.runtime.data import ArrayDataset

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 4


def make_dataset(n: int, seed: int) -> ArrayDataset:
    """``n`` samples: each class is a fixed random prototype plus noise (seeded)."""
    protos = np.random.default_rng(1234).uniform(0, 255, size=(NUM_CLASSES, *INPUT_SHAPE))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = protos[y] + rng.normal(0, 40, size=(n, *INPUT_SHAPE))
    return ArrayDataset(x=np.clip(x, 0, 255).astype(np.uint8), y=y.astype(np.int64))


WINDOW_SHAPE = (2, 16)  # the sensor task: 2 channels, windows of 16 readings
WINDOW_CLASSES = 3


def make_windows(n: int, seed: int, task: str = "classification") -> ArrayDataset:
    """``n`` sensor windows ``(2, 16)`` of unit-scale noise around a level per channel.

    Classification: class 0 raises channel 0, class 1 channel 1, class 2 neither.
    Regression: the target is ``level_0 - 0.5 * level_1`` of the window's two levels.
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 0.5, size=(n, *WINDOW_SHAPE))
    if task == "classification":
        y = rng.integers(0, WINDOW_CLASSES, size=n)
        levels = np.zeros((n, 2))
        levels[y == 0, 0] = 2.0
        levels[y == 1, 1] = 2.0
        x = noise + levels[:, :, None]
        return ArrayDataset(x.astype(np.float32), y.astype(np.int64))
    levels = rng.uniform(-2.0, 2.0, size=(n, 2))
    x = noise + levels[:, :, None]
    target = levels[:, 0] - 0.5 * levels[:, 1]
    return ArrayDataset(x.astype(np.float32), target.astype(np.float32))


def write_recording(path: Path, windows: int, seed: int, mtime: float | None = None) -> Path:
    """A CSV sensor recording: ``windows`` windows of :func:`make_windows` (classification)
    laid end to end, one row per reading: ``t,c0,c1,label`` (the label of its window)."""
    data = make_windows(windows, seed=seed)
    length = WINDOW_SHAPE[1]
    rows = ["t,c0,c1,label"]
    for w, (x, label) in enumerate(zip(data.x, data.y, strict=True)):
        rows += [f"{w * length + i},{x[0, i]:.4f},{x[1, i]:.4f},{label}" for i in range(length)]
    path.write_text("\n".join(rows) + "\n")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path
