"""A client's outbound queue is bounded: what happens when a publish finds it full.

paho keeps every QoS ≥ 1 publish in memory until the broker acknowledges it (PUBACK), and
while disconnected it keeps all of them: unbounded, an aggregator whose broker stalls, or an
agent cut off for a day, grows without limit. ``ConnectOptions.max_queued_messages`` bounds
it (the in-memory broker's clients alike). A publish that finds the queue full is refused:

- ``wait=False`` (fire and forget: updates, receipts, statuses, decisions, re-published
  retained state): dropped, counted (:attr:`QueueFullDrops.count`, exposed by the transports
  as ``dropped_full_queue``) and logged at most once per interval with the count. Never
  raised: the caller is the worker's loop, which must go on reading its inbox.
- ``wait=True``: :meth:`QueueFullDrops.refusal` is raised; the caller waits for this message
  and must learn that it was not sent.

Dropping is safe because nothing fedmq publishes without waiting is the only copy of what
matters: an update lives in the agent's durable outbox and is re-sent until a receipt
arrives; a lost receipt is answered again (``duplicate``, which the agent reads as counted)
on that re-send; retained state (model, meta, round, statuses) is re-published by its owner
after every reconnect. Round decisions are for operators only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.mqtt.base import TransportError
from shared.throttle import AggregatedLog

log = logging.getLogger(__name__)

# One line per client per interval about its dropped publishes (the first at once).
DROP_LOG_INTERVAL_S = 10.0


class QueueFullDrops:
    """Counts and reports the publishes refused by one client's full outbound queue."""

    def __init__(
        self, client_id: str, limit: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client_id = client_id
        self.limit = limit
        self.count = 0
        self._clock = clock
        self._log = AggregatedLog(log, DROP_LOG_INTERVAL_S)
        self._lock = threading.Lock()  # the worker and a serving thread may both publish

    def dropped(self, topic: str, messages: int = 1) -> None:
        """Count ``messages`` not sent to ``topic``; log the first of an interval."""
        with self._lock:
            self.count += messages
            self._log.warn(
                f"{self.client_id}: outbound queue full",
                self._clock(),
                "%s: outbound queue full (%d messages awaiting the broker): dropped %d "
                "message(s) to %s (%d dropped so far; re-sent or re-published later)",
                self.client_id,
                self.limit,
                messages,
                topic,
                self.count,
            )

    def refusal(self, topic: str) -> TransportError:
        """The error for a publish that waits and finds the queue full."""
        return TransportError(
            f"{self.client_id}: cannot publish to {topic}: the outbound queue is full "
            f"({self.limit} messages awaiting the broker's acknowledgement, "
            "max_queued_messages); the broker is unreachable or not keeping up"
        )

    def flush(self) -> None:
        """Write the summary line of an interval that has ended."""
        with self._lock:
            self._log.flush(self._clock())

    def close(self) -> None:
        """Write any pending summary line (the client is stopping)."""
        with self._lock:
            self._log.close()
