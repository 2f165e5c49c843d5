"""Unit tests for update screening and intake (aggregator/intake.py).

Uses a real RoundState, a real StreamingFedAvg and real frames built with encode_frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator.intake import UpdateIntake
from aggregator.rounds import RoundPhase, RoundState
from aggregator.strategy import StreamingFedAvg
from shared.protocol.frames import MAGIC, FrameHeader, encode_frame

FED = "lab-1"
ROUND = 4
BASE = "d" * 64
SHAPES = {"w": (2, 3), "b": (3,)}
MAX_BYTES = 1 << 20


def _intake(selected: tuple[str, ...] = ("c1", "c2", "c3")) -> UpdateIntake:
    state = RoundState(
        round_id=ROUND,
        base_hash=BASE,
        selected=set(selected),
        min_clients=1,
        deadline=100.0,
        started_at=0.0,
    )
    return UpdateIntake(FED, state, StreamingFedAvg(SHAPES), MAX_BYTES)


def _delta(value: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, dtype=np.float32),
        "b": np.full((3,), -value, dtype=np.float32),
    }


def _update(
    client: str = "c1",
    *,
    num_samples: int = 50,
    meta: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    codec: str = "fp32",
    **header: Any,
) -> bytes:
    fields: dict[str, Any] = {
        "kind": "update",
        "federation": FED,
        "round": ROUND,
        "codec": codec,
        "client_id": client,
        "base_hash": BASE,
        "num_samples": num_samples,
        "meta": {"train_loss": 0.5, "train_time_s": 2.0} if meta is None else meta,
    }
    fields.update(header)
    return encode_frame(
        FrameHeader(**fields),
        _delta() if tensors is None else tensors,
        rng=np.random.default_rng(0),
    ).payload


def _sum_snapshot(intake: UpdateIntake) -> dict[str, np.ndarray]:
    return {n: s.copy() for n, s in intake.acc._sum.items()}


def _assert_sum_untouched(intake: UpdateIntake, before: dict[str, np.ndarray]) -> None:
    assert intake.acc.count == 0
    assert intake.acc.total_samples == 0
    for name, value in before.items():
        assert np.array_equal(intake.acc._sum[name], value)


# --- accepted --------------------------------------------------------------------------------


def test_valid_update_is_accepted() -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", _update("c1"))

    assert offer.verdict.accepted
    assert offer.verdict.reason == ""


def test_valid_update_is_counted_in_state_and_sum() -> None:
    intake = _intake()

    intake.offer(ROUND, "c1", _update("c1", num_samples=50))

    assert intake.state.accepted == {"c1": 50}
    assert intake.acc.count == 1
    assert intake.acc.total_samples == 50
    np.testing.assert_allclose(intake.acc.mean_delta()["w"], np.ones((2, 3)))


def test_accepted_update_stats_come_from_header_and_meta() -> None:
    intake = _intake()
    payload = _update(
        "c2",
        num_samples=75,
        meta={"train_loss": 0.25, "train_time_s": 3.5, "val_accuracy": 0.9, "val_samples": 20},
    )

    offer = intake.offer(ROUND, "c2", payload)

    assert offer.stats is not None
    assert offer.stats.client_id == "c2"
    assert offer.stats.num_samples == 75
    assert offer.stats.nbytes == len(payload)
    assert offer.stats.train_loss == 0.25
    assert offer.stats.train_time_s == 3.5
    assert offer.stats.val_accuracy == 0.9
    assert offer.stats.val_samples == 20
    assert intake.stats == [offer.stats]


@pytest.mark.parametrize("bad", ["0.5", None, True, float("nan"), float("inf"), [1]])
def test_non_numeric_or_non_finite_train_loss_becomes_none(bad: Any) -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", _update("c1", meta={"train_loss": bad}))

    assert offer.verdict.accepted
    assert offer.stats is not None
    assert offer.stats.train_loss is None


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_compressed_update_is_accepted(codec: str) -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", _update("c1", codec=codec))

    assert offer.verdict.accepted
    assert intake.acc.count == 1


def test_bytes_received_counts_every_offer() -> None:
    intake = _intake()
    good = _update("c1")

    intake.offer(ROUND, "c1", good)
    intake.offer(ROUND, "c2", b"junk")

    assert intake.bytes_received == len(good) + 4


# --- rejected --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage bytes", MAGIC + b"\xff\xff\xff\xff", bytes(range(256))],
)
def test_garbage_is_rejected_as_undecodable_and_sum_untouched(payload: bytes) -> None:
    intake = _intake()
    before = _sum_snapshot(intake)

    offer = intake.offer(ROUND, "c1", payload)

    assert not offer.verdict.accepted
    assert offer.verdict.reason.startswith("undecodable")
    assert offer.stats is None
    _assert_sum_untouched(intake, before)
    assert intake.state.accepted == {}


def test_rejection_is_recorded_in_round_state() -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", b"garbage")

    assert intake.state.rejected == {"c1": offer.verdict.reason}


def test_a_finally_refused_device_is_not_waited_for() -> None:
    intake = _intake(("c1", "c2"))
    intake.offer(ROUND, "c2", b"garbage")  # malformed: its agent sends nothing more
    intake.offer(ROUND, "c1", _update("c1"))

    assert intake.state.phase(now=0.0) is RoundPhase.COMPLETE  # long before the deadline
    assert "c2" in intake.state.rejected


def test_a_device_refused_not_now_is_still_waited_for() -> None:
    intake = _intake(("c1", "c2"))
    intake.offer(ROUND + 1, "c2", _update("c2", round=ROUND + 1))  # wrong round: re-sent later
    intake.offer(ROUND, "c1", _update("c1"))

    assert intake.state.phase(now=0.0) is RoundPhase.OPEN


def test_oversized_update_is_rejected_as_undecodable() -> None:
    intake = _intake()
    intake.max_bytes = 64

    offer = intake.offer(ROUND, "c1", _update("c1"))

    assert offer.verdict.reason.startswith("undecodable")
    assert "exceeds" in offer.verdict.reason


@pytest.mark.parametrize(
    ("topic_round", "topic_client", "header", "reason"),
    [
        pytest.param(ROUND, "c1", {"federation": "other-fed"}, "federation", id="federation"),
        pytest.param(ROUND, "c1", {"round": ROUND + 1}, "frame round", id="round"),
        pytest.param(ROUND, "c2", {}, "frame client", id="client"),
        pytest.param(ROUND, "c1", {"kind": "model"}, "frame kind", id="kind"),
    ],
)
def test_header_mismatch_with_topic_is_rejected(
    topic_round: int, topic_client: str, header: dict[str, Any], reason: str
) -> None:
    intake = _intake()
    before = _sum_snapshot(intake)

    offer = intake.offer(topic_round, topic_client, _update("c1", **header))

    assert not offer.verdict.accepted
    assert reason in offer.verdict.reason
    _assert_sum_untouched(intake, before)


def test_zero_num_samples_is_rejected() -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", _update("c1", num_samples=0))

    assert not offer.verdict.accepted
    assert "num_samples" in offer.verdict.reason
    assert intake.acc.count == 0


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param(
            {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, id="transposed"
        ),
        pytest.param({"w": np.zeros((2, 3), np.float32)}, id="missing-tensor"),
        pytest.param(
            {
                "w": np.zeros((2, 3), np.float32),
                "b": np.zeros(3, np.float32),
                "x": np.zeros(1, np.float32),
            },
            id="extra-tensor",
        ),
    ],
)
def test_wrong_shapes_are_rejected_as_the_wrong_model(tensors: dict[str, np.ndarray]) -> None:
    intake = _intake()
    before = _sum_snapshot(intake)

    offer = intake.offer(ROUND, "c1", _update("c1", tensors=tensors))

    assert not offer.verdict.accepted
    assert offer.verdict.code == "wrong-model"
    assert offer.verdict.reason.startswith("wrong model: tensor names/shapes do not match")
    _assert_sum_untouched(intake, before)
    assert intake.state.accepted == {}


def test_same_update_twice_is_counted_once() -> None:
    intake = _intake()
    payload = _update("c1", num_samples=50)

    first = intake.offer(ROUND, "c1", payload)
    second = intake.offer(ROUND, "c1", payload)

    assert first.verdict.accepted
    assert not second.verdict.accepted
    assert second.verdict.reason.startswith("duplicate")
    assert intake.acc.count == 1
    assert intake.acc.total_samples == 50
    assert len(intake.stats) == 1


def test_duplicate_does_not_record_a_rejection_for_an_accepted_client() -> None:
    intake = _intake()
    payload = _update("c1")
    intake.offer(ROUND, "c1", payload)

    intake.offer(ROUND, "c1", payload)

    assert "c1" not in intake.state.rejected


def test_unselected_client_is_rejected() -> None:
    intake = _intake(selected=("c1",))

    offer = intake.offer(ROUND, "c9", _update("c9"))

    assert not offer.verdict.accepted
    assert offer.verdict.reason.startswith("not selected")
    assert intake.acc.count == 0


def test_stale_base_hash_is_rejected() -> None:
    intake = _intake()

    offer = intake.offer(ROUND, "c1", _update("c1", base_hash="e" * 64))

    assert offer.verdict.reason.startswith("stale base")
    assert intake.acc.count == 0


def test_update_for_a_closed_round_is_late() -> None:
    intake = _intake()
    intake.state.close()

    offer = intake.offer(ROUND, "c1", _update("c1"))

    assert offer.verdict.reason.startswith("late")
    assert intake.acc.count == 0


def test_update_for_a_past_round_is_late_and_not_recorded() -> None:
    intake = _intake()

    offer = intake.offer(ROUND - 1, "c1", _update("c1", round=ROUND - 1))

    assert offer.verdict.reason.startswith("late")
    assert intake.state.rejected == {}


# --- weighted metrics ------------------------------------------------------------------------


def test_weighted_train_loss_is_sample_weighted_mean() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", _update("c1", num_samples=10, meta={"train_loss": 1.0}))
    intake.offer(ROUND, "c2", _update("c2", num_samples=30, meta={"train_loss": 2.0}))
    intake.offer(ROUND, "c3", _update("c3", num_samples=60, meta={"train_loss": 0.5}))

    loss = intake.weighted_train_loss()

    assert loss == pytest.approx((10 * 1.0 + 30 * 2.0 + 60 * 0.5) / 100)


def test_weighted_train_loss_skips_updates_without_a_loss() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", _update("c1", num_samples=10, meta={"train_loss": 1.0}))
    intake.offer(ROUND, "c2", _update("c2", num_samples=90, meta={}))

    assert intake.weighted_train_loss() == pytest.approx(1.0)


def test_weighted_train_loss_is_none_without_accepted_updates() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", b"garbage")

    assert intake.weighted_train_loss() is None


def test_weighted_val_accuracy_is_weighted_by_validation_samples() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", _update("c1", meta={"val_accuracy": 0.5, "val_samples": 10}))
    intake.offer(ROUND, "c2", _update("c2", meta={"val_accuracy": 1.0, "val_samples": 30}))

    assert intake.weighted_val_accuracy() == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)


def test_slowest_train_s_is_the_maximum() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", _update("c1", meta={"train_time_s": 2.0}))
    intake.offer(ROUND, "c2", _update("c2", meta={"train_time_s": 7.5}))

    assert intake.slowest_train_s() == 7.5


def test_reported_download_bytes_are_collected_and_bad_reports_count_zero() -> None:
    intake = _intake()
    intake.offer(ROUND, "c1", _update("c1", meta={"download_bytes": 40_000}))
    intake.offer(ROUND, "c2", _update("c2", meta={"train_loss": 0.1}))  # an older agent
    intake.offer(ROUND, "c3", _update("c3", meta={"download_bytes": "lots"}))

    assert intake.acc.count == 3
    assert intake.download_reports() == [40_000, None, 0]


# --- offer never raises ---------------------------------------------------------


@pytest.mark.parametrize("val_samples", ["many", float("inf")])
def test_bad_val_samples_in_meta_does_not_make_offer_raise(val_samples: Any) -> None:
    intake = _intake()
    payload = _update("c1", meta={"val_accuracy": 0.5, "val_samples": val_samples})

    offer = intake.offer(ROUND, "c1", payload)

    assert intake.acc.count == len(intake.stats)
    assert offer.verdict.accepted == (intake.acc.count == 1)


def test_deeply_nested_header_is_rejected_not_raised() -> None:
    intake = _intake()
    head = b"[" * 100_000 + b"]" * 100_000
    payload = MAGIC + len(head).to_bytes(4, "little") + head

    offer = intake.offer(ROUND, "c1", payload)

    assert not offer.verdict.accepted


def test_a_wrong_model_receipt_names_the_aggregators_fingerprint() -> None:
    intake = _intake()
    intake.fingerprint = "f" * 64

    offer = intake.offer(ROUND, "c1", _update("c1", tensors={"w": np.zeros((2, 3), np.float32)}))

    assert offer.verdict.code == "wrong-model"
    assert "architecture fingerprint is " + "f" * 64 in offer.verdict.reason
