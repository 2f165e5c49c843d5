"""Bounds on what one update may do to the global model (defence against poisoning).

A delta whose L2 norm (over all its tensors together) exceeds the operator's bound is refused
before it reaches the sum: one device cannot move the model arbitrarily far in a round. The
bound is off by default because a good value depends on the model, the learning rate and the
local epochs; operators set it from the norms of honest rounds (``fedmq`` logs them at debug).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def update_l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of the whole delta, accumulated in fp64 (no fp32 overflow for huge values)."""
    total = 0.0
    for value in delta.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def norm_violation(delta: Mapping[str, np.ndarray], max_norm: float | None) -> str | None:
    """A rejection reason when ``delta`` is longer than ``max_norm``, else None."""
    if max_norm is None:
        return None
    norm = update_l2_norm(delta)
    if not math.isfinite(norm) or norm > max_norm:
        return f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None
