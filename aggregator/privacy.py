"""Privacy accounting for DP-FedAvg: the (ε, δ) spent, the noise a target needs, the budget.

Each round of :mod:`aggregator.dp` is a **Poisson-subsampled Gaussian mechanism**: every device
takes part independently with probability q (the sampling rate), its contribution to the sum
is clipped to C, and Gaussian noise of standard deviation z·C is added, z the noise multiplier.
Neighbouring data sets differ by *one device's* whole data (add or remove one device): the
guarantee is user-level, not per example. T rounds compose.

The accountant is Google's ``dp-accounting`` library (the ``dp`` extra:
``pip install 'fedmq[dp]'``), never a formula of ours:

- ``rdp`` (default): Rényi DP of the subsampled Gaussian (Mironov et al. 2019, "Rényi
  Differential Privacy of the Sampled Gaussian Mechanism"), summed over rounds — the RDP of T
  identical rounds is T times one round's, so it is computed once per (q, z) and reused — then
  converted to (ε, δ) at the best order (Canonne, Kamath & Steinke 2020, Prop. 12). Fast
  (≈ 20–80 ms per new (q, z), microseconds per T after that).
- ``pld``: privacy-loss distributions (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the
  Dots"), tighter (a smaller ε for the same mechanism) and slower (≈ 0.5 s per evaluation).

:func:`noise_multiplier_for` inverts the accountant: the smallest z (to a relative 1e-3, found
by bisection; ε falls as z grows) whose ε after T rounds is at most the target.
:func:`budget_status` says what running one more round would spend; :func:`max_rounds` how many
rounds a budget allows. The accountant assumes Poisson sampling with rate q over the whole
population, independent of the data; a selection that is not (a fixed number of the devices
online) is an approximation the caller must state.
No MQTT, no files, no clock here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

METHODS = ("rdp", "pld")
# Bounds of the noise-multiplier search: below 0.01 the ε of any useful run is astronomical,
# above 10⁴ the signal is gone.
MIN_NOISE, MAX_NOISE = 0.01, 1e4


class PrivacyError(ValueError):
    """Bad accounting parameters, or the dp-accounting library is not installed."""


def _library() -> ModuleType:
    try:
        import dp_accounting
    except ImportError as exc:
        raise PrivacyError(
            "differential privacy needs the dp-accounting library: pip install 'fedmq[dp]'"
        ) from exc
    return dp_accounting


def _check(sampling_rate: float, noise_multiplier: float, delta: float, method: str) -> None:
    if not 0 < sampling_rate <= 1:
        raise PrivacyError(f"sampling rate q must be in (0, 1], got {sampling_rate}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier z must be positive, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise PrivacyError(f"δ must be in (0, 1), got {delta}")
    if method not in METHODS:
        raise PrivacyError(f"accounting method {method!r} is not one of {METHODS}")


def _event(dpa: Any, sampling_rate: float, noise_multiplier: float) -> Any:
    return dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier))


@functools.lru_cache(maxsize=128)
def _rdp_of_one_round(
    sampling_rate: float, noise_multiplier: float
) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP at each order) of one round, from the library's own accountant."""
    dpa = _library()
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(_event(dpa, sampling_rate, noise_multiplier), 1)
    return accountant.orders, accountant.rdp


def epsilon_spent(
    sampling_rate: float, noise_multiplier: float, rounds: int, delta: float, method: str = "rdp"
) -> float:
    """ε after ``rounds`` rounds of the subsampled Gaussian (q, z), at δ = ``delta``."""
    _check(sampling_rate, noise_multiplier, delta, method)
    if rounds < 0:
        raise PrivacyError(f"rounds must be ≥ 0, got {rounds}")
    if rounds == 0:
        return 0.0
    dpa = _library()
    if method == "rdp":
        orders, rdp = _rdp_of_one_round(sampling_rate, noise_multiplier)
        # What RdpAccountant.compose(event, rounds) computes: rounds × one round's RDP.
        eps, _ = dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)
        return float(eps)
    accountant = dpa.pld.PLDAccountant()
    accountant.compose(_event(dpa, sampling_rate, noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    rounds: int,
    method: str = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """The smallest z (to ``rel_tol``) with ε(q, z, T) ≤ ``target_epsilon`` at δ.

    Bisection on log z: ε falls as z grows. PrivacyError when even z = 10⁴ is not enough.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"target ε must be positive and finite, got {target_epsilon}")
    if rounds < 1:
        raise PrivacyError(f"rounds must be ≥ 1, got {rounds}")

    def fits(z: float) -> bool:
        return epsilon_spent(sampling_rate, z, rounds, delta, method) <= target_epsilon

    lo, hi = MIN_NOISE, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 4
        if hi > MAX_NOISE:
            raise PrivacyError(
                f"ε ≤ {target_epsilon} over {rounds} rounds at q = {sampling_rate} needs "
                f"a noise multiplier above {MAX_NOISE:g}: fewer rounds or a larger ε"
            )
    if fits(lo):
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class PrivacyBudget:
    """The most (ε, δ) a run may spend."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise PrivacyError(f"budget ε must be positive, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"budget δ must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class BudgetStatus:
    """What ``rounds`` rounds spent and what one more would."""

    budget: PrivacyBudget
    rounds: int
    epsilon: float  # spent after ``rounds``
    next_epsilon: float  # after ``rounds + 1``

    @property
    def allows_next(self) -> bool:
        """True when round ``rounds + 1`` keeps ε within the budget."""
        return self.next_epsilon <= self.budget.epsilon


def budget_status(
    budget: PrivacyBudget,
    sampling_rate: float,
    noise_multiplier: float,
    rounds_done: int,
    method: str = "rdp",
) -> BudgetStatus:
    """(ε after ``rounds_done``, ε after one more) at the budget's δ."""
    spent = epsilon_spent(sampling_rate, noise_multiplier, rounds_done, budget.delta, method)
    nxt = epsilon_spent(sampling_rate, noise_multiplier, rounds_done + 1, budget.delta, method)
    return BudgetStatus(budget, rounds_done, spent, nxt)


def max_rounds(
    budget: PrivacyBudget,
    sampling_rate: float,
    noise_multiplier: float,
    method: str = "rdp",
    ceiling: int = 10**7,
) -> int:
    """The most rounds whose ε stays within the budget (``ceiling`` if it is never reached)."""

    def fits(t: int) -> bool:
        return epsilon_spent(sampling_rate, noise_multiplier, t, budget.delta, method) <= (
            budget.epsilon
        )

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < ceiling and fits(hi):
        lo, hi = hi, min(hi * 2, ceiling)
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
