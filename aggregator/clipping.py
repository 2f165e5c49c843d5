"""Norm clipping of each update: a fixed bound, or one that tracks a quantile of the norms.

**Clipping** (Δ over all its tensors together, the L2 norm of :func:`update_l2_norm`)::

    clip(Δ, C) = Δ · min(1, C / ‖Δ‖₂)

A clipped update keeps its direction; no update moves the sum by more than C times its
weight. Unlike the hard bound of :mod:`aggregator.update_bounds` (``--max-update-norm``), which
*refuses* an update, clipping counts it, shortened. It is streaming: each delta is clipped just
before it is folded into the running sum (:class:`aggregator.strategy.StreamingFedAvg`), so it
needs no memory beyond one delta, and the FedAvg weighting by sample count (and its share cap)
is kept unchanged.

**Adaptive bound** (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping", NeurIPS; Algorithm 1's geometric update). In round t every update is clipped to
Cₜ; with b̄ₜ the fraction of the round's updates whose norm was at most Cₜ::

    Cₜ₊₁ = Cₜ · exp(−η_C · (b̄ₜ − γ))

The bound grows while fewer than γ of the updates fit under it and shrinks while more do: its
fixed point is the γ-quantile of the update norms. The step is multiplicative, so it moves by
the same *factor* whatever the norms' scale (at most e^{η_C·max(γ, 1−γ)} per round). Andrew
et al. use γ = 0.5 (the median), η_C = 0.2 and start at C₀ = 0.1 over thousands of rounds; a
run of tens of rounds wants η_C ≈ 1 or a C₀ near the honest norms.

With client-level DP (:mod:`aggregator.dp`) the count is itself noised:
b̄ₜ = (Σᵢ 1[‖Δᵢ‖ ≤ Cₜ] + N(0, σ_b²)) / m with m the *expected* number of clients per round,
and the update's noise multiplier is raised to pay for it
(:func:`aggregator.dp.update_noise_multiplier`). Without DP, σ_b = 0 and m is the number
of updates the round counted.

**State.** :class:`ClipState` (the current bound and the rounds adapted) is a value with
``to_dict`` / ``from_dict`` of JSON scalars, saved in the checkpoint after each applied round.
The per-round counts (:class:`RoundClipper`) are not saved: a resumed round replays its
journaled updates and counts them again. No MQTT, no files, no clock here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.update_bounds import update_l2_norm

Tensors = dict[str, np.ndarray]

# The adaptive bound never goes below this: an endless run of all-zero updates would
# otherwise shrink it geometrically to 0, and no update can be clipped to 0.
MIN_BOUND = 1e-12


class ClipError(ValueError):
    """Bad clipping settings, or a saved clipping state that cannot be read."""


def clip_factor(norm: float, bound: float) -> float:
    """min(1, bound / norm): what an update of L2 norm ``norm`` is multiplied by."""
    return 1.0 if norm <= bound else bound / norm


def clip_update(delta: Mapping[str, np.ndarray], bound: float) -> tuple[Tensors, float]:
    """(Δ · min(1, C/‖Δ‖), ‖Δ‖): the clipped update, fp32, and the norm it had before.

    An update within the bound is returned as is (not copied). The product is taken in fp64
    and rounded once to fp32, so the clipped norm is C to within fp32 rounding. ClipError
    when a value is not finite (the update has no norm to clip).
    """
    norm = update_l2_norm(delta)
    if not math.isfinite(norm):
        raise ClipError("the update has non-finite values: it cannot be clipped")
    factor = clip_factor(norm, bound)
    if factor == 1.0:
        return {n: np.asarray(v, dtype=np.float32) for n, v in delta.items()}, norm
    return {
        n: (np.asarray(v, np.float64) * factor).astype(np.float32) for n, v in delta.items()
    }, norm


class RoundClipper:
    """Clips a round's updates to one bound and counts how many were within it."""

    def __init__(self, bound: float) -> None:
        if not (bound > 0 and math.isfinite(bound)):
            raise ClipError(f"a clipping bound must be positive and finite, got {bound}")
        self.bound = bound
        self.count = 0
        self.unclipped = 0  # norm ≤ bound: the Σ bᵢ of Andrew et al.

    def clip(self, delta: Mapping[str, np.ndarray]) -> tuple[Tensors, float]:
        """The clipped update and its original norm; counts it (ClipError if not finite)."""
        clipped, norm = clip_update(delta, self.bound)
        self.count += 1
        self.unclipped += int(norm <= self.bound)
        return clipped, norm


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """The geometric update's parameters (Andrew et al. 2021's names)."""

    initial_bound: float  # C₀
    target_quantile: float = 0.5  # γ
    learning_rate: float = 0.2  # η_C
    count_stddev: float = 0.0  # σ_b: noise on the unclipped count (DP only)
    max_bound: float | None = None  # never adapt above this (e.g. the hard --max-update-norm)

    def __post_init__(self) -> None:
        if not (self.initial_bound > 0 and math.isfinite(self.initial_bound)):
            raise ClipError(f"initial_bound must be positive and finite, got {self.initial_bound}")
        if not 0 < self.target_quantile < 1:
            raise ClipError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ClipError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (self.count_stddev >= 0 and math.isfinite(self.count_stddev)):
            raise ClipError(f"count_stddev must be ≥ 0, got {self.count_stddev}")
        if self.max_bound is not None and not self.max_bound >= self.initial_bound:
            raise ClipError(f"max_bound {self.max_bound} is below initial_bound")


@dataclass(frozen=True)
class ClipState:
    """The bound the next round clips to, and how many rounds adapted it."""

    bound: float
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able scalars (a Python float survives JSON exactly)."""
        return {"bound": self.bound, "rounds": self.rounds}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ClipState:
        """The state :meth:`to_dict` wrote; ClipError when it is not one."""
        bound, rounds = doc.get("bound"), doc.get("rounds")
        if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound > 0:
            raise ClipError(f"saved clipping bound {bound!r} is not a positive number")
        if not math.isfinite(bound):
            raise ClipError(f"saved clipping bound {bound!r} is not finite")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ClipError(f"saved clipping rounds {rounds!r} is not a round count")
        return cls(float(bound), rounds)


def initial_clip_state(config: AdaptiveClipConfig) -> ClipState:
    """C₀, no round adapted yet."""
    return ClipState(config.initial_bound, 0)


def adapt_bound(
    config: AdaptiveClipConfig,
    state: ClipState,
    unclipped: int,
    denominator: float,
    rng: np.random.Generator | None = None,
) -> ClipState:
    """The next round's state after a round in which ``unclipped`` updates fit under the bound.

    ``denominator``: the number of updates counted (no DP), or the expected number of clients
    (DP: a fixed denominator, like the update's). With ``config.count_stddev`` > 0 one draw of
    N(0, σ_b²) from ``rng`` is added to the count (ClipError without an ``rng``). A round with
    a zero denominator leaves the state as it is.
    """
    if denominator <= 0:
        return state
    noise = 0.0
    if config.count_stddev > 0:
        if rng is None:
            raise ClipError("count_stddev > 0 needs a random generator for the count's noise")
        noise = float(rng.normal(0.0, config.count_stddev))
    fraction = (unclipped + noise) / denominator
    bound = state.bound * math.exp(-config.learning_rate * (fraction - config.target_quantile))
    if config.max_bound is not None:
        bound = min(bound, config.max_bound)
    return ClipState(max(bound, MIN_BOUND), state.rounds + 1)
