"""MqttTransport's subscription list: what it (re)subscribes to, and unsubscribing (no broker)."""

from __future__ import annotations

from typing import Any

from shared.mqtt.transport import MqttTransport


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, topic: Any, qos: int = 0) -> None:
        self.calls.append(("subscribe", topic))

    def unsubscribe(self, topic: Any) -> None:
        self.calls.append(("unsubscribe", topic))


def _transport() -> tuple[MqttTransport, FakeClient]:
    t = MqttTransport(
        "mqtt://127.0.0.1:1",
        "pi-0",
        subscriptions=[("fl/v1/f/global/model", 1), ("fl/v1/f/global/delta", 1)],
    )
    fake = FakeClient()
    t._client = fake  # type: ignore[assignment]
    return t, fake


def test_unsubscribe_drops_the_topic_and_its_chunks_now_and_after_reconnects() -> None:
    t, fake = _transport()
    t.connected.set()

    t.unsubscribe("fl/v1/f/global/model")

    assert fake.calls == [("unsubscribe", ["fl/v1/f/global/model", "fl/v1/f/global/model/chunk/+"])]
    assert t._subs == [("fl/v1/f/global/delta", 1)]  # what a reconnect subscribes to


def test_unsubscribe_while_disconnected_only_changes_the_list() -> None:
    t, fake = _transport()

    t.unsubscribe("fl/v1/f/global/model")
    t.subscribe("fl/v1/f/global/model")

    assert fake.calls == []
    assert t._subs == [("fl/v1/f/global/delta", 1), ("fl/v1/f/global/model", 1)]


def test_subscribing_again_while_connected_includes_the_chunks() -> None:
    t, fake = _transport()
    t.connected.set()
    t.unsubscribe("fl/v1/f/global/model")
    fake.calls.clear()

    t.subscribe("fl/v1/f/global/model")

    assert fake.calls == [
        ("subscribe", "fl/v1/f/global/model"),
        ("subscribe", "fl/v1/f/global/model/chunk/+"),
    ]
