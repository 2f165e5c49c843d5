"""Time, injected: the service and the agent read the clock only through a :class:`Clock`.

:class:`SystemClock` is the real one. :class:`ManualClock` is a clock a test moves by hand, so
deadlines, re-send timers and timeouts are exercised without waiting for them: a wait on a
manual clock ends when a message arrives or when the test has advanced the clock far enough.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol, TypeVar

T = TypeVar("T")

# How long (real time) a manual-clock wait blocks before it re-reads the clock: short, so a
# test's advance() is noticed at once; callers re-check their state after every wait anyway.
_MANUAL_SLICE_S = 0.01


class Clock(Protocol):
    """Wall time for deadlines (they travel in messages), monotonic time for intervals."""

    def time(self) -> float:
        """Seconds since the epoch (what a round's deadline is written in)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timers, latencies)."""
        ...

    def wait(self, inbox: queue.Queue[T], timeout: float) -> T | None:
        """The next item of ``inbox``, or None once ``timeout`` seconds have passed.

        May also return None earlier (a spurious wake-up): callers re-check what they wait for.
        """
        ...


class SystemClock:
    """The machine's clocks."""

    def time(self) -> float:
        """:func:`time.time`."""
        return time.time()

    def monotonic(self) -> float:
        """:func:`time.monotonic`."""
        return time.monotonic()

    def wait(self, inbox: queue.Queue[T], timeout: float) -> T | None:
        """Block on ``inbox`` for up to ``timeout`` seconds."""
        try:
            return inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


class ManualClock:
    """A clock that only moves when :meth:`advance` is called (thread-safe)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = start
        self._origin = start

    def time(self) -> float:
        """The current manual wall time."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Manual seconds since the clock was made."""
        with self._lock:
            return self._now - self._origin

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        with self._lock:
            self._now += seconds

    def wait(self, inbox: queue.Queue[T], timeout: float) -> T | None:
        """An item as soon as one arrives, else None after a short real-time slice.

        The manual clock does not move by itself, so every wait ends as a spurious wake-up:
        the caller re-reads the clock and sees whether its own deadline has passed.
        """
        try:
            return inbox.get(timeout=min(_MANUAL_SLICE_S, max(0.0, timeout)))
        except queue.Empty:
            return None
