"""The outbound queue is bounded (shared/mqtt/outbound.py): at the bound a publish is refused.

Without ``wait`` it is dropped, counted and logged once per interval; with ``wait`` it raises.
A real paho client that is not connected queues QoS 1 publishes (rc NO_CONN) as it does while
a connection is down, so it fills its queue without a broker; the in-memory broker's clients
keep the same bound.
"""

from __future__ import annotations

import logging

import pytest

from shared.clock import ManualClock
from shared.mqtt.base import Session, TransportError
from shared.mqtt.chunking import ChunkPlanner
from shared.mqtt.memory import MemoryBroker
from shared.mqtt.options import ConnectOptions
from shared.mqtt.outbound import DROP_LOG_INTERVAL_S
from shared.mqtt.transport import MqttTransport

BOUND = 8
URL = "mqtt://127.0.0.1:1"  # never connected to


def _queue_full_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "outbound queue full" in r.getMessage()]


def test_a_disconnected_paho_client_drops_what_is_over_its_bound_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = MqttTransport(URL, "agg", options=ConnectOptions(max_queued_messages=BOUND))
    caplog.set_level(logging.WARNING, logger="shared.mqtt.outbound")

    for i in range(BOUND + 5):
        t.publish(f"fl/v1/f/round/1/receipt/pi-{i}", b"{}", qos=1, wait=False)

    assert t.dropped_full_queue == 5
    assert len(t._client._out_messages) == BOUND  # paho's queue, held to the bound
    (line,) = _queue_full_lines(caplog)  # one line, not one per message
    assert "pi-8" in line and "8 messages awaiting the broker" in line


def test_a_waiting_publish_into_a_full_queue_raises_a_transport_error() -> None:
    t = MqttTransport(URL, "agg", options=ConnectOptions(max_queued_messages=BOUND))
    for i in range(BOUND):
        t.publish(f"fl/v1/f/x/{i}", b"x", qos=1, wait=False)
    t.connected.set()  # as if connected: the queue, not the connection, refuses it

    with pytest.raises(TransportError, match=r"outbound queue is full \(8 messages"):
        t.publish("fl/v1/f/global/model", b"model", qos=1, timeout=1.0)

    assert t.dropped_full_queue == 0  # raised, not dropped


def test_a_chunked_payload_refused_midway_drops_its_remaining_chunks() -> None:
    opts = ConnectOptions(max_queued_messages=BOUND, max_chunk_bytes=64 * 1024)
    t = MqttTransport(URL, "pi-0", options=opts)
    for i in range(BOUND - 2):
        t.publish(f"fl/v1/f/x/{i}", b"x", qos=1, wait=False)

    topic, payload = "fl/v1/f/round/1/update/pi-0", bytes(5 * 64 * 1024)
    chunks = len(ChunkPlanner().plan(topic, payload, False, t.chunk_capacity()))

    t.publish(topic, payload, qos=1, wait=False)

    assert len(t._client._out_messages) == BOUND  # two chunks queued
    assert t.dropped_full_queue == chunks - 2  # the chunk refused and every one after it


def test_a_memory_client_drops_publishes_over_its_bound_while_disconnected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock, max_queued_messages=BOUND)
    dev = broker.connector(Session("pi-0")).start()
    broker.disconnect("pi-0")
    caplog.set_level(logging.WARNING, logger="shared.mqtt.outbound")

    for i in range(BOUND + 5):
        dev.publish(f"fl/v1/f/x/{i}", b"x", qos=1, wait=False)

    assert (dev.queued, dev.dropped_full_queue) == (BOUND, 5)
    assert len(_queue_full_lines(caplog)) == 1
    clock.advance(DROP_LOG_INTERVAL_S)
    dev.publish("fl/v1/f/x/last", b"x", qos=1, wait=False)
    _, summary, again = _queue_full_lines(caplog)  # the interval's count, then a new one
    assert "4 more like this" in summary and "5 dropped so far" in summary
    assert "x/last" in again
    broker.reconnect("pi-0")
    assert len(broker.messages("fl/v1/f/x/+")) == BOUND  # what was queued is sent
