"""Unit tests for the privacy accounting (aggregator/privacy.py) against dp-accounting itself
and an independent computation (the exact ε of the Gaussian mechanism, without sampling)."""

from __future__ import annotations

import itertools
import math
from types import ModuleType

import pytest

from aggregator.privacy import (
    PrivacyBudget,
    PrivacyError,
    budget_status,
    epsilon_spent,
    max_rounds,
    noise_multiplier_for,
)
from tests.conftest import running_in_ci


def _dp_accounting() -> ModuleType:
    """The library; skipped without it locally, a failure under CI (it installs the dp extra)."""
    try:
        import dp_accounting
    except ImportError:
        if running_in_ci():
            pytest.fail("CI=true but dp-accounting is missing (the dp extra)", pytrace=False)
        pytest.skip("needs dp-accounting: pip install 'fedmq[dp]'")
    return dp_accounting


@pytest.fixture(autouse=True)
def _needs_the_library() -> None:
    _dp_accounting()


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _gaussian_exact_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The tight ε of T Gaussian mechanisms (no sampling): μ-GDP with μ = √T/z (Dong, Roth &
    Su 2019), δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2), inverted by bisection."""
    mu = math.sqrt(rounds) / noise_multiplier
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        d = _phi(-mid / mu + mu / 2) - math.exp(mid) * _phi(-mid / mu - mu / 2)
        lo, hi = (mid, hi) if d > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("rounds", [1, 100, 10_000])
def test_epsilon_equals_dp_accountings_rdp_accountant_called_directly(rounds: int) -> None:
    dpa = _dp_accounting()
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), rounds)

    assert epsilon_spent(0.01, 1.1, rounds, 1e-5) == accountant.get_epsilon(1e-5)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 10), (10.0, 20)])
def test_without_sampling_rdp_is_an_upper_bound_close_to_the_exact_gaussian_epsilon(
    z: float, rounds: int
) -> None:
    exact = _gaussian_exact_epsilon(z, rounds, 1e-5)

    eps = epsilon_spent(1.0, z, rounds, 1e-5)

    assert exact <= eps <= 1.15 * exact


def test_without_sampling_rdp_matches_the_closed_form() -> None:
    # Gaussian RDP: T·α/(2z²); to (ε, δ): min over α of RDP + log(1 − 1/α) − log(δα)/(α − 1).
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    z, rounds, delta = 2.0, 10, 1e-5
    closed = min(
        rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in orders
        if a > 1.01
    )

    assert epsilon_spent(1.0, z, rounds, delta) == pytest.approx(closed, rel=1e-12)


def test_epsilon_grows_with_the_rounds() -> None:
    eps = [epsilon_spent(0.01, 1.1, t, 1e-5) for t in (0, 1, 10, 100, 1000, 10_000)]

    assert eps[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(eps))


def test_epsilon_grows_with_the_sampling_rate() -> None:
    eps = [epsilon_spent(q, 1.1, 100, 1e-5) for q in (0.001, 0.01, 0.1, 1.0)]

    assert all(a < b for a, b in itertools.pairwise(eps))


def test_epsilon_falls_as_the_noise_grows() -> None:
    eps = [epsilon_spent(0.1, z, 100, 1e-5) for z in (0.7, 1.1, 2.0, 4.0)]

    assert all(a > b for a, b in itertools.pairwise(eps))


def test_pld_is_tighter_than_rdp() -> None:
    pld = epsilon_spent(0.1, 1.1, 20, 1e-5, method="pld")

    assert 0 < pld < epsilon_spent(0.1, 1.1, 20, 1e-5)


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_noise_for_a_target_round_trips(target: float) -> None:
    # 10 % of the devices per round, 20 rounds, δ = 1e-5 (the DP benchmark).
    z = noise_multiplier_for(target, 1e-5, 0.1, 20, rel_tol=0.02)

    assert epsilon_spent(0.1, z, 20, 1e-5) <= target
    assert epsilon_spent(0.1, z / 1.02, 20, 1e-5) > target


def test_an_unreachable_target_is_refused() -> None:
    with pytest.raises(PrivacyError, match="noise multiplier above"):
        noise_multiplier_for(1e-6, 1e-5, 1.0, 10_000)


def test_budget_status_says_whether_one_more_round_fits() -> None:
    budget = PrivacyBudget(epsilon=epsilon_spent(0.1, 1.1, 5, 1e-5), delta=1e-5)

    at_4, at_5 = budget_status(budget, 0.1, 1.1, 4), budget_status(budget, 0.1, 1.1, 5)

    assert at_4.allows_next and not at_5.allows_next
    assert at_5.epsilon == budget.epsilon
    assert at_5.next_epsilon == epsilon_spent(0.1, 1.1, 6, 1e-5)


def test_max_rounds_is_the_last_round_within_the_budget() -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5)

    t = max_rounds(budget, 0.1, 1.1)

    assert epsilon_spent(0.1, 1.1, t, 1e-5) <= 4.0 < epsilon_spent(0.1, 1.1, t + 1, 1e-5)


def test_max_rounds_is_zero_when_not_even_one_round_fits() -> None:
    assert max_rounds(PrivacyBudget(0.01, 1e-5), 1.0, 0.5) == 0


@pytest.mark.parametrize(
    ("q", "z", "delta", "method"),
    [(0.0, 1.0, 1e-5, "rdp"), (0.1, 0.0, 1e-5, "rdp"), (0.1, 1.0, 1.0, "rdp"), (0.1, 1, 1e-5, "x")],
)
def test_bad_accounting_parameters_are_refused(
    q: float, z: float, delta: float, method: str
) -> None:
    with pytest.raises(PrivacyError):
        epsilon_spent(q, z, 10, delta, method)


def test_a_budget_needs_a_positive_epsilon_and_a_delta_below_one() -> None:
    with pytest.raises(PrivacyError):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(PrivacyError):
        PrivacyBudget(1.0, 1.0)
