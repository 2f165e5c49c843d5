"""What one update may claim and carry (aggregator/update_bounds.py, through the intake).

Sample counts bounded by the device's declaration and the configured maximum, values that
would overflow the model, non-finite values, and the norm log operators tune the bound with.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.intake import UpdateIntake
from aggregator.rounds import RoundState
from aggregator.strategy import StreamingFedAvg
from aggregator.update_bounds import (
    DEFAULT_MAX_UPDATE_NORM,
    FLOAT32_MAX,
    model_headroom,
    sample_violation,
)
from shared.protocol.frames import FrameHeader, encode_frame
from tests.unit.frames import assemble_frame, split_frame

FED, ROUND, BASE = "lab-1", 4, "d" * 64
SHAPES = {"w": (2, 3), "b": (3,)}


def _intake(declared: dict[str, int] | None = None, **bounds: object) -> UpdateIntake:
    state = RoundState(ROUND, BASE, {"c1", "c2"}, 1, deadline=100.0, started_at=0.0)
    known = declared or {}
    return UpdateIntake(
        FED,
        state,
        StreamingFedAvg(SHAPES),
        1 << 20,
        None,
        declared=known.get,
        **bounds,  # type: ignore[arg-type]
    )


def _update(num_samples: int = 50, value: float = 1.0, client: str = "c1") -> bytes:
    head = FrameHeader(
        kind="update",
        federation=FED,
        round=ROUND,
        codec="fp32",
        client_id=client,
        base_hash=BASE,
        num_samples=num_samples,
    )
    tensors = {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}
    return encode_frame(head, tensors).payload


def _untouched(intake: UpdateIntake) -> bool:
    return intake.acc.count == 0 and not intake.state.accepted


# --- sample counts ---------------------------------------------------------------------------
def test_more_samples_than_the_device_declared_is_refused() -> None:
    intake = _intake(declared={"c1": 300})

    verdict = intake.offer(ROUND, "c1", _update(num_samples=2**40 - 1)).verdict

    assert verdict.code == "too-many-samples"
    assert verdict.reason == f"too many samples: {2**40 - 1} claimed, the device declared 300"
    assert _untouched(intake)


def test_more_samples_than_the_maximum_is_refused_even_when_declared() -> None:
    intake = _intake(declared={"c1": 2**40 - 1}, max_samples=1000)

    verdict = intake.offer(ROUND, "c1", _update(num_samples=2**40 - 1)).verdict

    assert verdict.code == "too-many-samples"
    assert "the maximum is 1000" in verdict.reason
    assert _untouched(intake)


def test_the_declared_count_itself_is_accepted() -> None:
    intake = _intake(declared={"c1": 300}, max_samples=1000)

    assert intake.offer(ROUND, "c1", _update(num_samples=300)).verdict.accepted


def test_without_a_declaration_only_the_maximum_applies() -> None:
    # e.g. a restarted aggregator replaying its journal before any status arrived
    assert sample_violation(500, None, 1000) is None
    assert sample_violation(500, 0, 1000) is None
    assert sample_violation(1001, None, 1000) is not None


def test_a_late_update_is_late_before_its_sample_count_is_judged() -> None:
    intake = _intake(declared={"c1": 10})
    intake.state.close()

    assert intake.offer(ROUND, "c1", _update(num_samples=50)).verdict.code == "late"


# --- values ------------------------------------------------------------------------------------
def test_values_that_would_overflow_the_model_are_refused() -> None:
    params = {"w": np.full((2, 3), 1.0e38, np.float32), "b": np.zeros(3, np.float32)}
    intake = _intake(headroom=model_headroom(params))

    verdict = intake.offer(ROUND, "c1", _update(value=3.0e38)).verdict

    assert verdict.code == "non-finite"
    assert verdict.reason.startswith("non-finite: values up to 3e+38 would overflow")
    assert _untouched(intake)


def test_headroom_is_what_the_largest_weight_leaves_of_fp32() -> None:
    params = {"w": np.array([-2.0, 1.0], np.float32), "e": np.zeros((0, 3), np.float32)}

    assert model_headroom(params) == FLOAT32_MAX - 2.0


def test_a_frame_decoding_to_nan_is_refused_as_non_finite() -> None:
    head, body = split_frame(_update())
    raw = np.frombuffer(body, dtype="<f4").copy()
    raw[0] = np.nan
    payload = assemble_frame(head, raw.tobytes())
    intake = _intake()

    verdict = intake.offer(ROUND, "c1", payload).verdict

    assert verdict.code == "non-finite"
    assert verdict.reason == "non-finite: tensor 'w' decodes to non-finite values"
    assert _untouched(intake)


# --- the norm bound ----------------------------------------------------------------------------
def test_every_updates_norm_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    intake = _intake()
    caplog.set_level(logging.DEBUG, logger="aggregator.update_bounds")

    intake.offer(ROUND, "c1", _update(value=1.0))

    assert f"round {ROUND} update of c1: L2 norm 3 (bound None)" in caplog.messages


def test_the_norm_bound_is_on_by_default() -> None:
    cfg = AggregatorConfig()

    assert cfg.max_update_norm == DEFAULT_MAX_UPDATE_NORM
    assert 0 < DEFAULT_MAX_UPDATE_NORM < math.inf


def test_an_infinite_bound_turns_the_norm_check_off() -> None:
    intake = _intake()
    intake.max_norm = math.inf

    assert intake.offer(ROUND, "c1", _update(value=1.0e6)).verdict.accepted
