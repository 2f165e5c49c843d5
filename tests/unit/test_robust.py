"""Unit tests for the robust aggregation rules (aggregator/robust.py) on fixed vectors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from aggregator import robust
from aggregator.robust import (
    RULES,
    RobustConfig,
    RobustConfigError,
    RoundUpdates,
    check_round_memory,
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    pairwise_sq_distances,
    round_memory_bytes,
    trimmed_mean,
)
from aggregator.strategy import AggregationError


def _vec(*values: float) -> dict[str, np.ndarray]:
    return {"v": np.array(values, dtype=np.float32)}


def _line(*xs: float) -> list[dict[str, np.ndarray]]:
    """Updates on a line: x → {"v": [x, 0]}."""
    return [_vec(x, 0.0) for x in xs]


# Honest 0, 1, 2, 4, 7 and two attackers 50, 51 (n = 7, f = 2: n − f − 2 = 3 neighbours).
# Squared distances to the 3 nearest others, by hand:
#   0: 1+4+16 = 21   1: 1+1+9 = 11   2: 1+4+4 = 9   4: 4+9+9 = 22   7: 9+25+36 = 70
#   50: 1+43²+46² = 3966   51: 1+44²+47² = 4146
LINE = (0.0, 1.0, 2.0, 4.0, 7.0, 50.0, 51.0)
LINE_SCORES = [21.0, 11.0, 9.0, 22.0, 70.0, 3966.0, 4146.0]


def test_median_of_an_odd_number_of_known_vectors() -> None:
    updates = [_vec(1, 2, 3), _vec(4, 5, 6), _vec(100, -100, 0)]

    np.testing.assert_array_equal(coordinate_median(updates)["v"], [4, 2, 3])


def test_median_of_an_even_number_is_the_mean_of_the_middle_two() -> None:
    updates = [_vec(1, 0), _vec(2, 10), _vec(4, 20), _vec(1000, 30)]

    np.testing.assert_array_equal(coordinate_median(updates)["v"], [3, 15])


def test_median_works_per_tensor_and_keeps_shapes() -> None:
    updates = [{"w": np.full((2, 2), float(i)), "b": np.array([-float(i)])} for i in (5, 1, 3)]

    out = coordinate_median(updates)

    np.testing.assert_array_equal(out["w"], np.full((2, 2), 3.0))
    np.testing.assert_array_equal(out["b"], [-3.0])
    assert out["w"].dtype == np.float32


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    # n = 5, β = 0.2: k = 1 per side. Column 0: 1 2 3 4 100 → mean(2, 3, 4) = 3;
    # column 1: −50 0 1 2 5 → mean(0, 1, 2) = 1.
    updates = [_vec(1, 5), _vec(100, 0), _vec(3, -50), _vec(2, 1), _vec(4, 2)]

    np.testing.assert_allclose(trimmed_mean(updates, 0.2)["v"], [3.0, 1.0])


def test_trimmed_mean_rounds_the_cut_down() -> None:
    # n = 4, β = 0.2: ⌊0.8⌋ = 0 cut, the plain mean.
    updates = [_vec(1), _vec(2), _vec(3), _vec(10)]

    np.testing.assert_allclose(trimmed_mean(updates, 0.2)["v"], [4.0])


def test_trimmed_mean_with_beta_zero_is_the_plain_mean() -> None:
    updates = [_vec(1, -1), _vec(2, 5), _vec(6, 2)]

    np.testing.assert_allclose(trimmed_mean(updates, 0.0)["v"], [3.0, 2.0])


def test_trimmed_mean_refuses_beta_of_a_half() -> None:
    with pytest.raises(RobustConfigError, match="β"):
        trimmed_mean([_vec(1)], 0.5)


def test_pairwise_distances_span_all_tensors() -> None:
    a = {"x": np.array([0.0]), "y": np.array([0.0, 0.0])}
    b = {"x": np.array([3.0]), "y": np.array([0.0, 4.0])}

    np.testing.assert_allclose(pairwise_sq_distances([a, b]), [[0, 25], [25, 0]])


def test_krum_scores_by_hand() -> None:
    np.testing.assert_allclose(krum_scores(_line(*LINE), byzantine=2), LINE_SCORES)


def test_krum_picks_the_most_central_honest_update_despite_outliers() -> None:
    out, chosen = krum(_line(*LINE), byzantine=2)

    assert chosen == 2
    np.testing.assert_array_equal(out["v"], [2.0, 0.0])


def test_multi_krum_averages_the_m_best_scored_updates() -> None:
    out, chosen = multi_krum(_line(*LINE), byzantine=2, keep=3)

    assert chosen == [2, 1, 0]
    np.testing.assert_allclose(out["v"], [1.0, 0.0])


def test_multi_krum_keeps_n_minus_f_by_default_and_drops_the_outliers() -> None:
    out, chosen = multi_krum(_line(*LINE), byzantine=2)

    assert sorted(chosen) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(out["v"], [14.0 / 5, 0.0])


def test_multi_krum_with_m_equal_to_n_is_the_plain_mean() -> None:
    out, _ = multi_krum(_line(*LINE), byzantine=2, keep=7)

    np.testing.assert_allclose(out["v"], [sum(LINE) / 7, 0.0], rtol=1e-6)


def test_krum_against_a_brute_force_implementation() -> None:
    rng = np.random.default_rng(5)
    updates = [{"a": rng.normal(size=4), "b": rng.normal(size=(2, 3))} for _ in range(9)]
    updates += [{"a": rng.normal(8, 1, size=4), "b": rng.normal(8, 1, size=(2, 3))}]

    flat = [np.concatenate([u["a"].ravel(), u["b"].ravel()]) for u in updates]
    scores = [
        sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(10) if j != i)[:5]
        for i in range(10)
    ]
    np.testing.assert_allclose(krum_scores(updates, byzantine=3), [sum(s) for s in scores])
    assert krum(updates, byzantine=3)[1] == int(np.argmin([sum(s) for s in scores]))


def test_krum_refuses_fewer_than_2f_plus_3_updates() -> None:
    with pytest.raises(RobustConfigError, match=r"2f \+ 3 = 7 updates, got 6"):
        krum(_line(*LINE[:6]), byzantine=2)


def test_rules_declare_whether_they_hold_the_round() -> None:
    assert not RULES["fedavg"].holds_round
    assert all(RULES[r].holds_round for r in ("median", "trimmed-mean", "krum", "multi-krum"))
    assert all("unweighted" in RULES[r].weighting for r in RULES if r != "fedavg")


def test_memory_needed_by_hand() -> None:
    # 10 clients × 1,000 params (largest tensor 600), fp32: held 40,000; working 10·600·8;
    # result 1,000·4 + 600·8; numpy's buffers 8,192·16; Krum adds 10·10·8.
    base = 40_000 + 48_000 + 4_000 + 4_800 + 131_072

    assert round_memory_bytes("median", 1_000, 10, 4, 600) == base
    assert round_memory_bytes("krum", 1_000, 10, 4, 600) == base + 800
    assert round_memory_bytes("fedavg", 1_000, 10) == 0


def test_working_memory_is_bounded_by_the_block_not_the_tensor() -> None:
    # The CNN's 1.6 M-value layer for 100 clients: 100 × 65,536 × 8 working, not × 1.6 M.
    small, big = (round_memory_bytes("median", 1_663_370, n, 4, 1_605_632) for n in (100, 101))

    assert big - small == 1_663_370 * 4 + 65_536 * 8
    assert small < 0.7 * 2**30  # fits the 1 GiB default


def test_a_round_over_the_memory_limit_is_refused_naming_the_limit_and_the_flag() -> None:
    cfg = RobustConfig("median", max_round_memory=100 * 2**20)

    with pytest.raises(RobustConfigError) as err:
        check_round_memory(cfg, num_params=1_663_370, num_clients=100)

    message = str(err.value)
    assert "100.0 MiB" in message and "--max-round-memory" in message
    assert "100 clients" in message


def test_round_updates_refuses_at_construction_what_would_exceed_the_limit() -> None:
    cfg = RobustConfig("trimmed-mean", max_round_memory=10_000)

    with pytest.raises(RobustConfigError, match="over the limit"):
        RoundUpdates(cfg, {"w": (100, 10)}, capacity=5)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_a_rounds_real_peak_memory_stays_within_the_declared_bytes(rule: str) -> None:
    shapes = {"w": (150, 100), "b": (5_000,)}
    rng = np.random.default_rng(1)
    deltas = [
        {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for _ in range(12)
    ]
    cfg = RobustConfig(rule, byzantine=2)
    warm = RoundUpdates(cfg, {"v": (1,)}, capacity=7)  # numpy's lazy imports allocate once
    for x in LINE:
        warm.add(_vec(x), 1)
    warm.aggregate()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = RoundUpdates(cfg, shapes, capacity=12)
        for d in deltas:
            held.add(d, 10)
        tracemalloc.reset_peak()
        held.aggregate()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()

    assert peak <= held.bytes_needed


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_small_blocks_give_the_same_result_within_their_smaller_memory(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = {"w": (150, 100), "b": (5_000,)}
    rng = np.random.default_rng(2)
    deltas = [
        {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for _ in range(12)
    ]
    cfg = RobustConfig(rule, byzantine=2)
    whole = RoundUpdates(cfg, shapes, capacity=12)
    for d in deltas:
        whole.add(d, 1)
    expected = whole.aggregate()

    monkeypatch.setattr(robust, "BLOCK", 1_000)
    blocked = RoundUpdates(cfg, shapes, capacity=12)
    for d in deltas:
        blocked.add(d, 1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        got = blocked.aggregate()
        working = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()

    assert got[1] == expected[1]
    for name in shapes:
        np.testing.assert_allclose(got[0][name], expected[0][name], rtol=1e-6, atol=1e-7)
    held = 12 * 20_000 * 4
    assert blocked.bytes_needed < whole.bytes_needed
    assert working <= blocked.bytes_needed - held


def test_round_updates_median_uses_every_client() -> None:
    held = RoundUpdates(RobustConfig("median"), {"v": (2,)}, capacity=3)
    for cid, d in zip("abc", ([1, 2], [3, 4], [5, -6]), strict=True):
        held.add({"v": np.array(d, dtype=np.float32)}, 1, cid)

    out, used = held.aggregate()

    np.testing.assert_array_equal(out["v"], [3, 2])
    assert used == ["a", "b", "c"]


def test_round_updates_krum_names_the_chosen_client() -> None:
    held = RoundUpdates(RobustConfig("krum", byzantine=2), {"v": (2,)}, capacity=7)
    for i, x in enumerate(LINE):
        held.add({"v": np.array([x, 0.0], dtype=np.float32)}, 1, f"c{i}")

    out, used = held.aggregate()

    assert used == ["c2"]
    np.testing.assert_array_equal(out["v"], [2.0, 0.0])


def test_round_updates_multi_krum_keeps_at_most_n_minus_f_of_the_updates_that_came() -> None:
    cfg = RobustConfig("multi-krum", byzantine=1, krum_keep=8)
    held = RoundUpdates(cfg, {"v": (2,)}, capacity=9)
    for i, x in enumerate(LINE[:6]):  # 6 of 9 came: keep min(8, 6 − 1) = 5
        held.add({"v": np.array([x, 0.0], dtype=np.float32)}, 1, f"c{i}")

    _, used = held.aggregate()

    assert len(used) == 5 and "c5" not in used


def test_round_updates_refuses_a_selection_too_small_for_krum() -> None:
    with pytest.raises(RobustConfigError, match="2f \\+ 3"):
        RoundUpdates(RobustConfig("krum", byzantine=3), {"v": (2,)}, capacity=8)


def test_round_updates_refuses_more_updates_than_its_capacity() -> None:
    held = RoundUpdates(RobustConfig("median"), {"v": (1,)}, capacity=1)
    held.add(_vec(1.0), 1)

    with pytest.raises(AggregationError, match="at most 1"):
        held.add(_vec(2.0), 1)


def test_round_updates_refuses_a_wrong_or_non_finite_delta() -> None:
    held = RoundUpdates(RobustConfig("median"), {"v": (2,)}, capacity=3)

    with pytest.raises(AggregationError, match="shape"):
        held.add(_vec(1.0), 1)
    with pytest.raises(AggregationError, match="non-finite"):
        held.add(_vec(1.0, np.nan), 1)
    assert held.updates == []


def test_round_updates_holds_copies() -> None:
    held = RoundUpdates(RobustConfig("median"), {"v": (1,)}, capacity=1)
    delta = _vec(1.0)
    held.add(delta, 1)
    delta["v"][0] = 99.0

    assert held.aggregate()[0]["v"][0] == 1.0


def test_an_empty_round_cannot_be_aggregated() -> None:
    with pytest.raises(AggregationError, match="no update"):
        RoundUpdates(RobustConfig("median"), {"v": (1,)}, capacity=2).aggregate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "fedavg"},
        {"rule": "mean"},
        {"trim_fraction": 0.5},
        {"byzantine": -1},
        {"krum_keep": 0},
        {"max_round_memory": 0},
    ],
)
def test_bad_robust_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(RobustConfigError):
        RobustConfig(**kwargs)  # type: ignore[arg-type]
