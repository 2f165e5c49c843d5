"""The transport inbox (shared/mqtt/inbox.py): bounded per sender and in all, served fairly.

The same inbox is paho's (MqttTransport) and the in-memory broker's, so the bound is part of
the Transport contract; tests/integration/test_hardening_flood.py floods a real broker.
"""

from __future__ import annotations

import logging
import queue

import pytest

from shared.mqtt.base import Inbound, Session
from shared.mqtt.inbox import FairInbox, InboxLimits
from shared.mqtt.memory import MemoryBroker
from shared.protocol.topics import Topics, sender_of

T = Topics("lab")


def _update(client: str, payload: bytes = b"junk", round_id: int = 1) -> Inbound:
    return Inbound(T.update(round_id, client), payload, False)


def _inbox(**limits: int) -> FairInbox:
    return FairInbox("aggregator", InboxLimits(**limits), clock=lambda: 0.0)


def _drain(inbox: queue.Queue[Inbound]) -> list[Inbound]:
    out = []
    while True:
        try:
            out.append(inbox.get_nowait())
        except queue.Empty:
            return out


def _senders(items: list[Inbound]) -> list[str | None]:
    return [sender_of(i.topic) for i in items]


# --- who sent it --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "topic, sender",
    [
        (T.update(3, "pi-7"), "pi-7"),
        (T.agent_status("pi-7"), "pi-7"),
        ("fl/v1/lab/agents/bad id!/status", "bad id!"),
        (T.infer_request("pi-7", "app"), "app"),  # the requester's login (ACL-bound)
        (T.infer_response("pi-7", "app"), None),
        (T.receipt(3, "pi-7"), None),  # the aggregator writes receipts
        (T.global_model, None),
        (T.round_start(3), None),
        ("somewhere/else/round/1/update/x", None),
    ],
)
def test_a_message_is_attributed_to_the_device_whose_topic_it_came_on(
    topic: str, sender: str | None
) -> None:
    assert sender_of(topic) == sender


# --- per-sender bound ---------------------------------------------------------------------
def test_a_flooding_sender_keeps_only_its_share_and_its_newest_are_dropped() -> None:
    inbox = _inbox(per_sender_messages=3)

    for i in range(10):
        inbox.put(_update("mallory", str(i).encode()))

    assert [i.payload for i in _drain(inbox)] == [b"0", b"1", b"2"]
    assert inbox.dropped["mallory"] == 7


def test_an_honest_sender_is_admitted_while_a_flooder_is_at_its_share() -> None:
    inbox = _inbox(per_sender_messages=3)
    for _ in range(10):
        inbox.put(_update("mallory"))

    inbox.put(_update("pi-0", b"honest update"))

    assert b"honest update" in [i.payload for i in _drain(inbox)]
    assert inbox.dropped["pi-0"] == 0


def test_a_sender_share_is_bounded_in_bytes_too() -> None:
    inbox = _inbox(per_sender_bytes=10)

    inbox.put(_update("mallory", b"x" * 8))
    inbox.put(_update("mallory", b"x" * 8))

    assert len(_drain(inbox)) == 1
    assert inbox.dropped["mallory"] == 1


# --- fair service -------------------------------------------------------------------------
def test_messages_are_served_one_sender_after_the_other() -> None:
    inbox = _inbox()
    for _ in range(5):
        inbox.put(_update("mallory"))
    inbox.put(_update("pi-0"))
    inbox.put(_update("pi-1"))

    served = _senders(_drain(inbox))

    # The honest updates wait behind one flood message, not five.
    assert served[:3] == ["mallory", "pi-0", "pi-1"]
    assert served.count("mallory") == 5


def test_one_sender_s_messages_keep_their_order() -> None:
    inbox = _inbox()
    inbox.put(_update("pi-0", b"online"))
    inbox.put(_update("pi-1", b"other"))
    inbox.put(_update("pi-0", b"update"))

    served = [i.payload for i in _drain(inbox) if sender_of(i.topic) == "pi-0"]

    assert served == [b"online", b"update"]


# --- global bound -------------------------------------------------------------------------
def test_a_full_inbox_evicts_the_newest_message_of_the_heaviest_sender() -> None:
    inbox = _inbox(max_messages=4, per_sender_messages=4)
    for i in range(4):
        inbox.put(_update("mallory", str(i).encode()))

    inbox.put(_update("pi-0", b"honest"))

    kept = [(sender_of(i.topic), i.payload) for i in _drain(inbox)]
    assert ("pi-0", b"honest") in kept
    assert (("mallory", b"3")) not in kept  # its newest made room
    assert inbox.dropped["mallory"] == 1


def test_a_full_inbox_drops_the_arrival_when_its_sender_has_the_largest_backlog() -> None:
    inbox = _inbox(max_messages=3)
    inbox.put(_update("pi-0"))
    inbox.put(_update("mallory", b"0"))
    inbox.put(_update("mallory", b"1"))

    inbox.put(_update("mallory", b"2"))

    assert [i.payload for i in _drain(inbox)] == [b"junk", b"0", b"1"]
    assert inbox.dropped["mallory"] == 1


def test_the_byte_bound_evicts_by_bytes() -> None:
    inbox = _inbox(max_bytes=100)
    inbox.put(_update("pi-0", b"a" * 10))
    inbox.put(_update("mallory", b"m" * 80))

    inbox.put(_update("pi-1", b"b" * 20))

    assert _senders(_drain(inbox)) == ["pi-0", "pi-1"]
    assert inbox.dropped["mallory"] == 1


def test_the_aggregator_s_own_topics_have_no_per_sender_share() -> None:
    inbox = _inbox(per_sender_messages=2)

    for r in range(5):
        inbox.put(Inbound(T.receipt(r, "pi-0"), b"{}", False))

    assert inbox.qsize() == 5


def test_put_never_blocks_on_a_full_inbox() -> None:
    inbox = _inbox(max_messages=1)
    inbox.put(_update("pi-0"))

    inbox.put(_update("pi-0"), block=True, timeout=None)  # returns at once: dropped

    assert inbox.qsize() == 1


# --- drops are logged, aggregated ---------------------------------------------------------
def test_drops_are_one_log_line_per_sender_and_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    inbox = FairInbox("aggregator", InboxLimits(per_sender_messages=1), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "shared.mqtt.inbox")
    for _ in range(1000):
        inbox.put(_update("mallory"))

    now[0] = 11.0
    inbox.get_nowait()  # the worker's next get writes the summary

    lines = [r.getMessage() for r in caplog.records if r.name == "shared.mqtt.inbox"]
    assert len(lines) == 2
    assert lines[0].startswith("aggregator dropped a message from mallory on ")
    assert lines[1].startswith("mallory: 998 more like this within 10s")


# --- the in-memory broker keeps the same contract -----------------------------------------
def test_the_memory_broker_bounds_each_client_inbox_per_sender() -> None:
    broker = MemoryBroker(inbox_limits=InboxLimits(per_sender_messages=5))
    aggregator = broker.connector(Session("aggregator", subscriptions=((T.update_any, 1),)))
    aggregator.start()
    flooder = broker.connector(Session("mallory")).start()
    honest = broker.connector(Session("pi-0")).start()

    for _ in range(1000):
        flooder.publish(T.update(1, "mallory"), b"junk", qos=0)
    honest.publish(T.update(1, "pi-0"), b"update")

    served = _senders(_drain(aggregator.inbox))
    assert served.count("mallory") == 5
    assert served[:2] == ["mallory", "pi-0"]


def test_refusals_before_the_inbox_are_counted_and_logged_per_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = _inbox()
    caplog.set_level(logging.WARNING, "shared.mqtt.inbox")

    for i in range(500):
        inbox.refuse(T.update(1, "mallory"), f"bad chunk {i}")

    assert inbox.dropped["mallory"] == 500
    assert len([r for r in caplog.records if r.name == "shared.mqtt.inbox"]) == 1
