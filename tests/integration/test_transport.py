"""MqttTransport against a real mosquitto: subscription changes hold once the call returns.

Ordering is what makes these checks exact instead of timed: mosquitto handles one client's
packets in order and delivers to one subscriber in the order it routed, so a marker
message published after the change proves everything before it has arrived.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.mqtt.base import Inbound
from shared.mqtt.transport import MqttTransport

pytestmark = pytest.mark.integration

MODEL, DELTA, MARK = "fl/v1/t/global/model", "fl/v1/t/global/delta", "fl/v1/t/mark"
WAIT = 10.0  # loopback answers in milliseconds: this only bounds a broken broker


@pytest.fixture
def publisher(broker: LocalBroker) -> Iterator[MqttTransport]:
    t = MqttTransport(broker.url, "publisher").start()
    try:
        yield t
    finally:
        t.stop()


def _until(inbox: queue.Queue[Inbound], topic: str) -> list[Inbound]:
    """Every message up to and including the first one on ``topic``."""
    out: list[Inbound] = []
    while not out or out[-1].topic != topic:
        out.append(inbox.get(timeout=WAIT))
    return out


def test_nothing_arrives_on_a_topic_once_unsubscribe_returned(
    broker: LocalBroker, publisher: MqttTransport
) -> None:
    agent = MqttTransport(broker.url, "agent").start()
    try:
        agent.subscribe(MARK)
        agent.subscribe(MODEL)

        agent.unsubscribe(MODEL)
        publisher.publish(MODEL, b"full model")  # at once, like a resumed aggregator
        publisher.publish(MARK, b"after")
        seen = _until(agent.inbox, MARK)
    finally:
        agent.stop()

    assert [(m.topic, m.payload) for m in seen] == [(MARK, b"after")]


def test_retained_messages_of_a_new_subscription_come_before_anything_published_after(
    broker: LocalBroker, publisher: MqttTransport
) -> None:
    publisher.publish(DELTA, b"retained delta", retain=True)
    agent = MqttTransport(broker.url, "agent").start()
    try:
        agent.subscribe(MARK)
        agent.subscribe(DELTA)
        publisher.publish(MARK, b"after")
        seen = _until(agent.inbox, MARK)
    finally:
        agent.stop()

    assert [(m.topic, m.payload, m.retain) for m in seen] == [
        (DELTA, b"retained delta", True),
        (MARK, b"after", False),
    ]
