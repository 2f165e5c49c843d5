"""A device flooding junk, against the real service over the in-memory broker (no sleeps).

The flood is bounded three times: in the transport inbox (a share per sender, served in
turn), by the service's update budget (read up to the burst, then dropped unread) and in
the log (one line per sender per interval). tests/integration/test_hardening_flood.py does
the same over Mosquitto with real processes and measures it.
"""

from __future__ import annotations

import logging

import pytest

from shared.mqtt.base import Session
from shared.protocol import messages as msg
from tests.unit.inprocess import Federation, T, update_frame, wait_for

FLOOD = 5_000


def _receipt_codes(fed: Federation, client_id: str) -> list[str]:
    return [
        msg.decode(m.payload, msg.Receipt).effective_code()
        for m in fed.broker.messages(T.receipt_any)
        if msg.decode(m.payload, msg.Receipt).client_id == client_id
    ]


def test_a_junk_flood_is_answered_at_a_bounded_rate_and_the_round_completes(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    device = fed.silent_device("pi-s")  # selected; it reports after the flood
    fed.start_agent("pi-0", seed=1)
    fed.wait_online("pi-s", "pi-0")
    service = fed.start_aggregator(rounds=1, min_clients=2, update_burst=10)
    wait_for(lambda: fed.open_round() == 1, "round 1 announced")
    mallory = fed.broker.connector(Session("mallory")).start()

    for _ in range(FLOOD):
        mallory.publish(T.update(1, "mallory"), b"junk", qos=0)
    # Served in turn with the flood, pi-s's update would close the round before the
    # aggregator got to mallory's messages: it reports once the flood has been answered.
    wait_for(lambda: "rate-limited" in _receipt_codes(fed, "mallory"), "the flood answered")
    device.transport.publish(T.update(1, "pi-s"), update_frame(service, 1, "pi-s"))
    codes = fed.finish()

    assert codes["aggregator"] == 0
    (applied,) = fed.rounds()
    assert applied["participants"] == ["pi-0", "pi-s"]
    # The clock did not move: the burst was read and refused, the rest answered once.
    assert _receipt_codes(fed, "mallory") == ["malformed"] * 10 + ["rate-limited"]
    about_mallory = [r for r in caplog.records if "mallory" in r.getMessage()]
    assert len(about_mallory) <= 6, [r.getMessage() for r in about_mallory]
