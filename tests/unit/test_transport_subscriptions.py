"""MqttTransport's subscriptions: what it (re)subscribes to, and waiting for SUBACK/UNSUBACK.

No broker: a fake paho client records the calls and answers them like a broker would
(immediately, later from another thread, never, or by dropping the connection).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from shared.mqtt.options import ConnectOptions
from shared.mqtt.subscriptions import Ack, PendingAcks
from shared.mqtt.transport import MqttTransport

MODEL = "fl/v1/f/global/model"
MODEL_CHUNKS = "fl/v1/f/global/model/chunk/+"
DELTA = "fl/v1/f/global/delta"


class Code:
    """A paho ReasonCode stand-in: ``is_failure`` and its name."""

    def __init__(self, name: str = "Success", failure: bool = False) -> None:
        self.name, self.is_failure = name, failure

    def __str__(self) -> str:
        return self.name


class FakeClient:
    """Records subscribe/unsubscribe calls; ``answer(mid)`` decides how the broker replies."""

    protocol = 5  # paho's MQTTv5: subscriptions carry SubscribeOptions

    def __init__(self, transport: MqttTransport) -> None:
        self.transport = transport
        self.calls: list[tuple[str, Any]] = []
        self.answer: Callable[[int], None] = self.ack_now
        self.mid = 0

    def subscribe(self, topics: Any) -> tuple[int, int]:
        self.calls.append(("subscribe", [(t, o.QoS) for t, o in topics]))
        return self._sent()

    def unsubscribe(self, topics: Any) -> tuple[int, int]:
        self.calls.append(("unsubscribe", topics))
        return self._sent()

    def _sent(self) -> tuple[int, int]:
        self.mid += 1
        self.answer(self.mid)
        return 0, self.mid

    def ack_now(self, mid: int, *codes: Code) -> None:
        """The answer arrives (on the network thread) before paho's call has returned."""
        thread = threading.Thread(target=self.acknowledge, args=(mid, *codes))
        thread.start()
        thread.join(0.05)  # blocked on the tracker's lock until the request is registered

    def acknowledge(self, mid: int, *codes: Code) -> None:
        answer: list[Any] = list(codes or [Code(), Code()])
        self.transport._on_ack(self, None, mid, answer, None)  # type: ignore[arg-type]


def _transport(
    connected: bool = True, ack_timeout_s: float = 5.0
) -> tuple[MqttTransport, FakeClient]:
    t = MqttTransport(
        "mqtt://127.0.0.1:1",
        "pi-0",
        subscriptions=[(MODEL, 1), (DELTA, 1)],
        options=ConnectOptions(ack_timeout_s=ack_timeout_s),
    )
    fake = FakeClient(t)
    t._client = fake  # type: ignore[assignment]
    if connected:
        t.connected.set()
    return t, fake


def test_unsubscribe_drops_the_topic_and_its_chunks_now_and_after_reconnects() -> None:
    t, fake = _transport()

    t.unsubscribe(MODEL)

    assert fake.calls == [("unsubscribe", [MODEL, MODEL_CHUNKS])]
    assert t._subs == [(DELTA, 1)]  # what a reconnect subscribes to


def test_unsubscribe_while_disconnected_only_changes_the_list() -> None:
    t, fake = _transport(connected=False)

    t.unsubscribe(MODEL)
    t.subscribe(MODEL)

    assert fake.calls == []
    assert t._subs == [(DELTA, 1), (MODEL, 1)]


def test_subscribing_again_while_connected_includes_the_chunks_in_one_request() -> None:
    t, fake = _transport()
    t.unsubscribe(MODEL)
    fake.calls.clear()

    t.subscribe(MODEL)

    assert fake.calls == [("subscribe", [(MODEL, 1), (MODEL_CHUNKS, 1)])]


def test_unsubscribe_returns_only_after_the_broker_confirmed_it() -> None:
    t, fake = _transport()
    acked = threading.Event()

    def ack_later(mid: int) -> None:
        def later() -> None:
            acked.set()
            fake.acknowledge(mid)

        threading.Timer(0.2, later).start()

    fake.answer = ack_later

    t.unsubscribe(MODEL)

    assert acked.is_set()


def test_unsubscribe_without_an_answer_gives_up_after_the_timeout() -> None:
    t, fake = _transport(ack_timeout_s=0.1)
    fake.answer = lambda mid: None

    t.unsubscribe(MODEL)

    assert t._subs == [(DELTA, 1)]
    assert t._acks._requests == {}  # nothing left waiting


def test_a_lost_connection_wakes_a_waiting_unsubscribe_at_once() -> None:
    t, fake = _transport(ack_timeout_s=30)
    fake.answer = lambda mid: threading.Timer(0.1, _drop, args=(t,)).start()
    woke = threading.Event()

    def unsubscribe() -> None:
        t.unsubscribe(MODEL)
        woke.set()

    threading.Thread(target=unsubscribe).start()

    assert woke.wait(5)  # not the 30 s timeout
    assert t._subs == [(DELTA, 1)]  # the reconnect does not subscribe to it again


def _drop(t: MqttTransport) -> None:
    t._on_disconnect(t._client, None, None, Code("Unspecified error", True), None)  # type: ignore[arg-type]


def test_a_refused_subscription_is_logged_with_the_topic_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    t, fake = _transport()
    fake.answer = lambda mid: fake.ack_now(mid, Code(), Code("Not authorized", True))

    t.subscribe(MODEL)

    assert f"{MODEL_CHUNKS}: Not authorized" in caplog.text
    assert "subscribed to" not in caplog.text  # not reported as done


def test_tracker_answers_a_waiter_even_when_the_ack_came_first() -> None:
    acks = PendingAcks()
    mid = acks.send(["a", "b"], lambda: (0, 7))
    assert mid == 7
    assert acks.acknowledged(7, [None, "Not authorized"]) is None  # the waiter reports it

    assert acks.wait(7, timeout=0) == Ack(refused=("b: Not authorized",))


def test_tracker_sends_nothing_trackable_when_paho_is_not_connected() -> None:
    acks = PendingAcks()

    assert acks.send(["a"], lambda: (4, None)) is None  # MQTT_ERR_NO_CONN


def test_tracker_forgets_unawaited_requests_once_answered_or_lost() -> None:
    acks = PendingAcks()
    acks.send(["a"], lambda: (0, 1), awaited=False)
    acks.send(["b"], lambda: (0, 2), awaited=False)

    assert acks.acknowledged(1, [None]) == Ack()
    acks.connection_lost()

    assert acks._requests == {}
    assert acks.acknowledged(2, [None]) is None  # unknown by now: ignored
