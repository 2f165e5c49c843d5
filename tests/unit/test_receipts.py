"""Receipt codes (shared/protocol/receipts.py): the aggregator's verdicts, the wire, old texts.

The verdicts and their reason texts come from driving the real round state machine and intake,
so the legacy reason→code mapping is checked against what the aggregator actually says.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import numpy as np
import pytest

from aggregator.async_rounds import AsyncIntake, VersionWindow
from aggregator.config import AggregatorConfig
from aggregator.intake import UpdateIntake, receipt_for
from aggregator.round_strategy import RoundStrategy, strategy_settings
from aggregator.rounds import NO_ROUND, RoundState, Verdict, late, without_open_round
from aggregator.strategy import StreamingFedAvg
from aggregator.update_budget import IntakeGuard
from shared.protocol.frames import FrameHeader, encode_frame
from shared.protocol.messages import MessageError, Receipt, decode
from shared.protocol.receipts import RECEIPT_CODES, ReceiptCode, code_from_legacy_reason

FED = "lab-1"
ROUND = 4
BASE = "d" * 64
OTHER_BASE = "e" * 64
SHAPES = {"w": (2, 3), "b": (3,)}
MAX_BYTES = 4096


def _intake(
    *, max_bytes: int = MAX_BYTES, max_norm: float | None = None, **bounds: Any
) -> UpdateIntake:
    state = RoundState(ROUND, BASE, {"c1", "c2"}, 1, deadline=100.0, started_at=0.0)
    return UpdateIntake(FED, state, StreamingFedAvg(SHAPES), max_bytes, max_norm, **bounds)


def _update(client: str = "c1", *, size: int = 3, **header: Any) -> bytes:
    fields: dict[str, Any] = {
        "kind": "update",
        "federation": FED,
        "round": ROUND,
        "codec": "fp32",
        "client_id": client,
        "base_hash": BASE,
        "num_samples": 10,
    }
    fields.update(header)
    tensors = {"w": np.ones((2, size), np.float32), "b": np.ones(3, np.float32)}
    return encode_frame(FrameHeader(**fields), tensors).payload


def _offer(payload: bytes, intake: UpdateIntake | None = None, **topic: Any) -> Verdict:
    intake = intake or _intake()
    topic_round, client = topic.get("round", ROUND), topic.get("client", "c1")
    return intake.offer(topic_round, client, payload).verdict


def _duplicate() -> Verdict:
    intake = _intake()
    _offer(_update(), intake)
    return _offer(_update(), intake)


def _closed_round() -> Verdict:
    intake = _intake()
    intake.state.close()
    return _offer(_update(), intake)


def _async_intake() -> AsyncIntake:
    window = VersionWindow(
        ROUND, BASE, set(), 1, 100.0, 0.0, buffer=5, max_staleness=1,
        bases={ROUND - 1: OTHER_BASE},
    )  # fmt: skip
    acc = RoundStrategy(strategy_settings(AggregatorConfig(clip="none")), SHAPES).open_round(5)
    return AsyncIntake(FED, window, acc, MAX_BYTES).bind(window, acc)


def _too_stale() -> Verdict:
    return _offer(_update(round=ROUND - 2), _async_intake(), round=ROUND - 2)


def _second_in_window() -> Verdict:
    intake = _async_intake()
    _offer(_update(round=ROUND - 1, base_hash=OTHER_BASE), intake, round=ROUND - 1)
    return _offer(_update(), intake)


# Every way the intake answers an update, with the code it must carry.
SCENARIOS: dict[str, tuple[Callable[[], Verdict], ReceiptCode]] = {
    "valid": (lambda: _offer(_update()), "accepted"),
    "second copy": (_duplicate, "duplicate"),
    "closed round": (_closed_round, "late"),
    "past round": (lambda: _offer(_update(round=ROUND - 1), round=ROUND - 1), "late"),
    "future round": (lambda: _offer(_update(round=ROUND + 1), round=ROUND + 1), "wrong-round"),
    "unselected": (lambda: _offer(_update("c9"), client="c9"), "not-selected"),
    "other base": (lambda: _offer(_update(base_hash=OTHER_BASE)), "stale-base"),
    "garbage": (lambda: _offer(b"FMQ\x01 not a frame"), "malformed"),
    "empty": (lambda: _offer(b""), "malformed"),
    "global frame": (lambda: _offer(_update(kind="global")), "malformed"),
    "other federation": (lambda: _offer(_update(federation="lab-2")), "malformed"),
    "round mismatch": (lambda: _offer(_update(round=ROUND + 1)), "malformed"),
    "client mismatch": (lambda: _offer(_update("c2")), "malformed"),
    "no samples": (lambda: _offer(_update(num_samples=0)), "malformed"),
    "wrong shapes": (lambda: _offer(_update(size=4)), "wrong-model"),
    "over max bytes": (lambda: _offer(_update(), _intake(max_bytes=64)), "too-large"),
    "over the norm": (lambda: _offer(_update(), _intake(max_norm=0.5)), "over-norm"),
    "overflowing": (lambda: _offer(_update(), _intake(headroom=0.5)), "non-finite"),
    "over max samples": (lambda: _offer(_update(), _intake(max_samples=5)), "too-many-samples"),
    "async: staler than allowed": (_too_stale, "stale"),
    "async: second update in a window": (_second_in_window, "busy"),
}
# The service's answer while no round is open (last closed round 3).
NO_OPEN_ROUND: dict[str, tuple[Callable[[], Verdict], ReceiptCode]] = {
    "applied round": (lambda: without_open_round(3, last_closed=3), "late"),
    "round to come": (lambda: without_open_round(4, last_closed=3), "no-round"),
}


def _over_budget() -> Verdict:
    guard = IntakeGuard(logging.getLogger("test"), 10.0, burst=1, rate=0.0)
    guard.admit("c1", 0.0)
    verdict = guard.admit("c1", 0.0)[1]
    assert verdict is not None
    return verdict


# The service's answer to a client over its update budget (before the intake reads it).
OVER_BUDGET: dict[str, tuple[Callable[[], Verdict], ReceiptCode]] = {
    "over the budget": (_over_budget, "rate-limited"),
}
ALL = {**SCENARIOS, **NO_OPEN_ROUND, **OVER_BUDGET}


# --- the aggregator's verdicts ------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_each_verdict_carries_its_code(name: str) -> None:
    produce, expected = ALL[name]

    verdict = produce()

    assert verdict.code == expected
    assert verdict.accepted is (expected == "accepted")


def test_the_scenarios_produce_every_code() -> None:
    produced = {expected for _, expected in ALL.values()}

    assert produced == set(RECEIPT_CODES)


@pytest.mark.parametrize("name", ALL)
def test_legacy_reason_text_maps_to_the_verdicts_code(name: str) -> None:
    verdict = ALL[name][0]()
    receipt = receipt_for(ROUND, "c1", verdict)

    assert code_from_legacy_reason(receipt.status, receipt.reason) == verdict.code


def test_receipt_for_a_refusal_keeps_status_reason_and_code() -> None:
    receipt = receipt_for(7, "pi-1", late(7))

    assert (receipt.round, receipt.client_id) == (7, "pi-1")
    assert (receipt.status, receipt.code) == ("rejected", "late")
    assert receipt.reason == "late: round 7 is closed"  # the text older agents match on


def test_receipt_for_an_acceptance_says_accepted_twice() -> None:
    receipt = receipt_for(7, "pi-1", _offer(_update()))

    assert (receipt.status, receipt.code, receipt.reason) == ("accepted", "accepted", "")


def test_no_round_keeps_its_legacy_text() -> None:
    assert NO_ROUND.reason == "no round is open"


# --- the legacy path ---------------------------------------------------------------------
def test_legacy_accepted_status_is_accepted_whatever_the_reason() -> None:
    assert code_from_legacy_reason("accepted", "late: nonsense") == "accepted"


def test_legacy_unknown_rejection_text_is_malformed() -> None:
    assert code_from_legacy_reason("rejected", "something new") == "malformed"


def test_legacy_undecodable_frame_that_is_not_oversized_is_malformed() -> None:
    assert code_from_legacy_reason("rejected", "undecodable: frame too short (3 bytes)") == (
        "malformed"
    )


# --- on the wire ----------------------------------------------------------------------------
class ReceiptBeforeCodes(msgspec.Struct, frozen=True, kw_only=True):
    """The Receipt as agents older than the codes declare it (unknown fields ignored)."""

    schema: int = 1
    ts: float = 0.0
    round: int
    client_id: str
    status: Literal["accepted", "rejected"]
    reason: str = ""


def _wire(**fields: Any) -> bytes:
    return json.dumps({"schema": 1, "ts": 1.0, "round": 3, "client_id": "pi-1", **fields}).encode()


def test_receipt_with_code_round_trips() -> None:
    receipt = Receipt(round=3, client_id="pi-1", status="rejected", reason="x", code="over-norm")

    assert decode(receipt.to_json(), Receipt) == receipt


def test_receipt_without_code_decodes_and_takes_the_code_of_its_reason() -> None:
    payload = _wire(status="rejected", reason="stale base model abc, round is on def")

    receipt = decode(payload, Receipt)

    assert receipt.code is None
    assert receipt.effective_code() == "stale-base"


def test_receipt_with_code_prefers_the_code_to_the_reason() -> None:
    receipt = decode(
        _wire(status="rejected", reason="late: round 3 is closed", code="malformed"), Receipt
    )

    assert receipt.effective_code() == "malformed"


def test_old_decoder_reads_a_receipt_with_code() -> None:
    receipt = receipt_for(3, "pi-1", late(3))

    old = msgspec.json.decode(receipt.to_json(), type=ReceiptBeforeCodes)

    assert (old.status, old.reason) == ("rejected", "late: round 3 is closed")


def test_a_code_from_a_newer_aggregator_reads_as_a_final_refusal() -> None:
    receipt = decode(_wire(status="rejected", code="quota-exceeded"), Receipt)

    assert receipt.code == "quota-exceeded"
    assert receipt.effective_code() == "malformed"


def test_a_code_that_is_not_a_code_name_is_refused_naming_the_field() -> None:
    with pytest.raises(MessageError, match=r"\$\.code"):
        decode(_wire(status="rejected", code="Not A Code!"), Receipt)


@pytest.mark.parametrize(("status", "code"), [("accepted", "late"), ("rejected", "accepted")])
def test_status_contradicting_code_is_refused(status: str, code: str) -> None:
    with pytest.raises(MessageError, match="contradicts"):
        decode(_wire(status=status, code=code), Receipt)
