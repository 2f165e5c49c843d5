"""Subscription changes the broker has confirmed: SUBACK / UNSUBACK bookkeeping.

paho's ``subscribe`` and ``unsubscribe`` only queue a packet. Until the broker's SUBACK or
UNSUBACK is back, messages may still arrive on a topic just dropped, and a new
subscription's retained messages are not on their way yet; so a caller that acts on the
change ("the full model no longer comes") must wait for the acknowledgement.
:class:`PendingAcks` pairs requests with acknowledgements by packet id. No paho here: the
transport hands it paho's calls and answers, so it is unit tested without a broker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from shared.protocol.topics import chunk_subscription

#: paho's ``subscribe`` / ``unsubscribe`` call: returns (result code, packet id or None).
Send = Callable[[], tuple[int, int | None]]


@dataclass(frozen=True)
class Ack:
    """The broker's answer to one request: the topics it refused, each with its reason."""

    refused: tuple[str, ...] = ()


@dataclass
class _Request:
    topics: tuple[str, ...]
    awaited: bool
    ack: Ack | None = None
    lost: bool = False


class PendingAcks:
    """Subscribe/unsubscribe requests sent and not yet answered, by packet id (thread-safe).

    The worker thread sends and waits; paho's network thread reports acknowledgements and
    lost connections.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: dict[int, _Request] = {}

    def send(self, topics: Sequence[str], send: Send, *, awaited: bool = True) -> int | None:
        """Call ``send`` and track the packet id it returns; None when nothing was sent.

        The lock is held across the call, so an acknowledgement arriving before ``send``
        returns still finds its request. Only ``awaited`` requests are kept for :meth:`wait`.
        """
        with self._cond:
            rc, mid = send()
            if rc != 0 or mid is None:
                return None  # not connected: the reconnect subscribes from the list
            self._requests[mid] = _Request(tuple(topics), awaited)
            return mid

    def acknowledged(self, mid: int, failures: Sequence[str | None]) -> Ack | None:
        """Record the broker's answer to ``mid``: per topic, None (done) or why it refused.

        Returns the answer when nobody waits for it (the caller reports it); None when a
        waiter gets it from :meth:`wait`, or for a packet id this tracker never sent.
        """
        with self._cond:
            request = self._requests.get(mid)
            if request is None:
                return None
            pairs = zip(request.topics, failures, strict=False)
            request.ack = Ack(tuple(f"{t}: {why}" for t, why in pairs if why is not None))
            if request.awaited:
                self._cond.notify_all()
                return None
            del self._requests[mid]
            return request.ack

    def connection_lost(self) -> None:
        """Every request died with the connection: wake the waiters (nothing will answer)."""
        with self._cond:
            for mid, request in list(self._requests.items()):
                if request.awaited:
                    request.lost = True
                else:
                    del self._requests[mid]
            self._cond.notify_all()

    def wait(self, mid: int, timeout: float) -> Ack | None:
        """The broker's answer to ``mid``; None when the connection was lost or on timeout."""
        with self._cond:
            request = self._requests.get(mid)
            if request is None:
                return None
            self._cond.wait_for(lambda: request.ack is not None or request.lost, timeout)
            del self._requests[mid]
            return request.ack


def with_chunk_subs(subs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each subscription plus the one covering its chunks (deduplicated, order kept)."""
    out: dict[str, int] = {}
    for topic, qos in subs:
        out.setdefault(topic, qos)
        chunked = chunk_subscription(topic)
        if chunked is not None:
            out.setdefault(chunked, qos)
    return list(out.items())
