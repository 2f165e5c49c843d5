"""Unit tests for streaming federated averaging (aggregator/strategy.py)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pytest

from aggregator.strategy import AggregationError, StreamingFedAvg, fedavg

SHAPES = {"w": (2, 3), "b": (3,)}


def _params() -> dict[str, np.ndarray]:
    return {
        "w": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32),
        "b": np.array([0.5, -0.5, 0.0], dtype=np.float32),
    }


def _deltas() -> list[tuple[Mapping[str, np.ndarray], int]]:
    """Three hand-made client deltas with unequal sample counts 10, 30, 60."""
    return [
        (
            {
                "w": np.array([[1.0, 0.0, -1.0], [2.0, 0.0, 0.5]], dtype=np.float32),
                "b": np.array([1.0, 1.0, 1.0], dtype=np.float32),
            },
            10,
        ),
        (
            {
                "w": np.array([[0.0, 3.0, 1.0], [-2.0, 1.0, 0.5]], dtype=np.float32),
                "b": np.array([0.0, -3.0, 2.0], dtype=np.float32),
            },
            30,
        ),
        (
            {
                "w": np.array([[-1.0, 1.0, 0.0], [0.0, -1.0, 0.5]], dtype=np.float32),
                "b": np.array([2.0, 0.0, -1.0], dtype=np.float32),
            },
            60,
        ),
    ]


def _by_hand(
    params: dict[str, np.ndarray], results: list[tuple[Mapping[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    """θ + Σ nᵢΔᵢ / Σ nᵢ written out with numpy."""
    total = sum(n for _, n in results)
    return {
        name: params[name].astype(np.float64)
        + sum(d[name].astype(np.float64) * n for d, n in results) / total
        for name in params
    }


def _sum_snapshot(acc: StreamingFedAvg) -> dict[str, np.ndarray]:
    return {n: s.copy() for n, s in acc._sum.items()}


def test_streaming_fedavg_equals_weighted_mean_formula() -> None:
    acc = StreamingFedAvg(SHAPES)
    for delta, n in _deltas():
        acc.add(delta, n)

    new = acc.apply(_params())

    expected = _by_hand(_params(), _deltas())
    for name in SHAPES:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-6, atol=1e-7)


def test_weighted_mean_is_not_the_plain_mean() -> None:
    # By hand: b = (10·[1, 1, 1] + 30·[0, -3, 2] + 60·[2, 0, -1]) / 100; equal weights differ.
    acc = StreamingFedAvg(SHAPES)
    for delta, n in _deltas():
        acc.add(delta, n)

    mean = acc.mean_delta()

    plain = np.mean([d["b"] for d, _ in _deltas()], axis=0)
    assert not np.allclose(mean["b"], plain)
    np.testing.assert_allclose(mean["b"], [1.3, -0.8, 0.1], rtol=1e-6)


def test_mean_delta_is_float32() -> None:
    acc = StreamingFedAvg(SHAPES)
    acc.add(_deltas()[0][0], 10)

    mean = acc.mean_delta()

    assert all(v.dtype == np.float32 for v in mean.values())
    assert {n: v.shape for n, v in mean.items()} == SHAPES


def test_add_tracks_count_and_total_samples() -> None:
    acc = StreamingFedAvg(SHAPES)

    for delta, n in _deltas():
        acc.add(delta, n)

    assert acc.count == 3
    assert acc.total_samples == 100


def test_fedavg_equals_weighted_mean_formula() -> None:
    new = fedavg(_params(), _deltas())

    expected = _by_hand(_params(), _deltas())
    for name in SHAPES:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-6, atol=1e-7)


def test_fedavg_of_a_single_client_adds_its_delta() -> None:
    delta, n = _deltas()[1]

    new = fedavg(_params(), [(delta, n)])

    for name in SHAPES:
        np.testing.assert_allclose(new[name], _params()[name] + delta[name], rtol=1e-6)


def test_order_of_adds_does_not_matter() -> None:
    results = []
    for order in itertools.permutations(_deltas()):
        acc = StreamingFedAvg(SHAPES)
        for delta, n in order:
            acc.add(delta, n)
        results.append(acc.mean_delta())

    for other in results[1:]:
        for name in SHAPES:
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        pytest.param(
            {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)},
            "shape",
            id="wrong-shape",
        ),
        pytest.param({"w": np.zeros((2, 3), np.float32)}, "missing", id="missing-tensor"),
        pytest.param(
            {
                "w": np.zeros((2, 3), np.float32),
                "b": np.zeros(3, np.float32),
                "extra": np.zeros(1, np.float32),
            },
            "unexpected",
            id="extra-tensor",
        ),
        pytest.param(
            {"w": np.zeros((2, 3), np.float32), "b": np.zeros((), np.float32)},
            "shape",
            id="scalar-for-vector",
        ),
    ],
)
def test_bad_delta_raises_and_leaves_sum_untouched(
    delta: dict[str, np.ndarray], reason: str
) -> None:
    acc = StreamingFedAvg(SHAPES)
    acc.add(*_deltas()[0])
    before = _sum_snapshot(acc)

    with pytest.raises(AggregationError, match=reason):
        acc.add(delta, 5)

    assert acc.count == 1
    assert acc.total_samples == 10
    for name, value in before.items():
        assert np.array_equal(acc._sum[name], value)


@pytest.mark.parametrize("num_samples", [0, -1, -100])
def test_non_positive_num_samples_is_rejected_and_sum_untouched(num_samples: int) -> None:
    acc = StreamingFedAvg(SHAPES)
    acc.add(*_deltas()[0])
    before = _sum_snapshot(acc)

    with pytest.raises(AggregationError, match="num_samples"):
        acc.add(_deltas()[1][0], num_samples)

    assert acc.total_samples == 10
    for name, value in before.items():
        assert np.array_equal(acc._sum[name], value)


def test_check_accepts_matching_delta() -> None:
    acc = StreamingFedAvg(SHAPES)

    acc.check(_deltas()[0][0])  # does not raise

    assert acc.count == 0


def test_mean_delta_with_nothing_added_raises() -> None:
    with pytest.raises(AggregationError, match="no update"):
        StreamingFedAvg(SHAPES).mean_delta()


def test_apply_with_nothing_added_raises() -> None:
    with pytest.raises(AggregationError):
        StreamingFedAvg(SHAPES).apply(_params())


def test_fedavg_with_no_results_raises() -> None:
    with pytest.raises(AggregationError):
        fedavg(_params(), [])


def test_fedavg_with_wrong_shape_delta_raises() -> None:
    bad = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}

    with pytest.raises(AggregationError):
        fedavg(_params(), [(_deltas()[0][0], 10), (bad, 10)])


def test_apply_does_not_mutate_input_params() -> None:
    params = _params()
    originals = {n: v.copy() for n, v in params.items()}
    acc = StreamingFedAvg(SHAPES)
    acc.add(*_deltas()[0])

    new = acc.apply(params)

    for name, value in originals.items():
        assert np.array_equal(params[name], value)
        assert new[name] is not params[name]
        assert not np.shares_memory(new[name], params[name])


def test_fedavg_does_not_mutate_input_params_or_deltas() -> None:
    params, results = _params(), _deltas()
    originals = {n: v.copy() for n, v in params.items()}
    delta_copies = [{n: v.copy() for n, v in d.items()} for d, _ in results]

    fedavg(params, results)

    for name, value in originals.items():
        assert np.array_equal(params[name], value)
    for (delta, _), copy in zip(results, delta_copies, strict=True):
        for name, value in copy.items():
            assert np.array_equal(delta[name], value)


def test_apply_is_repeatable() -> None:
    acc = StreamingFedAvg(SHAPES)
    acc.add(*_deltas()[2])

    first = acc.apply(_params())
    second = acc.apply(_params())

    for name in SHAPES:
        assert np.array_equal(first[name], second[name])


def test_memory_is_one_accumulator_per_tensor_after_many_adds() -> None:
    shapes = {"conv": (6, 1, 5, 5), "fc": (120, 84), "bias": (84,)}
    acc = StreamingFedAvg(shapes)
    rng = np.random.default_rng(0)

    for i in range(50):
        delta = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        acc.add(delta, 1 + i)

    assert acc.count == 50
    assert set(acc._sum) == set(shapes)
    for name, shape in shapes.items():
        assert acc._sum[name].shape == shape
        assert acc._sum[name].dtype == np.float64
    model_bytes = sum(8 * int(np.prod(s)) for s in shapes.values())
    held = [v for v in vars(acc).values() if isinstance(v, np.ndarray)]
    held += [
        a
        for v in vars(acc).values()
        if isinstance(v, dict)
        for a in v.values()
        if isinstance(a, np.ndarray)
    ]
    assert sum(a.nbytes for a in held) == model_bytes


def test_many_small_deltas_accumulate_without_visible_precision_loss() -> None:
    acc = StreamingFedAvg({"x": (1,)})
    delta = {"x": np.array([1e-3], dtype=np.float32)}

    for _ in range(1000):
        acc.add(delta, 7)

    assert acc.mean_delta()["x"][0] == pytest.approx(np.float32(1e-3), rel=1e-6)
