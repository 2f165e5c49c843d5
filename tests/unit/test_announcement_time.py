"""How long an agent follows a round (edge_agent/announcements.py, ``open_until``).

Durations, not absolute times: ``deadline - ts`` (both on the aggregator's clock) counted from
the announcement's arrival on the agent's monotonic clock, so the device's wall clock, which
may be minutes off, never enters.
"""

from __future__ import annotations

import msgspec
import pytest

from edge_agent.announcements import GRACE_S, open_until
from shared.protocol.messages import ModelSpec, RoundStart, TrainParams

PUBLISHED = 1_800_000_000.0  # the aggregator's clock when it announced
ARRIVED = 5_000.0  # the agent's monotonic clock when the announcement arrived


def _announced(deadline_in: float) -> RoundStart:
    return RoundStart(
        ts=PUBLISHED,
        federation="lab",
        round=1,
        base_hash="0" * 64,
        deadline=PUBLISHED + deadline_in,
        selected=["pi-0"],
        model=ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4),
        train=TrainParams(lr=0.05, seed=1),
    )


@pytest.mark.parametrize("retained", [False, True], ids=["live", "retained"])
def test_a_round_is_open_for_the_time_it_had_left_when_announced(retained: bool) -> None:
    assert open_until(_announced(60.0), ARRIVED, retained) == ARRIVED + 60.0 + GRACE_S


def test_a_live_announcement_past_its_deadline_has_already_ended() -> None:
    assert open_until(_announced(-10.0), ARRIVED, retained=False) < ARRIVED


def test_a_retained_announcement_is_open_at_its_arrival() -> None:
    # Retained means not yet cleared by the aggregator, so its round has not closed.
    assert open_until(_announced(-10.0), ARRIVED, retained=True) == ARRIVED + GRACE_S


def test_an_overflowing_duration_ends_the_round_at_once() -> None:
    absurd = msgspec.structs.replace(_announced(0.0), deadline=1e308, ts=-1e308)  # inf

    assert open_until(absurd, ARRIVED, retained=False) < ARRIVED
