"""The in-memory broker (shared/mqtt/memory.py): the MQTT behaviour fedmq relies on."""

from __future__ import annotations

import queue
import threading

import pytest

from shared.clock import ManualClock, SystemClock
from shared.mqtt.base import Inbound, Outbound, Session, TransportError
from shared.mqtt.memory import MemoryBroker, MemoryTransport, topic_matches


def _client(broker: MemoryBroker, cid: str, *subs: str, **kw: object) -> MemoryTransport:
    session = Session(cid, tuple((s, 1) for s in subs), **kw)  # type: ignore[arg-type]
    return broker.connector(session).start()


def _drain(t: MemoryTransport) -> list[Inbound]:
    out = []
    while True:
        try:
            out.append(t.inbox.get_nowait())
        except queue.Empty:
            return out


@pytest.mark.parametrize(
    ("subscription", "topic", "matches"),
    [
        ("fl/v1/a/round/1/start", "fl/v1/a/round/1/start", True),
        ("fl/v1/+/round/+/start", "fl/v1/a/round/7/start", True),
        ("fl/v1/+/round/+/start", "fl/v1/a/round/7/update/x", False),
        ("fl/#", "fl/v1/a/b", True),
        ("fl/#", "fl", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("fl/v1/+", "fl/v1", False),
    ],
)
def test_topic_filters_follow_mqtt_wildcards(subscription: str, topic: str, matches: bool) -> None:
    assert topic_matches(subscription, topic) is matches


def test_a_message_reaches_every_matching_subscriber_once() -> None:
    broker = MemoryBroker()
    a = _client(broker, "a", "fl/+/x", "fl/#")
    b = _client(broker, "b", "other/#")
    pub = _client(broker, "pub")

    pub.publish("fl/1/x", b"hello")

    assert [(m.topic, m.payload, m.retain) for m in _drain(a)] == [("fl/1/x", b"hello", False)]
    assert _drain(b) == []


def test_retained_messages_reach_late_subscribers_and_an_empty_payload_clears_them() -> None:
    broker = MemoryBroker()
    pub = _client(broker, "pub")
    pub.publish("fl/model", b"v1", retain=True)
    pub.publish("fl/meta", b"m1", retain=True)
    pub.publish("fl/meta", b"", retain=True)

    late = _client(broker, "late", "fl/#")

    assert [(m.topic, m.payload, m.retain) for m in _drain(late)] == [("fl/model", b"v1", True)]
    assert broker.retained("fl/meta") is None


def test_a_cut_connection_publishes_the_will_but_a_clean_stop_does_not() -> None:
    broker = MemoryBroker()
    watcher = _client(broker, "watcher", "status/#")
    will = Outbound("status/dev", b"offline", retain=True)
    dev = _client(broker, "dev", will=will)
    other = _client(broker, "other", will=Outbound("status/other", b"offline", retain=True))

    broker.disconnect("dev")
    other.stop()

    assert [(m.topic, m.payload) for m in _drain(watcher)] == [("status/dev", b"offline")]
    assert broker.retained("status/dev") == b"offline"
    assert not dev.connected and broker.connected() == ["watcher"]


def test_publishes_made_while_disconnected_are_redelivered_on_reconnect_with_births() -> None:
    broker = MemoryBroker()
    sink = _client(broker, "sink", "fl/#")
    births = lambda: [Outbound("fl/status/dev", b"online", retain=True)]  # noqa: E731
    dev = _client(broker, "dev", "fl/cmd", births=births)
    _drain(sink)
    broker.disconnect("dev")

    dev.publish("fl/update", b"u1", qos=1, wait=False)
    dev.publish("fl/lost", b"q0", qos=0, wait=False)
    assert _drain(sink) == []
    broker.reconnect("dev")

    got = [(m.topic, m.payload) for m in _drain(sink)]
    assert got == [("fl/status/dev", b"online"), ("fl/update", b"u1")]
    assert dev.connect_count == 2


def test_subscriptions_survive_a_reconnect_and_messages_sent_while_away_are_missed() -> None:
    broker = MemoryBroker()
    dev = _client(broker, "dev", "fl/cmd")
    pub = _client(broker, "pub")
    broker.disconnect("dev")
    pub.publish("fl/cmd", b"while away")
    broker.reconnect("dev")

    pub.publish("fl/cmd", b"after")

    assert [m.payload for m in _drain(dev)] == [b"after"]


def test_a_restart_forgets_retained_messages_unless_the_broker_is_persistent() -> None:
    volatile, persistent = MemoryBroker(), MemoryBroker(persistent=True)
    for broker in (volatile, persistent):
        _client(broker, "pub").publish("fl/model", b"v1", retain=True)
        broker.restart()
        broker.reconnect_all()

    assert volatile.retained("fl/model") is None
    assert persistent.retained("fl/model") == b"v1"


def test_dropped_messages_are_acknowledged_but_never_delivered() -> None:
    broker = MemoryBroker()
    dev = _client(broker, "dev", "fl/receipt/#")
    agg = _client(broker, "agg")
    broker.drop("fl/receipt/+", count=1)

    agg.publish("fl/receipt/1", b"lost")
    agg.publish("fl/receipt/1", b"kept")

    assert [m.payload for m in _drain(dev)] == [b"kept"]
    assert [m.dropped for m in broker.messages("fl/receipt/#")] == [True, False]


def test_a_waiting_publish_goes_out_once_the_client_is_reconnected() -> None:
    broker = MemoryBroker()
    sink = _client(broker, "sink", "fl/#")
    dev = _client(broker, "dev")
    broker.disconnect("dev")
    done = threading.Event()

    def publish() -> None:
        dev.publish("fl/model", b"m", timeout=30)
        done.set()

    worker = threading.Thread(target=publish)
    worker.start()
    broker.reconnect("dev")
    worker.join(30)

    assert done.is_set()
    assert [m.payload for m in _drain(sink)] == [b"m"]


def test_a_waiting_publish_fails_when_nobody_reconnects_in_time() -> None:
    broker = MemoryBroker()
    dev = _client(broker, "dev")
    broker.disconnect("dev")

    with pytest.raises(TransportError, match="not connected"):
        dev.publish("fl/model", b"m", timeout=0.05)


@pytest.mark.parametrize("bad", ["fl/#/x", "fl/a+", "$share/g/fl/#", ""])
def test_filters_a_real_broker_refuses_are_refused(bad: str) -> None:
    broker = MemoryBroker()
    dev = _client(broker, "dev")

    with pytest.raises(TransportError):
        dev.subscribe(bad)


def test_the_manual_clock_moves_only_when_advanced() -> None:
    clock = ManualClock(start=100.0)
    inbox: queue.Queue[int] = queue.Queue()

    before = (clock.time(), clock.monotonic(), clock.wait(inbox, 60.0))
    clock.advance(5.0)

    assert before == (100.0, 0.0, None)
    assert (clock.time(), clock.monotonic()) == (105.0, 5.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_a_clock_wait_returns_the_next_item() -> None:
    inbox: queue.Queue[int] = queue.Queue()
    inbox.put(7)

    assert ManualClock().wait(inbox, 1.0) == 7
    assert SystemClock().wait(inbox, 0.0) is None
