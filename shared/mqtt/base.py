"""The transport seam: what the aggregator, the agent and the tools need from an MQTT client.

:class:`Transport` is the interface; :class:`shared.mqtt.transport.MqttTransport` implements it
over paho-mqtt and a real broker, :class:`shared.mqtt.memory.MemoryBroker` in memory for tests.
Services receive a :data:`Connector` (a :class:`Session` in, a transport out), so they never
build a network client themselves. Nothing here imports paho.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class TransportError(RuntimeError):
    """The broker could not be reached, refused us, or did not take a message in time."""


@dataclass(frozen=True)
class Inbound:
    """A message handed over from the network thread."""

    topic: str
    payload: bytes
    retain: bool
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Outbound:
    """A message to publish (births, wills)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Session:
    """What a client asks of the broker when it connects.

    ``subscriptions`` are made again after every reconnect and ``births()`` published after
    it (Sparkplug-style: presence is re-announced); ``will`` is published by the broker when
    the client disappears without saying goodbye.
    """

    client_id: str
    subscriptions: tuple[tuple[str, int], ...] = ()
    will: Outbound | None = None
    births: Callable[[], list[Outbound]] | None = None


class Transport(Protocol):
    """A reconnecting MQTT client whose inbound messages land in ``inbox``.

    The inbox is bounded per sender and in all, served one sender at a time, and never
    blocks the thread that fills it (:class:`shared.mqtt.inbox.FairInbox`): a device that
    floods its topics delays and grows nothing but its own share.
    """

    inbox: queue.Queue[Inbound]
    # Incremented on every successful (re)connect: workers compare it to notice a reconnect
    # and re-send what the broker may have lost (outbox, retained state).
    connect_count: int

    def start(self, timeout: float = 30.0) -> Transport:
        """Connect; raise TransportError when no connection is made within ``timeout``."""
        ...

    def is_connected(self) -> bool:
        """True while the connection is up; False while the transport is reconnecting.

        A QoS ≥ 1 publish made while it is False waits in the transport's queue for the
        reconnect: a worker re-sending on a timer skips those, the reconnect re-sends once.
        """
        ...

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
        """Publish; with ``wait`` and QoS ≥ 1, return once the broker has acknowledged it."""
        ...

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and after every reconnect (connected: return once confirmed)."""
        ...

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription now and for later reconnects (connected: return once confirmed)."""
        ...

    def stop(self, final: Iterable[Outbound] = ()) -> None:
        """Publish ``final`` messages (e.g. an offline status), then disconnect cleanly."""
        ...


#: Opens a transport for a session: how services get their connection without building one.
Connector = Callable[[Session], Transport]
