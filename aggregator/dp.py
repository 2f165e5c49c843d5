"""Client-level differential privacy: DP-FedAvg with a fixed or adaptive clipping bound.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (ICLR):
DP-FedAvg; Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS): the adaptive bound and its privacy cost. What one round computes::

    Δ̃ = ( Σᵢ clip(Δᵢ, C) + N(0, (z_Δ·C)² I) ) / m

- **Clip** every update to L2 norm C (:func:`aggregator.clipping.clip_update`): whatever one
  device sends, the sum moves by at most C — the sum's sensitivity to adding or removing one
  device is C.
- **Sum unweighted.** Each device counts once, whatever its sample count: a weight nᵢ would
  multiply the sensitivity by a number the device itself claims. (McMahan et al. allow
  weights capped at 1, wᵢ = min(nᵢ/ŵ, 1); uniform weights, as in Andrew et al., are the
  special case that needs no ŵ.) The FedAvg share cap has nothing left to do here.
- **Noise** N(0, σ²) with σ = z_Δ·C is added to every coordinate of the *sum* (the Gaussian
  mechanism on a sensitivity-C query), from the injected ``rng``, one draw per tensor in the
  model's tensor order.
- **Divide by m, the expected number of participants** (q·N for a sampling rate q over N
  devices), not by the number that came: McMahan et al.'s fixed-denominator estimator. The
  number of participants depends on who is in the data, so dividing by it would make the
  result's sensitivity depend on it; with a fixed m the mean's sensitivity is C/m and the
  estimate is unbiased (E[Σ] = m·mean). The price: a round where fewer devices came than
  expected yields a shorter mean.

The result is the round's aggregated delta; the server optimizer (:mod:`aggregator.server_opt`)
applies it as post-processing, at no privacy cost (Andrew et al. use server momentum).

**Noise multipliers.** z is the multiplier the accountant (:mod:`aggregator.privacy`) is given.
With a fixed bound, z_Δ = z. With the adaptive bound, the count of unclipped updates is
released too, with noise σ_b (:mod:`aggregator.clipping`); Andrew et al. (Theorem 1) show the
two releases together cost what one Gaussian of multiplier z costs when
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (:func:`update_noise_multiplier`): the update's noise is raised
a little (σ_b = m/20, their choice, and z = 1, m = 100: z_Δ = 1.005). The new bound is
C·exp(−η_C(b̄ − γ)) with b̄ the noised fraction, so it is private too.

No MQTT, no files, no clock here; the caller owns the generator (and checkpoints its state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.clipping import (
    AdaptiveClipConfig,
    ClipState,
    RoundClipper,
    adapt_bound,
)
from aggregator.strategy import AggregationError, check_delta

Tensors = dict[str, np.ndarray]


class DPConfigError(ValueError):
    """DP settings that cannot work (e.g. the count's noise too small for z)."""


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update's share of a total noise multiplier z.

    ``count_stddev`` 0: no count is released, z_Δ = z. DPConfigError when 2σ_b ≤ z (the count
    alone would spend the whole budget).
    """
    if noise_multiplier <= 0:
        raise DPConfigError(f"noise multiplier must be positive, got {noise_multiplier}")
    if count_stddev == 0:
        return noise_multiplier
    if 2 * count_stddev <= noise_multiplier:
        raise DPConfigError(
            f"the clipped count's noise σ_b = {count_stddev} must exceed z/2 = "
            f"{noise_multiplier / 2}: raise σ_b (Andrew et al.: m/20) or lower z"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass(frozen=True)
class DPConfig:
    """DP-FedAvg's parameters: total noise multiplier z, expected clients m, the bound C."""

    noise_multiplier: float  # z, what the accountant is given
    expected_clients: float  # m = q·N, the fixed denominator
    clip: float = 1.0  # C (the fixed bound; ignored when ``adaptive`` is set)
    adaptive: AdaptiveClipConfig | None = None  # adaptive C (its count_stddev is σ_b)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise DPConfigError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not (self.expected_clients > 0 and math.isfinite(self.expected_clients)):
            raise DPConfigError(f"expected_clients must be positive, got {self.expected_clients}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise DPConfigError(f"clip must be positive and finite, got {self.clip}")
        if self.adaptive is not None and self.adaptive.count_stddev == 0:
            raise DPConfigError(
                "an adaptive bound under DP needs count_stddev > 0: the unclipped count "
                "is data too (Andrew et al. use m/20)"
            )
        _ = self.update_multiplier  # DPConfigError when σ_b is too small for z

    @property
    def update_multiplier(self) -> float:
        """z_Δ: the multiplier of the update's noise (z when the bound is fixed)."""
        stddev = 0.0 if self.adaptive is None else self.adaptive.count_stddev
        return update_noise_multiplier(self.noise_multiplier, stddev)

    def initial_clip(self) -> ClipState:
        """The first round's bound: C₀ when adaptive, else the fixed C."""
        bound = self.clip if self.adaptive is None else self.adaptive.initial_bound
        return ClipState(bound, 0)


class DPFedAvgRound:
    """One round of DP-FedAvg: a streaming, unweighted sum of clipped updates, then noise."""

    def __init__(
        self, config: DPConfig, shapes: Mapping[str, tuple[int, ...]], clip: ClipState
    ) -> None:
        self.config = config
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.clip_state = clip
        self.clipper = RoundClipper(clip.bound)
        self._sum: Tensors = {n: np.zeros(s, dtype=np.float64) for n, s in self.shapes.items()}

    @property
    def noise_stddev(self) -> float:
        """σ = z_Δ·C: the standard deviation of the noise on each coordinate of the sum."""
        return self.config.update_multiplier * self.clipper.bound

    @property
    def count(self) -> int:
        """Updates folded into the sum this round."""
        return self.clipper.count

    def add(self, delta: Mapping[str, np.ndarray]) -> float:
        """Clip ``delta`` to C and fold it into the sum; its norm before clipping.

        AggregationError (nothing folded) when it does not fit the model or is not finite.
        """
        check_delta(self.shapes, delta)
        clipped, norm = self.clipper.clip(delta)
        for name, acc in self._sum.items():
            acc += clipped[name]
        return norm

    def noised_mean(self, rng: np.random.Generator) -> Tensors:
        """(Σ clipped + N(0, σ²)) / m as fp32: one normal draw per tensor, in model order.

        Also valid with no update at all (pure noise): whether anyone came is not revealed.
        """
        sigma, m = self.noise_stddev, self.config.expected_clients
        out: Tensors = {}
        for name, acc in self._sum.items():
            noisy = acc + rng.normal(0.0, sigma, size=acc.shape)
            out[name] = (noisy / m).astype(np.float32)
            if not np.isfinite(out[name]).all():
                raise AggregationError(f"{name}: the noised mean overflows fp32")
        return out

    def finish(self, rng: np.random.Generator) -> tuple[Tensors, ClipState]:
        """(the noised mean, the next round's clipping state), drawing in that order.

        With a fixed bound the state is returned as it is; with the adaptive one the bound
        moves by the noised unclipped fraction over m (:func:`aggregator.clipping.adapt_bound`).
        """
        mean = self.noised_mean(rng)
        adaptive = self.config.adaptive
        if adaptive is None:
            return mean, self.clip_state
        nxt = adapt_bound(
            adaptive, self.clip_state, self.clipper.unclipped, self.config.expected_clients, rng
        )
        return mean, nxt
