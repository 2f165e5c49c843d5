"""Generated data for tests: a small learnable image task, no download, no dataset files."""

from __future__ import annotations

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
