"""The transport's chunk receiver: sweeps without traffic, aggregated logs, retained updates.

No broker: the receiver is driven directly, and MqttTransport through a fake paho client.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.cli import _mqtt
from aggregator.config import AggregatorConfig
from shared.mqtt.base import Session
from shared.mqtt.chunk_receiver import ChunkReceiver
from shared.mqtt.chunking import MIN_CHUNK_BYTES, split
from shared.mqtt.options import ConnectOptions
from shared.mqtt.reassembly import ReassemblyLimits
from shared.mqtt.transport import MqttTransport
from shared.protocol.topics import Topics, chunk_topic, quota_key
from tests.unit.inprocess import wait_for
from tests.unit.test_chunking import MIB, forged_chunk

CAP = MIN_CHUNK_BYTES
T = Topics("f")
UPDATE = T.update(1, "pi-0")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def receiver(clock: FakeClock, cleared: list[str] | None = None) -> ChunkReceiver:
    """An aggregator's receiver: one update per sender, updates never retained."""
    limits = ReassemblyLimits(max_payload=64 * CAP, sender_transfers=1, timeout_s=10)
    return ChunkReceiver(
        limits,
        sender_of=quota_key,
        never_retained=lambda topic: "/update/" in topic,
        clear=(cleared if cleared is not None else []).append,
        clock=clock,
        report_every_s=10,
    )


def test_live_update_chunks_come_out_whole_on_the_base_topic() -> None:
    payload = os.urandom(3 * CAP)
    rx = receiver(FakeClock())

    out = [rx.receive(chunk_topic(UPDATE, i), c, False) for i, c in enumerate(split(payload, CAP))]

    assert out == [None, None, (UPDATE, payload)]


def test_sweep_expires_a_transfer_when_no_chunk_arrives() -> None:
    clock = FakeClock()
    rx = receiver(clock)
    rx.receive(chunk_topic(UPDATE, 0), split(os.urandom(3 * CAP), CAP)[0], False)

    clock.now = 11
    rx.sweep()

    assert rx.reassembler.open_transfers == 0 and rx.reassembler.held_bytes == 0


def test_sweeper_thread_expires_transfers_on_its_own() -> None:
    clock = FakeClock()
    rx = receiver(clock)
    rx.sweep_every_s = 0.01
    rx.receive(chunk_topic(UPDATE, 0), split(os.urandom(3 * CAP), CAP)[0], False)
    rx.start("test")
    try:
        clock.now = 11
        wait_for(lambda: rx.reassembler.open_transfers == 0, "the sweeper to expire it")
    finally:
        rx.stop()

    assert rx.reassembler.held_bytes == 0


def test_refusals_are_logged_once_per_sender_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    rx = receiver(clock)
    evil = T.update(1, "pi-evil")
    for i in range(1, 500):
        rx.receive(
            chunk_topic(evil, i), forged_chunk(bytes(CAP), i=i, n=900, off=0, total=MIB), False
        )
    for _ in range(2):
        rx.receive(chunk_topic(UPDATE, 0), split(os.urandom(3 * CAP), CAP)[0], False)
    caplog.set_level(logging.WARNING)

    early = rx.sweep()
    clock.now = 10
    reports = rx.sweep()

    assert early == [] and len(caplog.records) == 2
    assert "pi-evil: 499 malformed" in caplog.records[0].getMessage()
    assert "pi-0: 1 superseded" in caplog.records[1].getMessage()
    assert [r.sender for r in reports] == ["pi-evil", "pi-0"]


def test_retained_update_chunk_is_cleared_not_reassembled() -> None:
    cleared: list[str] = []
    rx = receiver(FakeClock(), cleared)
    topic = chunk_topic(UPDATE, 0)

    out = rx.receive(topic, split(os.urandom(3 * CAP), CAP)[0], True)

    assert out is None and cleared == [topic]
    assert rx.reassembler.open_transfers == 0
    assert rx.reassembler.tally.drain()[0].counts == (("retained", 1),)


def test_retained_whole_update_is_cleared_and_not_handed_on() -> None:
    cleared: list[str] = []
    rx = receiver(FakeClock(), cleared)

    assert rx.receive(UPDATE, b"a frame", True) is None
    assert cleared == [UPDATE]


def test_a_clearance_coming_back_is_not_cleared_again() -> None:
    cleared: list[str] = []
    rx = receiver(FakeClock(), cleared)

    assert rx.receive(chunk_topic(UPDATE, 3), b"", True) is None
    assert cleared == []


def test_retained_model_chunks_are_reassembled() -> None:
    payload = os.urandom(2 * CAP)
    rx = receiver(FakeClock())
    chunks = split(payload, CAP)

    out = [rx.receive(chunk_topic(T.global_model, i), c, True) for i, c in enumerate(chunks)]

    assert out[-1] == (T.global_model, payload)


# --- MqttTransport wiring, through a fake paho client --------------------------------------
class FakePaho:
    """Records subscriptions (with their options) and publishes."""

    protocol = 5  # paho's MQTTv5: subscriptions carry SubscribeOptions

    def __init__(self) -> None:
        self.subscribed: list[tuple[str, bool]] = []
        self.published: list[tuple[str, bytes, bool]] = []

    def subscribe(self, topics: Any) -> tuple[int, int]:
        self.subscribed += [(t, o.retainAsPublished) for t, o in topics]
        return 0, 1

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        self.published.append((topic, payload, retain))
        return mqtt.MQTTMessageInfo(len(self.published))  # rc: success


class Success:
    is_failure = False
    value = 0  # CONNACK "Success"


def aggregator_transport() -> tuple[MqttTransport, FakePaho]:
    t = MqttTransport(
        "mqtt://127.0.0.1:1",
        "aggregator",
        subscriptions=[(T.update_any, 1), (T.agent_status_any, 1)],
        options=ConnectOptions(unretained=(T.update_any,)),
    )
    fake = FakePaho()
    t._client = fake  # type: ignore[assignment]
    return t, fake


def test_update_subscriptions_keep_the_retain_flag_of_live_messages() -> None:
    t, fake = aggregator_transport()

    t._on_connect(fake, None, None, Success(), None)  # type: ignore[arg-type]

    assert sorted(fake.subscribed) == [
        (T.agent_status_any, False),
        (f"{T.agent_status_any}/chunk/+", False),
        (T.update_any, True),
        (f"{T.update_any}/chunk/+", True),
    ]


def test_transport_clears_a_retained_update_chunk_from_the_broker() -> None:
    t, fake = aggregator_transport()
    msg = mqtt.MQTTMessage(topic=chunk_topic(UPDATE, 0).encode())
    msg.payload, msg.retain = split(os.urandom(2 * CAP), CAP)[0], True

    t._on_message(fake, None, msg)  # type: ignore[arg-type]

    assert fake.published == [(chunk_topic(UPDATE, 0), b"", True)]
    assert t.inbox.empty()


def test_aggregator_connector_bounds_each_device_to_one_update() -> None:
    cfg = AggregatorConfig(federation="f", max_update_bytes=3 * MIB)

    transport = _mqtt(cfg)(Session("aggregator"))

    assert isinstance(transport, MqttTransport)
    assert transport.options.reassembly == ReassemblyLimits.one_update_per_sender(3 * MIB)
    assert transport.options.unretained == (T.update_any,)
