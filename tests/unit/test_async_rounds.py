"""The asynchronous mode's pure part (aggregator/async_rounds.py): staleness weights, the
version window's verdicts and bookkeeping, and the weighted sum, on fixed vectors."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from aggregator.async_config import async_settings
from aggregator.async_rounds import (
    AsyncConfigError,
    AsyncIntake,
    AsyncSettings,
    StalenessWeight,
    VersionWindow,
    window_from_history,
)
from aggregator.config import AggregatorConfig
from aggregator.round_strategy import RoundAggregate, RoundStrategy, strategy_settings
from aggregator.rounds import RoundPhase
from shared.protocol.frames import FrameHeader, encode_frame

FED = "lab"
SHAPES = {"w": (2, 2), "b": (2,)}
H = {r: f"{r:x}" * 64 for r in range(1, 10)}  # the base hash of each round


# --- staleness weights ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("const", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("poly:0.5", [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5, 1 / math.sqrt(5)]),
        ("poly:1", [1.0, 0.5, 1 / 3, 0.25, 0.2]),
        ("hinge:2,1", [1.0, 1.0, 1 / 3, 1 / 5, 1 / 7]),
        ("hinge:0.5,0", [1.0, 1 / 1.5, 0.5, 1 / 2.5, 1 / 3]),
    ],
)
def test_staleness_weights_match_fedbuffs_formulas(text: str, expected: list[float]) -> None:
    weight = StalenessWeight.parse(text)

    assert [weight(s) for s in range(5)] == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "poly", "poly:", "poly:x", "hinge:1", "cosine:1", "poly:-1"])
def test_a_malformed_staleness_weight_is_refused_naming_it(text: str) -> None:
    with pytest.raises(AsyncConfigError, match="staleness-weight"):
        StalenessWeight.parse(text)


def test_the_config_refuses_a_bad_weight_and_dp_in_async_mode() -> None:
    with pytest.raises(ValueError, match="staleness-weight"):
        AggregatorConfig(mode="async", staleness_weight="poly")
    with pytest.raises(ValueError, match="differential privacy"):
        AggregatorConfig(mode="async", dp_noise_multiplier=1.0, dp_expected_clients=4.0)
    with pytest.raises(ValueError, match="min-clients"):
        AggregatorConfig(mode="async", buffer=2, min_clients=3)


def test_sync_mode_has_no_async_settings_and_async_parses_them() -> None:
    assert async_settings(AggregatorConfig()) is None
    got = async_settings(AggregatorConfig(mode="async", buffer=4, staleness_weight="hinge:1,2"))
    assert got == AsyncSettings(4, 5, StalenessWeight("hinge", 1.0, 2.0))


# --- the version window --------------------------------------------------------------------
def _window(round_id: int = 5, **kw: Any) -> VersionWindow:
    kw.setdefault("bases", {r: H[r] for r in range(1, round_id)})
    fields: dict[str, Any] = {"buffer": 3, "max_staleness": 2, **kw}
    return VersionWindow(round_id, H[round_id], set(), 1, 100.0, 0.0, **fields)


def test_updates_within_the_staleness_bound_are_accepted_older_ones_are_stale() -> None:
    window = _window()

    assert window.screen("a", 5, H[5]).code == "accepted"
    assert window.screen("a", 3, H[3]).code == "accepted"  # 2 versions behind: S = 2
    assert window.screen("a", 2, H[2]).code == "stale"
    assert window.screen("a", 6, H[6]).code == "wrong-round"


def test_an_update_on_another_base_than_its_round_announced_is_stale_base() -> None:
    assert _window().screen("a", 4, H[3]).code == "stale-base"


def test_a_device_counts_once_per_window_a_second_update_is_busy_the_same_a_duplicate() -> None:
    window = _window()
    window.accept_from("a", 10, 4)

    assert window.screen("a", 5, H[5]).code == "busy"
    assert window.screen("a", 4, H[4]).code == "duplicate"
    assert window.staleness == [1]


def test_the_window_completes_at_k_accepted_updates() -> None:
    window = _window()
    for client in ("a", "b"):
        window.accept_from(client, 10, 5)
    assert window.phase(now=0.0) is RoundPhase.OPEN

    window.accept_from("c", 10, 4)

    assert window.phase(now=0.0) is RoundPhase.COMPLETE


def test_at_the_deadline_a_window_applies_with_quorum_or_starves_without() -> None:
    window = _window()
    assert window.phase(now=100.0) is RoundPhase.STARVED

    window.accept_from("a", 10, 5)

    assert window.phase(now=100.0) is RoundPhase.QUORUM


def test_a_starved_window_is_extended_without_inviting_anyone() -> None:
    window = _window()

    window.extend(200.0, ["x", "y"])

    assert (window.deadline, window.extensions, window.selected) == (200.0, 1, set())


def test_the_successor_remembers_counted_updates_and_bases_within_the_bound() -> None:
    window = _window()
    window.accept_from("a", 10, 3)
    window.accept_from("b", 10, 5)

    nxt = window.successor(6, H[6], 200.0, 50.0)

    assert nxt.screen("b", 5, H[5]).code == "duplicate"  # a re-sent copy counts once
    assert nxt.screen("a", 3, H[3]).code == "stale"  # 3 behind now
    assert nxt.screen("c", 4, H[4]).code == "accepted"
    assert sorted(nxt.bases) == [4, 5, 6]
    assert nxt.counted == {"b": {5}}


def test_a_window_rebuilt_from_the_checkpoint_history_is_the_successor() -> None:
    settings = AsyncSettings(3, 2, StalenessWeight("const"))
    history: list[dict[str, Any]] = []
    window = _window(round_id=1, bases={})
    for r in range(1, 5):
        window.accept_from(f"c{r}", 10, r)
        history.append({"round": r, "accepted": dict(window.accepted), **window.history_entry()})
        window = window.successor(r + 1, H[r + 1], 100.0, 0.0)

    rebuilt = window_from_history(history, settings, 5, H[5], 1, 100.0, 0.0, H[1])

    assert rebuilt.bases == window.bases
    assert rebuilt.counted == window.counted


# --- the weighted sum ----------------------------------------------------------------------
def _aggregate(**cfg: Any) -> RoundAggregate:
    settings = strategy_settings(AggregatorConfig(**{"clip": "none", **cfg}))
    return RoundStrategy(settings, SHAPES).open_round(4)


def _delta(value: float) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, np.float32) for n, s in SHAPES.items()}


def test_the_mean_delta_is_the_sum_of_n_w_delta_over_the_sum_of_n() -> None:
    agg = _aggregate(max_weight_share=1.0)

    agg.add(_delta(1.0), 10, "a", weight=1.0)
    agg.add(_delta(2.0), 30, "b", weight=0.5)

    # (10·1·1 + 30·0.5·2) / 40 = 1.0
    np.testing.assert_allclose(agg.mean_delta()["w"], np.full((2, 2), 1.0))


def test_the_staleness_weight_applies_after_clipping() -> None:
    agg = _aggregate(clip="fixed", clip_bound=1.0, max_weight_share=1.0)

    agg.add(_delta(2.0), 10, "a", weight=0.5)  # norm 4 → clipped to 1 → weighted to 0.5

    got = agg.mean_delta()
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in got.values()))
    assert norm == pytest.approx(0.5, rel=1e-6)


def test_a_weight_outside_0_1_is_refused_and_nothing_counted() -> None:
    agg = _aggregate()

    with pytest.raises(ValueError, match="weight"):
        agg.add(_delta(1.0), 10, "a", weight=1.5)

    assert agg.count == 0


def _frame(client: str, round_id: int, value: float, n: int) -> bytes:
    head = FrameHeader(
        kind="update", federation=FED, round=round_id, client_id=client,
        base_hash=H[round_id], codec="fp32", num_samples=n,
    )  # fmt: skip
    return encode_frame(head, _delta(value)).payload


def test_the_async_intake_weights_each_update_by_its_staleness() -> None:
    window = _window(buffer=2, weight=StalenessWeight("poly", 1.0))
    agg = _aggregate(max_weight_share=1.0)
    intake = AsyncIntake(FED, window, agg, 1 << 20).bind(window, agg)

    fresh = intake.offer(5, "a", _frame("a", 5, 1.0, 10)).verdict
    stale = intake.offer(4, "b", _frame("b", 4, 3.0, 10)).verdict  # s = 1: w = 1/2

    assert (fresh.code, stale.code) == ("accepted", "accepted")
    # (10·1 + 10·½·3) / 20 = 1.25
    np.testing.assert_allclose(agg.mean_delta()["b"], np.full(2, 1.25))
    assert window.staleness == [0, 1]
    assert window.phase(0.0) is RoundPhase.COMPLETE


def test_a_refused_async_update_changes_nothing() -> None:
    window = _window()
    agg = _aggregate()
    intake = AsyncIntake(FED, window, agg, 1 << 20).bind(window, agg)

    verdict = intake.offer(2, "a", _frame("a", 2, 1.0, 10)).verdict

    assert verdict.code == "stale"
    assert (agg.count, window.accepted, window.staleness) == (0, {}, [])
    assert window.rejected == {"a": verdict.reason}  # in the window's metrics
    assert replace(window) == window  # still a plain dataclass (checkpointable state)
