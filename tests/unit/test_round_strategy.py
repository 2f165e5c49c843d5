"""One round assembled from the configured strategy (aggregator/round_strategy.py), on fixed
vectors: clipping, the rules, the server optimizer, DP, the state carried and checkpointed."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.robust import coordinate_median
from aggregator.round_strategy import (
    RoundAggregate,
    RoundStrategy,
    StrategyError,
    strategy_settings,
)
from aggregator.strategy import AggregationError, StreamingFedAvg

SHAPES = {"w": (2, 2), "b": (3,)}
Tensors = dict[str, np.ndarray]


def _params() -> Tensors:
    return {"w": np.array([[1, -2], [0.5, 3]], np.float32), "b": np.zeros(3, np.float32)}


def _delta(seed: int, scale: float = 0.1) -> Tensors:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()}


def _norm(d: Tensors) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))


def _strategy(dp_seed: int = 0, **overrides: Any) -> RoundStrategy:
    cfg = replace(AggregatorConfig(), **overrides)
    return RoundStrategy(strategy_settings(cfg), SHAPES, np.random.default_rng(dp_seed))


def _round(strategy: RoundStrategy, deltas: list[Tensors], samples: list[int]) -> RoundAggregate:
    agg = strategy.open_round(len(deltas))
    for i, (d, n) in enumerate(zip(deltas, samples, strict=True)):
        agg.add(d, n, f"c{i}")
    return agg


def _equal(a: Tensors, b: Tensors) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)


# --- FedAvg and clipping -------------------------------------------------------------------
def test_fedavg_without_clipping_is_bit_for_bit_the_streaming_fedavg_model() -> None:
    deltas, samples = [_delta(1), _delta(2), _delta(3)], [10, 30, 20]
    agg = _round(_strategy(clip="none"), deltas, samples)
    reference = StreamingFedAvg(SHAPES, 0.5)
    for d, n in zip(deltas, samples, strict=True):
        reference.add(d, n)

    assert _equal(agg.apply(_params()), reference.apply(_params()))


def test_default_adaptive_clipping_clips_round_1_to_its_own_median_norm() -> None:
    strategy = _strategy(clip_lr=0.5)
    deltas = [_delta(1, 0.1), _delta(2, 0.2), {n: v * 100 for n, v in _delta(3, 0.1).items()}]
    agg = _round(strategy, deltas, [10, 10, 10])
    zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    mean = agg.apply(zeros)
    strategy.close(agg, applied=True)

    median = float(np.median([_norm(d) for d in deltas]))
    assert agg.bound == pytest.approx(median) and agg.clipped == 1
    attacker = {n: deltas[2][n].astype(np.float64) * (median / _norm(deltas[2])) for n in SHAPES}
    for n in SHAPES:  # sample-weighted mean (equal weights), the ×100 update at median length
        want = (deltas[0][n].astype(np.float64) + deltas[1][n] + attacker[n]) / 3
        np.testing.assert_allclose(mean[n], want, rtol=1e-5, atol=1e-7)
    assert strategy.clip is not None  # round 2 starts where round 1 clipped
    assert strategy.clip.bound == pytest.approx(median) and strategy.clip.rounds == 1


def test_round_1_held_for_the_bootstrap_is_bounded_by_the_round_memory() -> None:
    strategy = _strategy(max_round_memory=1000)  # 7 fp32 values a client: 35 clients fit

    strategy.open_round(35)
    with pytest.raises(StrategyError, match="--clip-bound"):
        strategy.open_round(36)


def test_an_update_scaled_x100_counts_as_one_of_the_bound_s_length_at_its_weight() -> None:
    strategy = _strategy(clip="fixed", clip_bound=1.0, max_weight_share=1.0)
    honest, attacker = _delta(1, 0.1), {n: v * 100 for n, v in _delta(2, 0.1).items()}
    agg = _round(strategy, [honest, attacker], [10, 10])
    mean = agg.apply({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})

    scale = 1.0 / _norm(attacker)
    for n in SHAPES:
        expected = (honest[n].astype(np.float64) + attacker[n] * scale) / 2
        np.testing.assert_allclose(mean[n], expected, rtol=1e-6, atol=1e-7)
    assert agg.clipped == 1 and agg.bound == 1.0


def test_the_adaptive_bound_moves_geometrically_after_round_1() -> None:
    strategy = _strategy(clip="adaptive", clip_bound=1.0, clip_lr=0.5)
    agg = _round(strategy, [_delta(1, 0.01), _delta(2, 0.01), _delta(3, 0.01)], [1, 1, 1])
    agg.apply(_params())
    strategy.close(agg, applied=True)

    assert strategy.clip is not None  # all three fit: b̄ = 1, C·exp(−0.5·(1 − 0.5))
    assert strategy.clip.bound == pytest.approx(math.exp(-0.25))


def test_the_adaptive_bound_never_exceeds_the_hard_norm_bound() -> None:
    strategy = _strategy(clip="adaptive", max_update_norm=5.0)
    agg = _round(strategy, [_delta(1, 10.0), _delta(2, 10.0)], [1, 1])
    agg.apply(_params())
    strategy.close(agg, applied=True)

    assert strategy.clip is not None and strategy.clip.bound == 5.0


# --- robust rules ----------------------------------------------------------------------------
def test_the_median_rule_ignores_sample_counts_and_an_outlier() -> None:
    deltas = [_delta(1), _delta(2), {n: v + 1000 for n, v in _delta(3).items()}]
    agg = _round(_strategy(robust="median", clip="none"), deltas, [1, 1, 10**6])
    zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}

    assert _equal(agg.apply(zeros), coordinate_median(deltas))


def test_a_round_holding_rule_refuses_a_selection_over_its_memory_limit() -> None:
    strategy = _strategy(robust="median", max_round_memory=150_000)

    with pytest.raises(StrategyError, match="--max-round-memory"):
        strategy.open_round(1000)


def test_krum_refuses_a_selection_below_2f_plus_3() -> None:
    strategy = _strategy(robust="krum", byzantine=1, min_clients=5)

    with pytest.raises(StrategyError, match="at least 2f \\+ 3 = 5"):
        strategy.check_capacity(4)


def test_an_extended_selection_makes_room_or_keeps_the_round_as_it_was() -> None:
    agg = _strategy(robust="median", max_round_memory=150_000).open_round(2)
    agg.grow(3)
    for i in range(3):
        agg.add(_delta(i), 1)

    with pytest.raises(StrategyError, match="--max-round-memory"):
        agg.grow(100_000)
    with pytest.raises(AggregationError, match="at most 3 updates"):
        agg.add(_delta(9), 1)


def test_a_bad_update_is_refused_and_not_counted() -> None:
    agg = _strategy().open_round(2)
    bad = _delta(1)
    bad["w"][0, 0] = np.nan

    with pytest.raises(AggregationError, match="non-finite"):
        agg.add(bad, 1)
    assert agg.count == 0


# --- server optimizer and the state carried ---------------------------------------------------
def test_a_discarded_round_leaves_optimizer_and_clipping_states_as_they_were() -> None:
    strategy = _strategy(strategy="fedadam", clip="adaptive", clip_bound=1.0)
    before_opt, before_clip = strategy.opt_state, strategy.clip
    agg = _round(strategy, [_delta(1), _delta(2)], [1, 1])
    agg.apply(_params())
    strategy.close(agg, applied=False)

    assert strategy.opt_state is before_opt and strategy.clip is before_clip
    strategy.close(agg, applied=True)
    assert strategy.opt_state.step == 1 and strategy.clip != before_clip


def _run(strategy: RoundStrategy, params: Tensors, rounds: range) -> Tensors:
    for r in rounds:
        deltas = [_delta(10 * r + i, 0.1 * (i + 1)) for i in range(4)]
        agg = _round(strategy, deltas, [5, 10, 15, 20])
        params = agg.apply(params)
        strategy.close(agg, applied=True)
    return params


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedyogi", "clip": "adaptive"},
        {"strategy": "fedavgm", "robust": "trimmed-mean", "trim_fraction": 0.25},
        {
            "strategy": "fedadam",
            "dp_noise_multiplier": 0.7,
            "dp_expected_clients": 40.0,
            "dp_clip": 0.2,
        },
    ],
)
def test_a_strategy_restored_from_its_saved_state_continues_bit_for_bit(
    overrides: dict[str, Any],
) -> None:
    straight = _strategy(dp_seed=3, **overrides)
    expected = _run(straight, _params(), range(6))
    first = _strategy(dp_seed=3, **overrides)
    halfway = _run(first, _params(), range(3))
    tensors, doc = first.state()

    resumed = _strategy(dp_seed=99, **overrides)  # a fresh generator: the saved one wins
    resumed.load_state(tensors, json.loads(json.dumps(doc)))
    final = _run(resumed, halfway, range(3, 6))

    assert _equal(final, expected)
    assert resumed.state()[1] == straight.state()[1]
    assert _equal(resumed.state()[0], straight.state()[0])


def test_a_checkpoint_without_strategy_state_resumes_only_a_stateless_optimizer() -> None:
    _strategy(strategy="fedavg").load_state({}, None)

    with pytest.raises(StrategyError, match="no server-optimizer state"):
        _strategy(strategy="fedavgm").load_state({}, None)


def test_saved_state_of_another_optimizer_is_refused() -> None:
    tensors, doc = _strategy(strategy="fedavgm").state()

    with pytest.raises(StrategyError, match="unusable"):
        _strategy(strategy="fedadam").load_state(tensors, doc)


# --- differential privacy ---------------------------------------------------------------------
DP = {"dp_noise_multiplier": 1.0, "dp_expected_clients": 4.0, "dp_clip": 0.5, "clip": "fixed"}


def test_dp_sums_clipped_updates_unweighted_adds_seeded_noise_and_divides_by_m() -> None:
    deltas = [_delta(1, 0.01), _delta(2, 5.0)]
    agg = _round(_strategy(dp_seed=5, **DP), deltas, [1, 1000])
    zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    out = agg.apply(zeros)

    rng = np.random.default_rng(5)
    for n in SHAPES:
        clipped = deltas[1][n].astype(np.float64) * (0.5 / _norm(deltas[1]))
        noisy = deltas[0][n].astype(np.float64) + clipped
        noisy = noisy + rng.normal(0.0, 0.5, size=SHAPES[n])
        np.testing.assert_allclose(out[n], (noisy / 4.0).astype(np.float32), rtol=1e-6)
    assert agg.clipped == 1 and agg.bound == 0.5


def test_a_discarded_dp_round_still_counts_against_the_budget() -> None:
    strategy = _strategy(**DP)
    agg = _round(strategy, [_delta(1)], [1])
    agg.apply(_params())
    strategy.close(agg, applied=False)

    assert strategy.dp_rounds == 1
    eps = strategy.epsilon()
    assert eps is not None and eps > 0


def test_epsilon_is_none_without_dp_and_grows_with_the_rounds() -> None:
    assert _strategy().epsilon() is None
    strategy = _strategy(**DP)
    spent = []
    for r in range(3):
        agg = _round(strategy, [_delta(r)], [1])
        agg.apply(_params())
        strategy.close(agg, applied=True)
        spent.append(strategy.epsilon())

    assert spent == sorted(spent) and len(set(spent)) == 3


def test_the_budget_refuses_the_round_that_would_exceed_it() -> None:
    cfg = {**DP, "dp_epsilon": 8.0, "dp_noise_multiplier": 1.0, "rounds": 2}
    strategy = _strategy(**cfg)
    refusals = []
    for r in range(3):
        refusals.append(strategy.budget_refusal())
        agg = _round(strategy, [_delta(r)], [1])
        agg.apply(_params())
        strategy.close(agg, applied=True)

    assert refusals[:2] == [None, None]
    assert refusals[2] is not None and "round 3 would spend" in refusals[2]


def test_a_noise_multiplier_too_small_for_the_budget_is_refused_at_start() -> None:
    with pytest.raises(StrategyError, match="allows 0 rounds"):
        strategy_settings(replace(AggregatorConfig(), **DP, dp_epsilon=0.1, rounds=20))


def test_without_a_noise_multiplier_the_budget_sets_the_smallest_that_fits() -> None:
    cfg = replace(AggregatorConfig(), **{**DP, "dp_noise_multiplier": None}, dp_epsilon=4.0)
    settings = strategy_settings(cfg)

    assert settings.dp is not None
    z = settings.dp.config.noise_multiplier
    assert 0.5 < z < 20
    assert settings.dp.sampling_rate == cfg.fraction == 1.0


def test_adaptive_clipping_under_dp_noises_the_count_too() -> None:
    cfg = replace(AggregatorConfig(), **{**DP, "clip": "adaptive", "dp_noise_multiplier": 0.05})
    settings = strategy_settings(cfg)

    assert settings.dp is not None and settings.dp.config.adaptive is not None
    assert settings.dp.config.adaptive.count_stddev == pytest.approx(4.0 / 20)


def test_with_few_clients_the_count_noise_is_at_least_twice_z() -> None:
    cfg = replace(AggregatorConfig(), **{**DP, "clip": "adaptive", "dp_noise_multiplier": 2.0})
    settings = strategy_settings(cfg)

    assert settings.dp is not None and settings.dp.config.adaptive is not None
    assert settings.dp.config.adaptive.count_stddev == 4.0
    assert settings.dp.config.update_multiplier == pytest.approx(2.0 / math.sqrt(1 - 1 / 16))
