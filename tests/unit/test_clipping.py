"""Unit tests for norm clipping and the adaptive bound (aggregator/clipping.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aggregator.clipping import (
    MIN_BOUND,
    AdaptiveClipConfig,
    ClipError,
    ClipState,
    RoundClipper,
    adapt_bound,
    clip_factor,
    clip_update,
    initial_clip_state,
)
from aggregator.strategy import StreamingFedAvg


def test_an_update_over_the_bound_is_scaled_to_it_over_all_tensors_together() -> None:
    # ‖([3], [4])‖ = 5 → times 1/5.
    clipped, norm = clip_update({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)

    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-7)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-7)
    assert clipped["a"].dtype == np.float32


def test_an_update_within_the_bound_is_unchanged() -> None:
    delta = {"a": np.array([0.3, -0.4], dtype=np.float32)}

    clipped, norm = clip_update(delta, 0.5)

    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["a"], delta["a"])


def test_clip_factor() -> None:
    assert clip_factor(2.0, 4.0) == 1.0
    assert clip_factor(8.0, 4.0) == 0.5


def test_round_clipper_counts_the_updates_within_the_bound() -> None:
    clipper = RoundClipper(1.0)
    for v in (0.5, 1.0, 3.0):
        clipper.clip({"a": np.array([v])})

    assert (clipper.count, clipper.unclipped) == (3, 2)


def test_round_clipper_refuses_a_non_finite_update_without_counting_it() -> None:
    clipper = RoundClipper(1.0)

    with pytest.raises(ClipError, match="non-finite"):
        clipper.clip({"a": np.array([np.inf, 1.0])})
    assert clipper.count == 0


def test_clipped_updates_keep_fedavg_weighting_in_the_streaming_sum() -> None:
    # Δ₁ = [10, 0] (n=1) clipped to [2, 0]; Δ₂ = [0, 1] (n=3) unchanged:
    # mean = (1·[2, 0] + 3·[0, 1]) / 4 = [0.5, 0.75].
    clipper, acc = RoundClipper(2.0), StreamingFedAvg({"a": (2,)})
    for value, n in (([10.0, 0.0], 1), ([0.0, 1.0], 3)):
        clipped, _ = clipper.clip({"a": np.array(value, dtype=np.float32)})
        acc.add(clipped, n)

    np.testing.assert_allclose(acc.mean_delta()["a"], [0.5, 0.75], rtol=1e-7)


def test_geometric_update_by_hand() -> None:
    # 3 of 4 within C = 1, γ = 0.5, η_C = 0.2: C' = exp(−0.2 · (0.75 − 0.5)).
    cfg = AdaptiveClipConfig(initial_bound=1.0)

    state = adapt_bound(cfg, initial_clip_state(cfg), unclipped=3, denominator=4)

    assert state.bound == pytest.approx(math.exp(-0.05), rel=1e-12)
    assert state.rounds == 1


def test_the_bound_grows_when_too_few_updates_fit() -> None:
    cfg = AdaptiveClipConfig(initial_bound=1.0, target_quantile=0.9, learning_rate=1.0)

    state = adapt_bound(cfg, initial_clip_state(cfg), unclipped=0, denominator=10)

    assert state.bound == pytest.approx(math.exp(0.9))


def test_the_count_noise_is_one_seeded_normal_draw() -> None:
    cfg = AdaptiveClipConfig(initial_bound=2.0, count_stddev=0.5)

    state = adapt_bound(cfg, ClipState(2.0), 6, 10.0, np.random.default_rng(3))

    noise = np.random.default_rng(3).normal(0.0, 0.5)
    assert state.bound == pytest.approx(2.0 * math.exp(-0.2 * ((6 + noise) / 10.0 - 0.5)))


def test_count_noise_without_a_generator_is_refused() -> None:
    cfg = AdaptiveClipConfig(initial_bound=2.0, count_stddev=0.5)

    with pytest.raises(ClipError, match="random generator"):
        adapt_bound(cfg, ClipState(2.0), 6, 10.0)


def test_max_bound_caps_and_min_bound_floors_the_bound() -> None:
    capped = AdaptiveClipConfig(initial_bound=1.0, learning_rate=5.0, max_bound=2.0)
    assert adapt_bound(capped, ClipState(1.0), 0, 1).bound == 2.0

    shrinking = AdaptiveClipConfig(initial_bound=1.0, learning_rate=100.0)
    assert adapt_bound(shrinking, ClipState(1e-11), 1, 1).bound == MIN_BOUND


def test_a_round_without_updates_leaves_the_bound() -> None:
    cfg = AdaptiveClipConfig(initial_bound=1.0)

    assert adapt_bound(cfg, ClipState(1.5, 4), 0, 0) == ClipState(1.5, 4)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_bound_converges_to_the_target_quantile_of_a_norm_stream(quantile: float) -> None:
    # Norms ~ lognormal(1, 0.5), 50 per round, starting 30× too low (Andrew et al.'s C₀ = 0.1).
    rng = np.random.default_rng(0)
    cfg = AdaptiveClipConfig(initial_bound=0.1, target_quantile=quantile, learning_rate=0.2)
    state, late_bounds, late_fit = initial_clip_state(cfg), [], []
    for r in range(400):
        norms = rng.lognormal(1.0, 0.5, size=50)
        unclipped = int((norms <= state.bound).sum())
        if r >= 300:
            late_bounds.append(state.bound)
            late_fit.append(unclipped / 50)
        state = adapt_bound(cfg, state, unclipped, 50)

    true_quantile = math.exp(1.0 + 0.5 * {0.5: 0.0, 0.9: 1.2815516}[quantile])
    assert abs(math.log(np.mean(late_bounds) / true_quantile)) < 0.05
    assert np.mean(late_fit) == pytest.approx(quantile, abs=0.03)


def test_state_survives_json_and_resumed_adaptation_is_identical() -> None:
    cfg = AdaptiveClipConfig(initial_bound=0.3, learning_rate=0.7)
    counts = [(3, 10), (9, 10), (5, 10), (0, 10), (10, 10), (4, 10)]
    straight = initial_clip_state(cfg)
    for u, d in counts:
        straight = adapt_bound(cfg, straight, u, d)

    resumed = initial_clip_state(cfg)
    for u, d in counts[:3]:
        resumed = adapt_bound(cfg, resumed, u, d)
    resumed = ClipState.from_dict(json.loads(json.dumps(resumed.to_dict())))
    for u, d in counts[3:]:
        resumed = adapt_bound(cfg, resumed, u, d)

    assert resumed == straight


@pytest.mark.parametrize(
    "doc",
    [{}, {"bound": -1.0, "rounds": 0}, {"bound": "1", "rounds": 0}, {"bound": 1.0, "rounds": -2}],
)
def test_an_unreadable_saved_state_is_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ClipError):
        ClipState.from_dict(doc)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_bound": 0.0},
        {"initial_bound": 1.0, "target_quantile": 1.0},
        {"initial_bound": 1.0, "learning_rate": 0.0},
        {"initial_bound": 1.0, "count_stddev": -1.0},
        {"initial_bound": 1.0, "max_bound": 0.5},
    ],
)
def test_bad_adaptive_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ClipError):
        AdaptiveClipConfig(**kwargs)


def test_a_non_positive_fixed_bound_is_refused() -> None:
    with pytest.raises(ClipError, match="positive"):
        RoundClipper(0.0)
