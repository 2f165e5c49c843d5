"""Bounds on what one update may do to the global model (defence against poisoning).

Each is checked before the update reaches the sum, and a refusal is a receipt:

- **L2 norm** (``over-norm``): a delta longer than the operator's bound (over all its tensors
  together) is refused, so one device cannot move the model arbitrarily far in a round. The
  bound is on by default (:data:`DEFAULT_MAX_UPDATE_NORM`, measured on honest updates: see
  docs/security.md); every update's norm is logged at debug level
  (``fedmq-aggregator --log-level debug``), which is how an operator tunes it for another model,
  learning rate or number of local epochs.
- **Overflow** (``non-finite``): where can a finite fp32 update overflow? Not in the fp64 sum:
  |Δ| ≤ 3.4e38 and num_samples < 2⁴⁰ make each term < 4e50, far below fp64's 1.8e308 for any
  number of updates. The mean is a convex combination of the deltas, so |mean| ≤ max |Δᵢ|; what
  can overflow is the fp32 apply, θ + mean. A delta with max |Δ| > FLT_MAX − max |θ|
  (:func:`model_headroom`) is refused; rounding at the ulp level is left to the last check,
  which never lets a non-finite model out (:mod:`aggregator.strategy`, ``Evaluator.unusable``).
- **Sample count** (``too-many-samples``): num_samples weights the average, and the device
  says it itself. It may not exceed what the device declared in its status
  (``AgentStatus.num_samples``, its training-set size: an honest agent sends exactly that) nor
  the configured maximum. Refused, not clipped: an honest agent never exceeds either, so a larger
  claim is a lie or a misconfiguration, and the receipt makes it visible at both ends instead of
  silently changing a weight. The share one device may take of a round's weight is clipped in
  the sum (:class:`aggregator.strategy.StreamingFedAvg`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Honest updates of the demo task (Fashion-MNIST, Dirichlet 0.5, 1 epoch, lr 0.01, momentum
# 0.9) stay below 4.14 with LeNet-5 and the MLP (the first round is the largest;
# `fedmq bench inprocess`, docs/security.md): about 5× headroom.
DEFAULT_MAX_UPDATE_NORM = 20.0
# Far above a Raspberry Pi's local data set; a sanity bound, the weight share does the rest.
DEFAULT_MAX_SAMPLES = 1_000_000


def update_l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of the whole delta, accumulated in fp64 (no fp32 overflow for huge values)."""
    total = 0.0
    for value in delta.values():
        # Not np.dot: it runs on BLAS threads, and waking them for every update of a small
        # model cost ~10x the arithmetic on a busy 2-core machine (fedmq bench ingest).
        flat = np.array(value, dtype=np.float64).ravel()  # a copy: squared in place
        total += float(np.multiply(flat, flat, out=flat).sum())
    return math.sqrt(total)


def norm_violation(
    delta: Mapping[str, np.ndarray], max_norm: float | None, who: str = "an update"
) -> str | None:
    """A rejection reason when ``delta`` is longer than ``max_norm``, else None.

    Logs the norm at debug level, bound or not: the figures an operator sets the bound from.
    """
    norm = update_l2_norm(delta)
    log.debug("%s: L2 norm %.6g (bound %s)", who, norm, max_norm)
    if max_norm is None:
        return None
    if not math.isfinite(norm) or norm > max_norm:
        return f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def model_headroom(params: Mapping[str, np.ndarray]) -> float:
    """How large a delta value may be before θ + Δ overflows fp32: FLT_MAX − max |θ|."""
    largest = max((float(np.max(np.abs(v))) for v in params.values() if np.size(v)), default=0.0)
    return FLOAT32_MAX - largest


def value_violation(delta: Mapping[str, np.ndarray], headroom: float) -> str | None:
    """A rejection reason when a value of ``delta`` is beyond ``headroom``, else None."""
    largest = max((float(np.max(np.abs(v))) for v in delta.values() if np.size(v)), default=0.0)
    if largest > headroom:
        return (
            f"non-finite: values up to {largest:.4g} would overflow the global model "
            f"(fp32 headroom {headroom:.4g})"
        )
    return None


def sample_violation(claimed: int, declared: int | None, max_samples: int | None) -> str | None:
    """A rejection reason when ``claimed`` exceeds the declared count or the maximum, else None.

    ``declared`` None (or 0): the device declared no count (an agent older than the status
    field, or no status seen yet, as when a restarted aggregator replays its journal): only
    the maximum applies.
    """
    if max_samples is not None and claimed > max_samples:
        return f"too many samples: {claimed} claimed, the maximum is {max_samples}"
    if declared and claimed > declared:
        return f"too many samples: {claimed} claimed, the device declared {declared}"
    return None
