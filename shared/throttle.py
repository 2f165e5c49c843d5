"""How often one sender is served or logged: per-key token buckets and aggregated warnings.

Both are pure: the caller passes the time (its injected clock's monotonic reading), so tests
drive them with a manual clock. Both are keyed by sender and keep at most ``max_keys`` keys,
so a flood of made-up sender names cannot grow them without bound. Neither is thread-safe:
the owner holds its own lock when two threads share one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# More senders than a federation has devices (design target: 1,000 per aggregator).
DEFAULT_MAX_KEYS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per key: ``burst`` messages at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate < 0 or burst < 1 or max_keys < 1:
            raise ValueError("token buckets need rate ≥ 0, burst ≥ 1 and max_keys ≥ 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """Take a token from ``key``'s bucket; False (nothing taken) when it is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self.max_keys:
                # The least recently seen key restarts with a full bucket: a lost limit for
                # someone idle the longest, never memory growth.
                self._buckets.popitem(last=False)
        else:
            elapsed = max(0.0, now - bucket.at)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.at = now
            self._buckets.move_to_end(key)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def refill(self) -> None:
        """Fill every bucket again (forget every key)."""
        self._buckets.clear()


@dataclass
class _Pending:
    ends: float
    count: int = 0
    last: str = ""


class AggregatedLog:
    """At most one log line per key per interval: the first at once, the rest as a count.

    :meth:`warn` logs the first event of a key immediately (its details matter) and counts
    the next ones until ``interval_s`` has passed; then one summary line gives the count and
    the last of them. Summaries are written by :meth:`flush`, which :meth:`warn` calls too;
    an owner whose events may stop calls it from its loop.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        *,
        level: int = logging.WARNING,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if interval_s <= 0 or max_keys < 1:
            raise ValueError("an aggregated log needs interval_s > 0 and max_keys ≥ 1")
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self.max_keys = max_keys
        # Insertion order is the order intervals opened, so the first entry ends first.
        self._open: OrderedDict[str, _Pending] = OrderedDict()

    def warn(self, key: str, now: float, fmt: str, *args: Any) -> bool:
        """Log ``fmt % args`` now if ``key`` has no open interval, else count it.

        True when the line was written (the first of its interval): callers use it to
        answer a sender at most once per interval too.
        """
        self.flush(now)
        pending = self._open.get(key)
        if pending is not None:
            pending.count += 1
            pending.last = fmt % args
            return False
        self.logger.log(self.level, fmt, *args)
        self._open[key] = _Pending(now + self.interval_s)
        if len(self._open) > self.max_keys:
            self._summarise(*self._open.popitem(last=False))
        return True

    def flush(self, now: float) -> None:
        """Write the summary of every interval that has ended."""
        while self._open:
            key, pending = next(iter(self._open.items()))
            if pending.ends > now:
                return
            del self._open[key]
            self._summarise(key, pending)

    def close(self) -> None:
        """Write every pending summary now (the owner is stopping)."""
        while self._open:
            self._summarise(*self._open.popitem(last=False))

    def _summarise(self, key: str, pending: _Pending) -> None:
        if pending.count:
            self.logger.log(
                self.level,
                "%s: %d more like this within %.0fs; the last: %s",
                key,
                pending.count,
                self.interval_s,
                pending.last,
            )
