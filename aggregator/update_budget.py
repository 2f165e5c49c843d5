"""Per-sender bounds in front of the update intake: an update budget and aggregated warnings.

A device can publish junk on its own update topic as fast as the broker routes it. Reading,
answering and logging each message would let it keep the aggregator busy, its log growing and
the broker full of receipts. So every client gets ``burst`` update messages per round and
``rate`` more per second after that (a token bucket per client id); a message over the budget
is dropped unread, logged once per sender per interval with a count, and answered at most
once per interval with a ``rate-limited`` receipt — answering every message would make the
aggregator amplify the flood. The same aggregated log carries every other per-message warning
(rejected updates, bad statuses), so no sender can turn its messages into log lines.

Sized so honest agents never reach it: an agent sends one update per round and re-sends it at
most once a second (``edge_agent.resend.RESEND_GAP_S``: after a reconnect, a re-announcement
or ``resend_after_s`` without a receipt), and every new round refills every bucket, so fast
rounds do not drain them. Pure: the caller passes the time.
"""

from __future__ import annotations

import logging

from aggregator.rounds import Verdict
from shared.throttle import AggregatedLog, TokenBuckets

DEFAULT_BURST = 10
DEFAULT_RATE = 1.0  # per second: an honest agent re-sends at most once a second


class IntakeGuard:
    """The update budget per client id and the aggregated warnings of the service."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        burst: int = DEFAULT_BURST,
        rate: float = DEFAULT_RATE,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._buckets = TokenBuckets(rate, burst)
        self.warnings = AggregatedLog(logger, interval_s)

    def new_round(self) -> None:
        """A round opened: every client may send ``burst`` messages again."""
        self._buckets.refill()

    def admit(self, client_id: str, now: float) -> tuple[bool, Verdict | None]:
        """Whether to read ``client_id``'s update message, and the receipt to send if not.

        ``(True, None)``: read it. ``(False, verdict)``: over the budget, the first such
        message of the interval: answer it. ``(False, None)``: over the budget, answered.
        """
        if self._buckets.allow(client_id, now):
            return True, None
        verdict = self.verdict()
        # Its own key: the sender's rejected updates (within the budget) do not delay this
        # answer, which tells a misconfigured agent at once why it is not heard.
        key = f"{client_id} over budget"
        first = self.warn(key, now, "update from %s dropped: %s", client_id, verdict.reason)
        return False, verdict if first else None

    def verdict(self) -> Verdict:
        """The answer to a message over the budget (the agent keeps its update, re-sends later)."""
        return Verdict(
            "rate-limited",
            f"rate limited: over {self.burst} update messages this round and {self.rate:g} "
            "per second after that; not read, re-send later",
        )

    def warn(self, sender: str | None, now: float, fmt: str, *args: object) -> bool:
        """A warning about ``sender``'s message: at most one line per sender per interval."""
        return self.warnings.warn(sender or "?", now, fmt, *args)

    def flush(self, now: float) -> None:
        """Write the counts of intervals that have ended."""
        self.warnings.flush(now)

    def close(self) -> None:
        """Write every pending count (the service is stopping)."""
        self.warnings.close()
