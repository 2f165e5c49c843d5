"""The cap on one client's share of a round's weight (aggregator/strategy.py), and finite results.

Hand-made deltas and sample counts; each expected mean is written out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.strategy import AggregationError, StreamingFedAvg, share_cap

SHAPES = {"w": (2,)}


def _delta(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(2, value, dtype=np.float32)}


# --- share_cap: the pure rule ----------------------------------------------------------------
def test_no_cap_when_nobody_is_over_the_share() -> None:
    assert share_cap([10, 10, 10], folded=0, max_share=0.5) == math.inf


def test_no_cap_without_a_share_limit() -> None:
    assert share_cap([10**12, 1], folded=0, max_share=1.0) == math.inf


def test_the_heaviest_is_capped_to_exactly_the_share() -> None:
    cap = share_cap([100, 10, 10], folded=0, max_share=0.5)

    assert cap == pytest.approx(20.0)  # 20 / (20 + 10 + 10) = 0.5


def test_a_liar_among_equal_clients_gets_no_more_than_the_share() -> None:
    cap = share_cap([2**40 - 1, 300, 300, 300], folded=0, max_share=0.25)

    assert cap == pytest.approx(300.0)  # 300 / 1200 = 0.25


def test_folded_samples_count_in_the_total() -> None:
    cap = share_cap([100], folded=100, max_share=0.25)

    assert cap / (cap + 100) == pytest.approx(0.25)


def test_two_heavy_clients_are_both_capped() -> None:
    cap = share_cap([1000, 900, 10, 10, 10, 10], folded=0, max_share=0.3)
    weights = [min(n, cap) for n in (1000, 900, 10, 10, 10, 10)]

    assert max(weights) / sum(weights) == pytest.approx(0.3)
    assert weights[0] == weights[1] == cap


def test_too_few_clients_for_the_share_get_equal_weights() -> None:
    # Two clients cannot each have at most a quarter: the smallest largest share is a half.
    assert share_cap([100, 10], folded=0, max_share=0.25) == 10.0


# --- StreamingFedAvg with a share cap ----------------------------------------------------------
def test_a_heavy_client_moves_the_mean_by_its_capped_share_only() -> None:
    acc = StreamingFedAvg(SHAPES, max_share=0.5)
    acc.add(_delta(1.0), 10, "a")
    acc.add(_delta(1.0), 10, "b")
    acc.add(_delta(-100.0), 2**40 - 1, "liar")

    mean = acc.mean_delta()["w"]

    # liar capped at 20 = the two others together: (10 + 10 − 100·20) / 40
    np.testing.assert_allclose(mean, [(10 + 10 - 2000) / 40] * 2, rtol=1e-6)
    assert acc.capped() == [("liar", 2**40 - 1, pytest.approx(20.0))]


def test_without_anyone_over_the_share_the_mean_is_plain_fedavg() -> None:
    acc = StreamingFedAvg(SHAPES, max_share=0.5)
    for value, n in ((1.0, 10), (2.0, 30), (4.0, 40)):
        acc.add(_delta(value), n)

    np.testing.assert_allclose(acc.mean_delta()["w"], [(10 + 60 + 160) / 80] * 2, rtol=1e-6)
    assert acc.capped() == []


def test_clients_folded_early_are_summed_at_full_weight() -> None:
    # max_share 0.5 holds back the 2 heaviest; the 8 light ones go into the sum at once.
    acc = StreamingFedAvg(SHAPES, max_share=0.5)
    for i in range(8):
        acc.add(_delta(float(i)), 10, f"light-{i}")
    acc.add(_delta(100.0), 50, "heavy-1")
    acc.add(_delta(-100.0), 60, "heavy-2")

    expected = (sum(10.0 * i for i in range(8)) + 100 * 50 - 100 * 60) / 190
    np.testing.assert_allclose(acc.mean_delta()["w"], [expected] * 2, rtol=1e-6)
    assert len(acc._held) == 2


def test_a_liar_arriving_last_is_capped_like_one_arriving_first() -> None:
    first, last = StreamingFedAvg(SHAPES, 0.25), StreamingFedAvg(SHAPES, 0.25)
    honest = [(_delta(float(i)), 100) for i in range(6)]
    first.add(_delta(-50.0), 10**9, "liar")
    for d, n in honest:
        first.add(d, n)
        last.add(d, n)
    last.add(_delta(-50.0), 10**9, "liar")

    np.testing.assert_allclose(first.mean_delta()["w"], last.mean_delta()["w"], rtol=1e-6)
    assert first.capped()[0][0] == last.capped()[0][0] == "liar"


# --- finite results ------------------------------------------------------------------------------
def test_a_non_finite_delta_is_refused() -> None:
    acc = StreamingFedAvg(SHAPES)

    with pytest.raises(AggregationError, match="non-finite"):
        acc.add({"w": np.array([1.0, np.nan], np.float32)}, 5)
    assert acc.count == 0


def test_a_result_that_overflows_fp32_is_refused_not_returned() -> None:
    acc = StreamingFedAvg(SHAPES)
    acc.add(_delta(3.0e38), 5)

    with pytest.raises(AggregationError, match="overflows fp32"):
        acc.apply({"w": np.full(2, 3.0e38, np.float32)})


def test_the_fp64_sum_of_extreme_finite_values_stays_finite() -> None:
    acc = StreamingFedAvg(SHAPES)
    for _ in range(3):
        acc.add(_delta(3.4e38), 2**40 - 1)

    np.testing.assert_allclose(acc.mean_delta()["w"], [3.4e38] * 2, rtol=1e-6)


def test_the_share_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="max_share"):
        StreamingFedAvg(SHAPES, max_share=0.0)
