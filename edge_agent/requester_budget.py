"""Per-requester budgets of the inference server: requests and bytes per second, and a ledger.

The requester is a level of the request topic (``infer/{cid}/request/{requester}``) that the
provisioned broker's ACL binds to the requester's login, so it cannot be forged there. Each
requester gets two token buckets (requests, bytes); one requester flooding the server spends
its own budget, not the others'. A refusal is answered once per report period (the reply says
why) and otherwise counted; :meth:`RequesterBudgets.report` turns the counts into one log line
per requester and period. Pure: time comes in as ``now``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BudgetLimits:
    """Each requester's allowance; the table of requesters is bounded too."""

    requests_per_s: float = 20.0
    burst_requests: int = 40
    bytes_per_s: float = 8 * 1024 * 1024
    burst_bytes: int = 32 * 1024 * 1024
    max_requesters: int = 1024
    report_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.requests_per_s <= 0 or self.bytes_per_s <= 0:
            raise ValueError("request rates must be > 0")
        if self.burst_requests < 1 or self.burst_bytes < 1 or self.max_requesters < 1:
            raise ValueError("request bursts and max-requesters must be ≥ 1")


class Verdict(enum.Enum):
    """What to do with one request."""

    ADMIT = "admit"
    REFUSE_AND_REPLY = "refuse-and-reply"  # the first refusal of this period: say why
    REFUSE = "refuse"  # counted, reported in the period's log line


class Outcome(enum.Enum):
    """How an admitted request ended (for the period's log line)."""

    ANSWERED = "answered"
    ERROR = "error"


@dataclass
class _Requester:
    requests: float
    bytes: float
    at: float
    answered: int = 0
    errors: int = 0
    refused: int = 0
    refused_bytes: int = 0

    def refill(self, limits: BudgetLimits, now: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.requests = min(limits.burst_requests, self.requests + elapsed * limits.requests_per_s)
        self.bytes = min(limits.burst_bytes, self.bytes + elapsed * limits.bytes_per_s)
        self.at = now

    def full(self, limits: BudgetLimits) -> bool:
        return self.requests >= limits.burst_requests and self.bytes >= limits.burst_bytes

    def quiet(self) -> bool:
        """Nothing of it awaits the period's report (answered requests are not reported)."""
        return not (self.errors or self.refused)


@dataclass
class RequesterBudgets:
    """Token buckets and counters per requester; a bounded table, oldest idle evicted."""

    limits: BudgetLimits = field(default_factory=BudgetLimits)
    _table: dict[str, _Requester] = field(default_factory=dict)
    _reported_at: float | None = None
    _crowded: int = 0  # refused because the table was full of active requesters
    _unroutable: int = 0  # requests on topics naming no valid requester: unanswerable

    def admit(self, requester: str, size: int, now: float) -> Verdict:
        """Spend one request and ``size`` bytes of ``requester``'s budget, or refuse."""
        if self._reported_at is None:
            self._reported_at = now
        entry = self._entry(requester, now)
        if entry is None:
            self._crowded += 1
            return Verdict.REFUSE
        entry.refill(self.limits, now)
        if entry.requests >= 1 and entry.bytes >= size:
            entry.requests -= 1
            entry.bytes -= size
            return Verdict.ADMIT
        entry.refused += 1
        entry.refused_bytes += size
        return Verdict.REFUSE_AND_REPLY if entry.refused == 1 else Verdict.REFUSE

    def note_unroutable(self, now: float) -> None:
        """Count a request that cannot be answered (no valid requester in its topic)."""
        if self._reported_at is None:
            self._reported_at = now
        self._unroutable += 1

    def record(self, requester: str, outcome: Outcome) -> None:
        """Count how an admitted request of ``requester`` ended."""
        entry = self._table.get(requester)
        if entry is None:
            return
        if outcome is Outcome.ANSWERED:
            entry.answered += 1
        else:
            entry.errors += 1

    def report(self, now: float) -> list[str]:
        """Once per period: one line per requester with refusals or errors, then reset."""
        if self._reported_at is None or now - self._reported_at < self.limits.report_every_s:
            return []
        period = now - self._reported_at
        lines = [
            f"requester {name!r} in the last {period:.0f}s: {e.answered} answered, "
            f"{e.errors} error replies, {e.refused} refused over budget "
            f"({e.refused_bytes} bytes; limit {self.limits.requests_per_s:g} requests/s, "
            f"{self.limits.bytes_per_s:g} bytes/s)"
            for name, e in self._table.items()
            if e.refused or e.errors
        ]
        if self._crowded:
            lines.append(
                f"{self._crowded} requests refused in the last {period:.0f}s: "
                f"{self.limits.max_requesters} requesters are active (max-requesters)"
            )
        if self._unroutable:
            lines.append(
                f"{self._unroutable} messages in the last {period:.0f}s on request topics "
                "naming no valid requester ([A-Za-z0-9_.-]): not answered"
            )
        for e in self._table.values():
            e.answered = e.errors = e.refused = e.refused_bytes = 0
        self._crowded = self._unroutable = 0
        self._reported_at = now
        return lines

    def __len__(self) -> int:
        return len(self._table)

    def _entry(self, requester: str, now: float) -> _Requester | None:
        """``requester``'s entry, made most recent; None when the table is full of active ones."""
        entry = self._table.pop(requester, None)
        if entry is None:
            if len(self._table) >= self.limits.max_requesters and not self._evict_idle(now):
                return None
            limits = self.limits
            entry = _Requester(float(limits.burst_requests), float(limits.burst_bytes), now)
        self._table[requester] = entry  # dicts keep insertion order: the end is the newest
        return entry

    def _evict_idle(self, now: float) -> bool:
        # The least recently seen requester goes if its budget has refilled (a full bucket
        # is what a newcomer gets anyway) and nothing of it awaits reporting.
        name, oldest = next(iter(self._table.items()))
        oldest.refill(self.limits, now)
        if oldest.full(self.limits) and oldest.quiet():
            del self._table[name]
            return True
        return False
