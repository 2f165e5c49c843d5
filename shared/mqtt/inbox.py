"""A transport's inbox: bounded per sender and in all, served fairly, never blocking its writer.

The network thread (paho's, or the in-memory broker's delivery) puts every inbound message
here; the worker (aggregator, agent, tools) takes them. One device publishing junk as fast as
the broker routes it must neither grow this without bound nor delay the other devices'
messages, so:

- **per-sender bounds**: a message is attributed to the device whose topic it came on
  (:func:`shared.protocol.topics.sender_of`: its update or status topic, the only ones the
  ACL lets it write); a sender holding ``per_sender_messages`` messages or
  ``per_sender_bytes`` bytes here has its newest message dropped;
- **global bounds**: when ``max_messages`` or ``max_bytes`` would be exceeded, the newest
  message of the sender with the largest backlog is evicted to make room — the arrival
  itself when that sender is the heaviest. Messages of the aggregator's own topics (no
  device sender) are subject to these bounds only;
- **fair service**: :meth:`FairInbox.get` takes one message per sender in turn, so an honest
  update waits behind at most one message of each other sender, never behind a flood;
- **no blocking**: :meth:`FairInbox.put` decides at once; paho's network thread never waits.

Every drop is counted per sender (:attr:`FairInbox.dropped`) and logged at most once per
sender per interval (:class:`~shared.throttle.AggregatedLog`). A dropped update is not lost
for good: without a receipt its agent re-sends it from its outbox.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.mqtt.base import Inbound
from shared.protocol.topics import sender_of
from shared.throttle import AggregatedLog

log = logging.getLogger(__name__)

# One line per sender per interval about its dropped messages.
DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class InboxLimits:
    """Bounds on the messages waiting for a client's worker."""

    # A busy aggregator holds a few messages per device (status, update, a re-send): 1,000
    # devices fit with room to spare.
    max_messages: int = 10_000
    max_bytes: int = 1024 * 1024 * 1024
    # An honest device has a handful of messages waiting; a flood is cut here.
    per_sender_messages: int = 100
    # One largest reassembled payload (ConnectOptions.max_payload_bytes) must fit.
    per_sender_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_messages, self.max_bytes) < 1:
            raise ValueError("inbox bounds must be ≥ 1")
        if min(self.per_sender_messages, self.per_sender_bytes) < 1:
            raise ValueError("per-sender inbox bounds must be ≥ 1")


Key = str | None


class FairInbox(queue.Queue[Inbound]):
    """A :class:`queue.Queue` of :class:`Inbound` with per-sender bounds and round-robin gets.

    ``get``/``get_nowait``/``qsize``/``empty`` behave as for any queue; ``put`` never blocks
    and may drop (see the module docstring).
    """

    def __init__(
        self,
        owner: str,
        limits: InboxLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sender: Callable[[str], Key] = sender_of,
    ) -> None:
        self.owner = owner
        self.limits = limits or InboxLimits()
        self._clock = clock
        self._sender = sender
        self.dropped: collections.Counter[str] = collections.Counter()
        self._drops = AggregatedLog(log, DROP_LOG_INTERVAL_S)
        super().__init__()

    # --- queue.Queue's storage hooks (called with self.mutex held) ------------------------
    def _init(self, maxsize: int) -> None:
        self._queues: dict[Key, collections.deque[Inbound]] = {}
        self._bytes_of: dict[Key, int] = {}
        self._turns: collections.deque[Key] = collections.deque()  # senders with messages
        self._count = 0
        self._bytes = 0

    def _qsize(self) -> int:
        return self._count

    def _put(self, item: Inbound) -> None:
        key = self._sender(item.topic)
        if key not in self._queues:
            self._queues[key] = collections.deque()
            self._bytes_of[key] = 0
            self._turns.append(key)
        self._queues[key].append(item)
        self._bytes_of[key] += len(item.payload)
        self._count += 1
        self._bytes += len(item.payload)

    def _get(self) -> Inbound:
        key = self._turns.popleft()
        item = self._queues[key].popleft()
        self._forget(key, item)
        if self._queues[key]:
            self._turns.append(key)
        else:
            del self._queues[key], self._bytes_of[key]
        return item

    def _forget(self, key: Key, item: Inbound) -> None:
        self._bytes_of[key] -= len(item.payload)
        self._count -= 1
        self._bytes -= len(item.payload)

    # --- the bounded put --------------------------------------------------------------------
    def put(self, item: Inbound, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item`` if the bounds allow (evicting a heavier sender's newest); never blocks."""
        key = self._sender(item.topic)
        size = len(item.payload)
        with self.mutex:
            why = self._admit(key, size)
            if why is not None:
                self._drop(key, item.topic, why)
                return
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Inbound:
        """The next message, one sender after the other (as :meth:`queue.Queue.get`)."""
        with self.mutex:
            # The worker calls this at least every second: summaries of drops get written
            # even after a flood stops.
            self._drops.flush(self._clock())
        return super().get(block, timeout)

    def refuse(self, topic: str, why: str) -> None:
        """Count and log (aggregated per sender) a message dropped before it got here.

        For the transport's own refusals, e.g. a chunk that does not reassemble: a flood of
        bad chunks must not become a log line per chunk either.
        """
        with self.mutex:
            self._drop(self._sender(topic), topic, why)

    def close(self) -> None:
        """Write the pending summaries of dropped messages (the transport is stopping)."""
        with self.mutex:
            self._drops.close()

    def _admit(self, key: Key, size: int) -> str | None:
        """None when a message of ``size`` bytes from ``key`` may be queued, else why not."""
        lim = self.limits
        if key is not None:
            if len(self._queues.get(key, ())) >= lim.per_sender_messages:
                return f"its {lim.per_sender_messages} waiting messages are the most it may have"
            if self._bytes_of.get(key, 0) + size > lim.per_sender_bytes:
                return f"its waiting messages would exceed {lim.per_sender_bytes} bytes"
        if size > lim.max_bytes:
            return f"{size} bytes exceed the inbox's {lim.max_bytes}"
        while self._count + 1 > lim.max_messages or self._bytes + size > lim.max_bytes:
            by_bytes = self._bytes + size > lim.max_bytes
            victim = self._heaviest(by_bytes)
            if victim == key or not self._heavier(victim, key, by_bytes):
                return "the inbox is full and this sender has the largest backlog"
            evicted = self._queues[victim].pop()
            self._forget(victim, evicted)
            self.unfinished_tasks -= 1  # it will never be got: join() must not wait for it
            if not self._queues[victim]:
                del self._queues[victim], self._bytes_of[victim]
                self._turns.remove(victim)
            why = "evicted: the inbox is full and it has the largest backlog"
            self._drop(victim, evicted.topic, why)
        return None

    def _load(self, key: Key, by_bytes: bool) -> int:
        if by_bytes:
            return self._bytes_of.get(key, 0)
        return len(self._queues.get(key, ()))

    def _heaviest(self, by_bytes: bool) -> Key:
        # Never empty here: the bounds are ≥ 1 and only a non-empty inbox can be full.
        return max(self._queues, key=lambda k: self._load(k, by_bytes))

    def _heavier(self, victim: Key, key: Key, by_bytes: bool) -> bool:
        return self._load(victim, by_bytes) > self._load(key, by_bytes)

    def _drop(self, key: Key, topic: str, why: str) -> None:
        sender = key if key is not None else "(aggregator topics)"
        self.dropped[sender] += 1
        self._drops.warn(
            sender,
            self._clock(),
            "%s dropped a message from %s on %s: %s",
            self.owner,
            sender,
            topic,
            why,
        )
