"""An MQTT broker in memory, behind the same :class:`~shared.mqtt.base.Transport` seam.

For tests: the aggregator service and edge agents run against it in one process, with no
sockets and no sleeps. It keeps what fedmq relies on from a real broker:

- retained messages (an empty retained payload clears the topic), delivered on subscribe;
- ``+`` / ``#`` wildcards (``$``-topics are not matched by a leading wildcard);
- a last will, published when a client is disconnected without saying goodbye;
- QoS 1 redelivery on reconnect: a QoS ≥ 1 publish made while disconnected waits in the
  client (like paho's queue) and is sent when the client reconnects; at most
  ``max_queued_messages`` wait, beyond which a publish is refused as paho's would be
  (:mod:`shared.mqtt.outbound`: dropped and counted without ``wait``, TransportError with it);
- sessions end at disconnect (MQTT v5 with session expiry 0, what the agents use): messages
  published while a client is away are not queued for it, retained ones excepted;
- each client's ``inbox`` is the same bounded, per-sender fair queue as paho's
  (:class:`~shared.mqtt.inbox.FairInbox`, bounds from ``inbox_limits``).

Faults are injected by the test: :meth:`MemoryBroker.disconnect` (a network drop; the will
fires), :meth:`MemoryBroker.reconnect`, :meth:`MemoryBroker.restart` (retained messages are
lost unless ``persistent``), and :meth:`MemoryBroker.drop` (the broker acknowledges the next
matching messages and loses them, e.g. a receipt). Every message the broker routed is kept,
bounded, in :attr:`MemoryBroker.log` for assertions. Delivery is synchronous and in publish
order; each client's ``inbox`` is read by its own worker thread, as with paho.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.clock import Clock, SystemClock
from shared.mqtt.base import Inbound, Outbound, Session, TransportError
from shared.mqtt.inbox import FairInbox, InboxLimits
from shared.mqtt.options import DEFAULT_MAX_QUEUED_MESSAGES
from shared.mqtt.outbound import QueueFullDrops

# Routed messages kept for assertions.
LOG_SIZE = 100_000


def topic_matches(subscription: str, topic: str) -> bool:
    """True when ``topic`` matches the MQTT filter ``subscription`` (``+``, ``#``)."""
    sub_parts = subscription.split("/")
    parts = topic.split("/")
    if topic.startswith("$") and sub_parts[0] in ("+", "#"):
        return False
    for i, s in enumerate(sub_parts):
        if s == "#":
            return True
        if i >= len(parts):
            return False
        if s != "+" and s != parts[i]:
            return False
    return len(sub_parts) == len(parts)


def validate_filter(subscription: str) -> None:
    """Raise TransportError for a filter a real broker would refuse."""
    parts = subscription.split("/")
    bad = not subscription or any(
        ("#" in p and (p != "#" or i != len(parts) - 1)) or ("+" in p and p != "+")
        for i, p in enumerate(parts)
    )
    if bad or subscription.startswith("$share/"):
        raise TransportError(f"subscription filter {subscription!r} is not supported here")


@dataclass(frozen=True)
class Routed:
    """One message as the broker routed it (for assertions)."""

    sender: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dropped: bool = False


@dataclass
class _Drop:
    subscription: str
    remaining: int


@dataclass
class _Client:
    transport: MemoryTransport
    subscriptions: dict[str, int] = field(default_factory=dict)
    connected: bool = False


class MemoryBroker:
    """Routes messages between :class:`MemoryTransport` clients in one process."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        persistent: bool = False,
        inbox_limits: InboxLimits | None = None,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.persistent = persistent
        self.inbox_limits = inbox_limits or InboxLimits()
        # Each client's queue of publishes made while disconnected (ConnectOptions' bound).
        self.max_queued_messages = max_queued_messages
        self._lock = threading.RLock()
        self._retained: dict[str, bytes] = {}
        self._clients: dict[str, _Client] = {}
        self._drops: list[_Drop] = []
        self.log: collections.deque[Routed] = collections.deque(maxlen=LOG_SIZE)

    # --- the seam ---------------------------------------------------------------------
    def connector(self, session: Session) -> MemoryTransport:
        """A :data:`~shared.mqtt.base.Connector`: a new (not yet started) client."""
        return MemoryTransport(self, session)

    # --- what tests look at and do ----------------------------------------------------
    def retained(self, topic: str) -> bytes | None:
        """The retained payload of ``topic`` (None when nothing is retained there)."""
        with self._lock:
            return self._retained.get(topic)

    def messages(self, subscription: str = "#") -> list[Routed]:
        """Routed messages whose topic matches ``subscription``, oldest first."""
        with self._lock:
            return [m for m in self.log if topic_matches(subscription, m.topic)]

    def connected(self) -> list[str]:
        """Client ids currently connected, sorted."""
        with self._lock:
            return sorted(c for c, s in self._clients.items() if s.connected)

    def drop(self, subscription: str, count: int = 1) -> None:
        """Acknowledge and lose the next ``count`` messages matching ``subscription``."""
        validate_filter(subscription)
        with self._lock:
            self._drops.append(_Drop(subscription, count))

    def disconnect(self, client_id: str) -> None:
        """Cut ``client_id``'s connection (no DISCONNECT): its will is published."""
        with self._lock:
            client = self._clients.get(client_id)
            if client is None or not client.connected:
                return
            client.connected = False
            will = client.transport.session.will
        if will is not None:
            self._route(client_id, will.topic, will.payload, will.qos, will.retain)

    def reconnect(self, client_id: str) -> None:
        """Let ``client_id`` connect again (as paho does after a drop)."""
        with self._lock:
            client = self._clients.get(client_id)
        if client is not None and not client.connected and not client.transport.closed:
            client.transport.attach()

    def restart(self) -> None:
        """Drop every connection (wills fire) and forget retained messages unless persistent.

        Clients stay disconnected until :meth:`reconnect` (or :meth:`reconnect_all`).
        """
        for client_id in self.connected():
            self.disconnect(client_id)
        with self._lock:
            if not self.persistent:
                self._retained.clear()

    def reconnect_all(self) -> None:
        """Reconnect every client that was disconnected and has not stopped."""
        with self._lock:
            ids = [c for c, s in self._clients.items() if not s.connected]
        for client_id in ids:
            self.reconnect(client_id)

    # --- used by MemoryTransport ------------------------------------------------------
    def _attach(self, transport: MemoryTransport) -> None:
        session = transport.session
        with self._lock:
            old = self._clients.get(session.client_id)
            if old is not None and old.connected and old.transport is not transport:
                # A second client with the same id takes over the session (MQTT: the
                # broker disconnects the first one), without its will.
                old.connected = False
                old.transport.closed = True
            client = _Client(transport, {}, connected=True)
            self._clients[session.client_id] = client
            for topic, qos in transport.subscriptions():
                self._subscribe(client, topic, qos)

    def _detach(self, transport: MemoryTransport) -> None:
        with self._lock:
            client = self._clients.get(transport.session.client_id)
            if client is not None and client.transport is transport:
                client.connected = False

    def _is_connected(self, transport: MemoryTransport) -> bool:
        with self._lock:
            client = self._clients.get(transport.session.client_id)
            return client is not None and client.transport is transport and client.connected

    def _subscribe(self, client: _Client, topic: str, qos: int) -> None:
        validate_filter(topic)
        with self._lock:
            client.subscriptions[topic] = qos
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(topic, t)]
        for t, payload in sorted(retained):
            client.transport.deliver(Inbound(t, payload, True, self.clock.monotonic()))

    def _subscribe_transport(self, transport: MemoryTransport, topic: str, qos: int) -> None:
        with self._lock:
            client = self._clients.get(transport.session.client_id)
            if client is None or client.transport is not transport or not client.connected:
                return
        self._subscribe(client, topic, qos)

    def _unsubscribe(self, transport: MemoryTransport, topic: str) -> None:
        with self._lock:
            client = self._clients.get(transport.session.client_id)
            if client is not None and client.transport is transport:
                client.subscriptions.pop(topic, None)

    def _route(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if "+" in topic or "#" in topic or not topic:
            raise TransportError(f"cannot publish to {topic!r}: not a topic name")
        with self._lock:
            if self._take_drop(topic):
                self.log.append(Routed(sender, topic, payload, qos, retain, dropped=True))
                return
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            self.log.append(Routed(sender, topic, payload, qos, retain))
            targets = [
                c.transport
                for c in self._clients.values()
                if c.connected and any(topic_matches(s, topic) for s in c.subscriptions)
            ]
            at = self.clock.monotonic()
            # Delivered under the lock: every client sees messages in one global order.
            for transport in targets:
                transport.deliver(Inbound(topic, payload, False, at))

    def _take_drop(self, topic: str) -> bool:
        for drop in self._drops:
            if drop.remaining > 0 and topic_matches(drop.subscription, topic):
                drop.remaining -= 1
                if drop.remaining == 0:
                    self._drops.remove(drop)
                return True
        return False


class MemoryTransport:
    """One client of a :class:`MemoryBroker`; implements :class:`~shared.mqtt.base.Transport`."""

    def __init__(self, broker: MemoryBroker, session: Session) -> None:
        self.broker = broker
        self.session = session
        self.client_id = session.client_id
        self._fair_inbox = FairInbox(
            session.client_id, broker.inbox_limits, clock=broker.clock.monotonic
        )
        self.inbox: queue.Queue[Inbound] = self._fair_inbox
        self.connect_count = 0
        self.closed = False
        self._subs: dict[str, int] = dict(session.subscriptions)
        self._pending: collections.deque[Outbound] = collections.deque()
        limit = broker.max_queued_messages
        self._drops = QueueFullDrops(session.client_id, limit, clock=broker.clock.monotonic)
        self._lock = threading.Lock()  # subscriptions and the pending queue
        # Its own lock: its predicate asks the broker, which may call into _lock.
        self._reconnected = threading.Condition()

    def subscriptions(self) -> list[tuple[str, int]]:
        """What this client subscribes to (after every reconnect too)."""
        with self._lock:
            return list(self._subs.items())

    def deliver(self, item: Inbound) -> None:
        """Called by the broker: a message for this client."""
        self.inbox.put(item)

    @property
    def connected(self) -> bool:
        """True while the broker holds this client's connection."""
        return self.broker._is_connected(self)

    def is_connected(self) -> bool:
        """:attr:`connected`, as the :class:`~shared.mqtt.base.Transport` interface asks it."""
        return self.connected

    @property
    def queued(self) -> int:
        """QoS ≥ 1 publishes waiting for the reconnect."""
        with self._lock:
            return len(self._pending)

    @property
    def dropped_full_queue(self) -> int:
        """Publishes (``wait=False``) dropped because the queue was full."""
        return self._drops.count

    # --- the Transport interface ------------------------------------------------------
    def start(self, timeout: float = 30.0) -> MemoryTransport:
        """Connect (at once: an in-memory broker is always reachable unless cut)."""
        if self.closed:
            raise TransportError(f"{self.client_id!r} was stopped")
        self.attach()
        return self

    def attach(self) -> None:
        """(Re)connect: subscribe, publish births, then what was queued while away."""
        self.broker._attach(self)
        with self._reconnected:
            self.connect_count += 1
            self._reconnected.notify_all()
        for msg in self.session.births() if self.session.births else []:
            self.broker._route(self.client_id, msg.topic, msg.payload, msg.qos, msg.retain)
        while True:
            with self._lock:
                if not self._pending:
                    break
                msg = self._pending.popleft()
            self.broker._route(self.client_id, msg.topic, msg.payload, msg.qos, msg.retain)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 60.0,
        wait: bool = True,
    ) -> None:
        """Route now when connected; while disconnected, queue QoS ≥ 1 for the reconnect.

        With ``wait`` (and QoS ≥ 1) a disconnected client waits up to ``timeout`` seconds
        (real time) for the test to reconnect it, then raises TransportError, as
        :class:`~shared.mqtt.transport.MqttTransport` does. A full queue refuses a publish
        as paho's does: dropped and counted, or (``wait``) TransportError.
        """
        self._drops.flush()
        if wait and qos > 0 and not self._wait_connected(timeout):
            raise TransportError(f"not connected within {timeout:.0f}s; cannot publish to {topic}")
        if self.connected:
            self.broker._route(self.client_id, topic, bytes(payload), qos, retain)
            return
        if qos == 0:
            return  # QoS 0 while disconnected is lost, as with paho
        with self._lock:
            full = len(self._pending) >= self.broker.max_queued_messages
            if not full:
                self._pending.append(Outbound(topic, bytes(payload), qos, retain))
        if full and wait:
            raise self._drops.refusal(topic)
        if full:
            self._drops.dropped(topic)

    def _wait_connected(self, timeout: float) -> bool:
        with self._reconnected:
            return (
                self._reconnected.wait_for(
                    lambda: self.closed or self.connected, timeout=max(0.0, timeout)
                )
                and not self.closed
            )

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (retained messages follow) and after every reconnect."""
        validate_filter(topic)
        with self._lock:
            self._subs[topic] = qos
        self.broker._subscribe_transport(self, topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription now and for later reconnects."""
        with self._lock:
            self._subs.pop(topic, None)
        self.broker._unsubscribe(self, topic)

    def stop(self, final: Iterable[Outbound] = ()) -> None:
        """Publish ``final`` messages, then disconnect cleanly (no will)."""
        for msg in final:
            if self.connected:
                self.broker._route(self.client_id, msg.topic, msg.payload, msg.qos, msg.retain)
        self.broker._detach(self)
        self._fair_inbox.close()
        self._drops.close()
        with self._reconnected:
            self.closed = True
            self._reconnected.notify_all()
