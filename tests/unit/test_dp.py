"""Unit tests for DP-FedAvg's clip–sum–noise–divide (aggregator/dp.py), seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.clipping import AdaptiveClipConfig, ClipState, adapt_bound
from aggregator.dp import DPConfig, DPConfigError, DPFedAvgRound, update_noise_multiplier
from aggregator.strategy import AggregationError

SHAPES = {"w": (2,), "b": (1,)}


def _two_updates(rnd: DPFedAvgRound) -> None:
    # ‖([3, 0], [4])‖ = 5 → clipped to C = 1: ([0.6, 0], [0.8]); ([0.3, 0], [0]) fits.
    rnd.add({"w": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)})
    rnd.add({"w": np.array([0.3, 0.0], np.float32), "b": np.array([0.0], np.float32)})


def test_clipped_sum_is_divided_by_the_expected_clients_not_by_those_that_came() -> None:
    # Σ = ([0.9, 0], [0.8]); m = 4 (2 came): ([0.225, 0], [0.2]). Noise ≈ 0 with z tiny.
    cfg = DPConfig(noise_multiplier=1e-12, expected_clients=4, clip=1.0)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())
    _two_updates(rnd)

    mean = rnd.noised_mean(np.random.default_rng(0))

    np.testing.assert_allclose(mean["w"], [0.225, 0.0], atol=1e-7)
    np.testing.assert_allclose(mean["b"], [0.2], atol=1e-7)
    assert rnd.count == 2 and rnd.clipper.unclipped == 1


def test_noise_is_normal_with_stddev_z_times_c_on_the_sum_drawn_per_tensor_in_order() -> None:
    cfg = DPConfig(noise_multiplier=1.1, expected_clients=4, clip=1.0)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())
    _two_updates(rnd)

    mean = rnd.noised_mean(np.random.default_rng(42))

    rng = np.random.default_rng(42)
    noise_w, noise_b = rng.normal(0, 1.1, size=(2,)), rng.normal(0, 1.1, size=(1,))
    np.testing.assert_allclose(mean["w"], (np.array([0.9, 0.0]) + noise_w) / 4, rtol=1e-6)
    np.testing.assert_allclose(mean["b"], (np.array([0.8]) + noise_b) / 4, rtol=1e-6)
    assert rnd.noise_stddev == pytest.approx(1.1)


def test_the_noise_on_the_mean_has_stddev_z_c_over_m() -> None:
    # 200,000 coordinates, no update: the sample stddev is within 1 % of z·C/m = 0.04 and the
    # mean near 0 (seeded: the same draws every run).
    cfg = DPConfig(noise_multiplier=0.8, expected_clients=10, clip=0.5)
    rnd = DPFedAvgRound(cfg, {"w": (200_000,)}, cfg.initial_clip())

    mean = rnd.noised_mean(np.random.default_rng(1))

    assert float(np.std(mean["w"])) == pytest.approx(0.8 * 0.5 / 10, rel=0.01)
    assert abs(float(np.mean(mean["w"]))) < 5 * 0.04 / math.sqrt(200_000)  # 5 standard errors


def test_sample_counts_do_not_weight_the_sum() -> None:
    # add() takes no sample count: two updates of 1 and 1,000 samples count the same.
    cfg = DPConfig(noise_multiplier=1e-12, expected_clients=2, clip=10.0)
    rnd = DPFedAvgRound(cfg, {"w": (1,)}, cfg.initial_clip())
    rnd.add({"w": np.array([1.0])})
    rnd.add({"w": np.array([3.0])})

    np.testing.assert_allclose(rnd.noised_mean(np.random.default_rng(0))["w"], [2.0])


def test_add_returns_the_norm_before_clipping() -> None:
    cfg = DPConfig(noise_multiplier=1.0, expected_clients=2, clip=1.0)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())

    assert rnd.add({"w": np.array([3.0, 0.0]), "b": np.array([4.0])}) == 5.0


def test_a_bad_update_is_refused_and_not_folded() -> None:
    cfg = DPConfig(noise_multiplier=1e-12, expected_clients=1, clip=1.0)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())

    with pytest.raises(AggregationError):
        rnd.add({"w": np.array([np.nan, 0.0]), "b": np.array([0.0])})
    with pytest.raises(AggregationError):
        rnd.add({"w": np.array([1.0])})

    assert rnd.count == 0
    np.testing.assert_allclose(rnd.noised_mean(np.random.default_rng(0))["w"], [0, 0], atol=1e-9)


def test_update_noise_multiplier_by_hand() -> None:
    # z = 1, σ_b = m/20 = 5: z_Δ = (1 − 1/100)^(−1/2).
    z_update = update_noise_multiplier(1.0, 5.0)

    assert z_update == pytest.approx(1 / math.sqrt(0.99))
    # The two releases together: (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) = z.
    assert (z_update**-2 + 10.0**-2) ** -0.5 == pytest.approx(1.0)
    assert update_noise_multiplier(1.3, 0.0) == 1.3


def test_a_count_noise_too_small_for_z_is_refused() -> None:
    with pytest.raises(DPConfigError, match="σ_b"):
        update_noise_multiplier(2.0, 1.0)


def test_adaptive_round_noises_the_update_with_z_delta_and_then_moves_the_bound() -> None:
    adaptive = AdaptiveClipConfig(initial_bound=1.0, count_stddev=5.0, learning_rate=0.2)
    cfg = DPConfig(noise_multiplier=1.0, expected_clients=100, adaptive=adaptive)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())
    _two_updates(rnd)

    mean, nxt = rnd.finish(np.random.default_rng(9))

    rng = np.random.default_rng(9)
    sigma = 1 / math.sqrt(0.99)  # z_Δ · C with C = 1
    expected_w = (np.array([0.9, 0.0]) + rng.normal(0, sigma, size=(2,))) / 100
    rng.normal(0, sigma, size=(1,))  # b's noise
    expected_state = adapt_bound(adaptive, ClipState(1.0), 1, 100, rng)
    np.testing.assert_allclose(mean["w"], expected_w, rtol=1e-6)
    assert nxt == expected_state


def test_a_fixed_bound_stays_where_it_is() -> None:
    cfg = DPConfig(noise_multiplier=1.0, expected_clients=10, clip=0.7)
    rnd = DPFedAvgRound(cfg, SHAPES, cfg.initial_clip())
    _two_updates(rnd)

    _, nxt = rnd.finish(np.random.default_rng(0))

    assert nxt == ClipState(0.7, 0)


def test_adaptive_bound_without_count_noise_is_refused_under_dp() -> None:
    with pytest.raises(DPConfigError, match="count_stddev"):
        DPConfig(1.0, 10, adaptive=AdaptiveClipConfig(initial_bound=0.1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "expected_clients": 10},
        {"noise_multiplier": 1.0, "expected_clients": 0},
        {"noise_multiplier": 1.0, "expected_clients": 10, "clip": -1.0},
    ],
)
def test_bad_dp_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(DPConfigError):
        DPConfig(**kwargs)  # type: ignore[arg-type]
