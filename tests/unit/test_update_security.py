"""Hostile updates at the aggregator's intake: norm bound, replays, fuzzed frames."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.intake import UpdateIntake
from aggregator.rounds import RoundState
from aggregator.strategy import StreamingFedAvg
from aggregator.update_bounds import norm_violation, update_l2_norm
from shared.protocol.frames import FrameHeader, encode_frame

FED = "lab"
BASE = "d" * 64
SHAPES = {"w": (2, 3), "b": (3,)}


def _intake(round_id: int = 2, max_norm: float | None = None) -> UpdateIntake:
    state = RoundState(round_id, BASE, {"c1", "c2"}, 1, deadline=100.0, started_at=0.0)
    return UpdateIntake(FED, state, StreamingFedAvg(SHAPES), 1 << 20, max_norm)


def _frame(round_id: int = 2, value: float = 1.0, client: str = "c1") -> bytes:
    header = FrameHeader(
        kind="update",
        federation=FED,
        round=round_id,
        codec="fp32",
        client_id=client,
        base_hash=BASE,
        num_samples=10,
    )
    tensors = {"w": np.full((2, 3), value, np.float32), "b": np.full((3,), value, np.float32)}
    return encode_frame(header, tensors).payload


def test_norm_is_taken_over_all_tensors() -> None:
    assert update_l2_norm({"a": np.array([3.0]), "b": np.array([4.0])}) == 5.0
    assert norm_violation({"a": np.array([3.0])}, None) is None


def test_update_over_the_norm_bound_is_rejected_before_the_sum() -> None:
    intake = _intake(max_norm=2.0)  # the delta of value 1.0 has norm 3.0

    offer = intake.offer(2, "c1", _frame(value=1.0))

    assert not offer.verdict.accepted
    assert "L2 norm 3 exceeds the bound 2" in offer.verdict.reason
    assert intake.acc.count == 0 and "c1" in intake.state.rejected


def test_update_within_the_norm_bound_is_accepted() -> None:
    intake = _intake(max_norm=3.5)

    assert intake.offer(2, "c1", _frame(value=1.0)).verdict.accepted


def test_replayed_update_from_an_earlier_round_is_rejected() -> None:
    intake = _intake(round_id=2)
    replay = _frame(round_id=1)  # a genuine round-1 update, captured and re-sent

    on_old_topic = intake.offer(1, "c1", replay)
    on_new_topic = intake.offer(2, "c1", replay)

    assert on_old_topic.verdict.reason == "late: round 1 is closed"
    assert on_new_topic.verdict.reason == "frame round 1 != topic round 2"
    assert intake.acc.count == 0


def test_duplicate_of_an_accepted_update_is_rejected() -> None:
    intake = _intake()
    intake.offer(2, "c1", _frame())

    assert intake.offer(2, "c1", _frame()).verdict.reason.startswith("duplicate")
    assert intake.acc.count == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_random_bytes_never_crash_the_intake(data: bytes) -> None:
    intake = _intake()

    offer = intake.offer(2, "c1", data)

    assert not offer.verdict.accepted
    assert intake.acc.count == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_mutated_valid_frames_never_crash_the_intake(
    flips: list[tuple[int, int]], cut: int
) -> None:
    payload = bytearray(_frame())
    for pos, byte in flips:
        payload[pos % len(payload)] = byte
    payload = payload[: max(1, cut % (len(payload) + 1))]
    intake = _intake(max_norm=10.0)

    offer = intake.offer(2, "c1", bytes(payload))

    # Either rejected with a reason, or (a harmless flip) accepted as a whole, finite update.
    assert offer.verdict.accepted or offer.verdict.reason
    for acc in intake.acc._sum.values():
        assert np.isfinite(acc).all()


def test_the_norm_of_fp32_values_near_their_maximum_does_not_overflow() -> None:
    big = np.full(4, 3e38, dtype=np.float32)

    assert update_l2_norm({"w": big}) == pytest.approx(6e38, rel=1e-6)


def test_the_norm_leaves_the_delta_unchanged() -> None:
    delta = {"a": np.array([3.0, -4.0]), "b": np.array([[1.0]], dtype=np.float32)}

    update_l2_norm(delta)

    assert delta["a"].tolist() == [3.0, -4.0] and delta["b"].tolist() == [[1.0]]
