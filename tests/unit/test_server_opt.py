"""Unit tests for the server optimizers (aggregator/server_opt.py) on small fixed vectors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from aggregator.server_opt import (
    STRATEGIES,
    ServerOptConfig,
    ServerOptError,
    ServerOptimizer,
    ServerOptState,
)
from aggregator.strategy import AggregationError, StreamingFedAvg

SHAPES = {"w": (2, 2), "b": (3,)}


def _params() -> dict[str, np.ndarray]:
    return {
        "w": np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32),
        "b": np.array([0.0, 0.25, -1.0], dtype=np.float32),
    }


def _delta(round_no: int) -> dict[str, np.ndarray]:
    """A different fixed delta each round (some coordinates change sign, one stays 0)."""
    rng = np.random.default_rng(100 + round_no)
    d = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in SHAPES.items()}
    d["b"][2] = 0.0
    return d


def _run(cfg: ServerOptConfig, rounds: int) -> tuple[dict[str, np.ndarray], ServerOptState]:
    opt = ServerOptimizer(cfg, SHAPES)
    params, state = _params(), opt.initial_state()
    for r in range(rounds):
        params, state = opt.step(state, params, _delta(r))
    return params, state


def _reference(cfg: ServerOptConfig, rounds: int) -> dict[str, list[float]]:
    """Reddi et al.'s Algorithm 2 written on Δ (as in the paper), one float at a time."""
    out: dict[str, list[float]] = {}
    for name in SHAPES:
        x = [float(v) for v in _params()[name].ravel()]
        m = [0.0] * len(x)
        v = [cfg.tau**2] * len(x)
        for r in range(rounds):
            d = [float(a) for a in _delta(r)[name].ravel()]
            for i, di in enumerate(d):
                if cfg.strategy == "fedavg":
                    x[i] += cfg.lr * di
                    continue
                if cfg.strategy == "fedavgm":
                    m[i] = cfg.momentum * m[i] + di
                    x[i] += cfg.lr * m[i]
                    continue
                m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * di
                if cfg.strategy == "fedadagrad":
                    v[i] += di * di
                elif cfg.strategy == "fedadam":
                    v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * di * di
                else:
                    sign = (v[i] > di * di) - (v[i] < di * di)
                    v[i] -= (1 - cfg.beta2) * di * di * sign
                x[i] += cfg.lr * m[i] / (math.sqrt(v[i]) + cfg.tau)
        out[name] = x
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_matches_the_papers_algorithm_written_on_delta(strategy: str) -> None:
    cfg = ServerOptConfig(strategy, server_lr=0.3, momentum=0.8, beta1=0.7, beta2=0.95, tau=0.01)

    params, state = _run(cfg, rounds=5)

    expected = _reference(cfg, rounds=5)
    for name in SHAPES:
        np.testing.assert_allclose(params[name].ravel(), expected[name], rtol=2e-5, atol=1e-6)
    assert state.step == 5


def test_fedavg_at_lr_1_is_bit_identical_to_streaming_fedavg_apply() -> None:
    rng = np.random.default_rng(7)
    acc = StreamingFedAvg(SHAPES)
    for n in (10, 30, 60):
        acc.add({k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}, n)
    opt = ServerOptimizer(ServerOptConfig(), SHAPES)

    new, _ = opt.step(opt.initial_state(), _params(), acc.mean_delta())

    today = acc.apply(_params())
    for name in SHAPES:
        assert new[name].dtype == np.float32
        assert np.array_equal(new[name], today[name])


def test_fedavg_scales_the_delta_by_the_server_lr() -> None:
    opt = ServerOptimizer(ServerOptConfig("fedavg", server_lr=0.5), {"b": (2,)})
    new, state = opt.step(
        opt.initial_state(), {"b": np.array([1.0, 1.0], np.float32)}, {"b": np.array([2.0, -4.0])}
    )
    np.testing.assert_array_equal(new["b"], [2.0, -1.0])
    assert state.m == {} and state.v == {}


def test_fedavgm_by_hand() -> None:
    # μ = 0.5, η = 1: m₁ = −[2, 0] → x₁ = [2, 0]; m₂ = 0.5·m₁ − [2, 2] = −[3, 2] → x₂ = [5, 2].
    opt = ServerOptimizer(ServerOptConfig("fedavgm", momentum=0.5), {"b": (2,)})
    x, state = {"b": np.zeros(2, np.float32)}, opt.initial_state()

    x, state = opt.step(state, x, {"b": np.array([2.0, 0.0], np.float32)})
    np.testing.assert_array_equal(x["b"], [2.0, 0.0])
    x, state = opt.step(state, x, {"b": np.array([2.0, 2.0], np.float32)})

    np.testing.assert_array_equal(x["b"], [5.0, 2.0])
    np.testing.assert_array_equal(state.m["b"], [-3.0, -2.0])  # the pseudo-gradient's moment


def test_fedadagrad_by_hand() -> None:
    # β₁ = 0: m = g = −Δ = [3, −3]; v = τ² + g² = 16 + 9 = 25; x ← x − η·m/(√v + τ) = x + 0.9·Δ/9.
    cfg = ServerOptConfig("fedadagrad", server_lr=0.9, beta1=0.0, tau=4.0)
    opt = ServerOptimizer(cfg, {"b": (2,)})

    x, state = opt.step(
        opt.initial_state(),
        {"b": np.array([1.0, 2.0], np.float32)},
        {"b": np.array([-3.0, 3.0], np.float32)},
    )

    np.testing.assert_allclose(x["b"], [0.7, 2.3], rtol=1e-6)
    np.testing.assert_array_equal(state.v["b"], [25.0, 25.0])
    np.testing.assert_array_equal(state.m["b"], [3.0, -3.0])


def test_fedadam_first_step_by_hand() -> None:
    # g = [−1, 2]; m = 0.1·g; v = 0.99·τ² + 0.01·g²; x = −η·m/(√v + τ).
    cfg = ServerOptConfig("fedadam", server_lr=0.1)
    opt = ServerOptimizer(cfg, {"b": (2,)})

    x, _ = opt.step(
        opt.initial_state(), {"b": np.zeros(2, np.float32)}, {"b": np.array([1.0, -2.0])}
    )

    v = 0.99 * 1e-6 + 0.01 * np.array([1.0, 4.0])
    expected = -0.1 * np.array([-0.1, 0.2]) / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(x["b"], expected, rtol=1e-6)


def test_fedyogi_lowers_v_additively_where_adam_decays_it() -> None:
    # After a large g (v ≈ 0.05·g² = 5), a zero g: Yogi keeps v (sign(v − 0)·0), Adam multiplies
    # it by β₂; a small g: Yogi subtracts (1−β₂)·g², never more than v.
    big, small = {"b": np.array([10.0], np.float32)}, {"b": np.array([1.0], np.float32)}
    x0 = {"b": np.zeros(1, np.float32)}
    vs = {}
    for kind in ("fedyogi", "fedadam"):
        opt = ServerOptimizer(ServerOptConfig(kind, beta2=0.95, tau=1e-6), {"b": (1,)})
        _, s1 = opt.step(opt.initial_state(), x0, big)
        _, s2 = opt.step(s1, x0, small)
        vs[kind] = (float(s1.v["b"][0]), float(s2.v["b"][0]))

    assert vs["fedyogi"][0] == pytest.approx(5.0, rel=1e-6)
    assert vs["fedyogi"][1] == pytest.approx(5.0 - 0.05 * 1.0, rel=1e-6)
    assert vs["fedadam"][1] == pytest.approx(0.95 * 5.0 + 0.05 * 1.0, rel=1e-6)


def test_fedadam_with_bias_correction_first_step_moves_each_coordinate_by_about_lr() -> None:
    cfg = ServerOptConfig("fedadam", server_lr=0.01, tau=1e-9, bias_correction=True)
    opt = ServerOptimizer(cfg, {"b": (3,)})

    x, _ = opt.step(
        opt.initial_state(), {"b": np.zeros(3, np.float32)}, {"b": np.array([1e-2, -5.0, 40.0])}
    )

    np.testing.assert_allclose(x["b"], [0.01, -0.01, 0.01], rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_from_a_serialized_state_is_bit_identical(strategy: str) -> None:
    cfg = ServerOptConfig(strategy, server_lr=0.2, bias_correction=True)
    straight, straight_state = _run(cfg, rounds=6)
    # Run 3 rounds, checkpoint as the aggregator would (safetensors + JSON), restore, run 3.
    opt = ServerOptimizer(cfg, SHAPES)
    params, state = _params(), opt.initial_state()
    for r in range(3):
        params, state = opt.step(state, params, _delta(r))
    tensors, scalars = state.to_dict()
    blob, text = (
        st_save({**tensors, **{f"x/{k}": v for k, v in params.items()}}),
        json.dumps(scalars),
    )
    loaded = st_load(blob)

    fresh = ServerOptimizer(cfg, SHAPES)
    state = fresh.state_from_dict(
        {k: v for k, v in loaded.items() if not k.startswith("x/")}, json.loads(text)
    )
    params = {k[2:]: v for k, v in loaded.items() if k.startswith("x/")}
    for r in range(3, 6):
        params, state = fresh.step(state, params, _delta(r))

    for name in SHAPES:
        assert np.array_equal(params[name], straight[name])
        for moment in ("m", "v"):
            a, b = getattr(state, moment), getattr(straight_state, moment)
            assert a.keys() == b.keys()
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert state.step == straight_state.step == 6


def test_step_modifies_neither_its_state_nor_its_params() -> None:
    opt = ServerOptimizer(ServerOptConfig("fedadam"), SHAPES)
    state, params = opt.initial_state(), _params()
    m_before = {k: v.copy() for k, v in state.m.items()}

    opt.step(state, params, _delta(0))

    assert state.step == 0
    assert all(np.array_equal(state.m[k], m_before[k]) for k in m_before)
    assert np.array_equal(params["w"], _params()["w"])


def test_a_step_that_overflows_fp32_raises_and_returns_no_state() -> None:
    opt = ServerOptimizer(ServerOptConfig("fedavgm", server_lr=10.0), {"b": (1,)})
    huge = {"b": np.array([3e38], np.float32)}

    with pytest.raises(AggregationError, match="server step"):
        opt.step(opt.initial_state(), huge, huge)


def test_initial_state_holds_only_the_moments_the_strategy_uses() -> None:
    states = {k: ServerOptimizer(ServerOptConfig(k), SHAPES).initial_state() for k in STRATEGIES}

    assert states["fedavg"].to_dict()[0] == {}
    assert set(states["fedavgm"].to_dict()[0]) == {"m/w", "m/b"}
    assert set(states["fedyogi"].to_dict()[0]) == {"m/w", "m/b", "v/w", "v/b"}
    np.testing.assert_allclose(states["fedadam"].v["b"], [1e-6] * 3)  # v₋₁ = τ²


def test_restoring_another_strategys_state_is_refused() -> None:
    tensors, scalars = ServerOptimizer(ServerOptConfig("fedadam"), SHAPES).initial_state().to_dict()

    with pytest.raises(ServerOptError, match="'fedadam', configured 'fedyogi'"):
        ServerOptimizer(ServerOptConfig("fedyogi"), SHAPES).state_from_dict(tensors, scalars)


def test_restoring_a_state_of_another_model_is_refused() -> None:
    tensors, scalars = ServerOptimizer(ServerOptConfig("fedadam"), SHAPES).initial_state().to_dict()

    with pytest.raises(ServerOptError, match="do not fit the model"):
        ServerOptimizer(ServerOptConfig("fedadam"), {"w": (2, 2)}).state_from_dict(tensors, scalars)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "sgd"},
        {"server_lr": 0.0},
        {"server_lr": math.inf},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"momentum": 1.5},
        {"tau": 0.0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ServerOptError):
        ServerOptConfig(**kwargs)  # type: ignore[arg-type]


def test_default_server_lr_is_1_for_fedavg_and_small_for_adaptive() -> None:
    assert ServerOptConfig().lr == 1.0
    assert ServerOptConfig("fedadam").lr == 0.01
    assert ServerOptConfig("fedadam", server_lr=0.3).lr == 0.3
