"""The round state machine: selection, quorum, deadline, late and duplicate updates.

Pure: no MQTT, no files; time comes in as arguments so tests drive it with a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from shared.protocol.receipts import ReceiptCode


class RoundPhase(Enum):
    """Where a round stands."""

    OPEN = "open"  # waiting for updates
    COMPLETE = "complete"  # every selected client reported: apply now
    QUORUM = "quorum"  # deadline passed with at least min_clients updates: apply now
    STARVED = "starved"  # deadline passed below quorum: extend or retry
    CLOSED = "closed"  # applied; everything that arrives now is late


@dataclass(frozen=True)
class Verdict:
    """Whether an update may enter the sum: the receipt code, and for people the reason."""

    code: ReceiptCode
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """True when the update enters the sum (not a duplicate: its earlier copy did)."""
        return self.code == "accepted"


ACCEPT = Verdict("accepted")
# The aggregator is starting or between rounds, and the update's round is not over: it may
# open (again) soon, so the agent keeps the update and re-sends it.
NO_ROUND = Verdict("no-round", "no round is open")


def late(round_id: int) -> Verdict:
    """The verdict on an update whose round is closed."""
    return Verdict("late", f"late: round {round_id} is closed")


def without_open_round(round_id: int, last_closed: int) -> Verdict:
    """The verdict on an update that arrives while no round is open.

    An update of a round already applied missed it (``late``: the agent gives its mass back
    to error feedback); any other may yet be counted (``no-round``: the agent re-sends).
    """
    return late(round_id) if round_id <= last_closed else NO_ROUND


def select_clients(
    online: list[str], fraction: float, min_clients: int, rng: np.random.Generator
) -> list[str]:
    """Pick max(min_clients, ⌈fraction·|online|⌉) of the online clients, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    pool = sorted(set(online))
    want = min(len(pool), max(min_clients, math.ceil(fraction * len(pool))))
    picked = rng.choice(len(pool), size=want, replace=False) if want else np.array([], int)
    return sorted(pool[int(i)] for i in picked)


@dataclass
class RoundState:
    """One round's bookkeeping. The caller does the decoding and the math."""

    round_id: int
    base_hash: str
    selected: set[str]
    min_clients: int
    deadline: float
    started_at: float
    accepted: dict[str, int] = field(default_factory=dict)  # client → num_samples
    rejected: dict[str, str] = field(default_factory=dict)  # client → last reason
    # Selected clients that said they cannot train this round (another model): not waited for.
    declined: set[str] = field(default_factory=set)
    extensions: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min_clients must be ≥ 1")
        if not self.selected:
            raise ValueError("a round needs at least one selected client")

    def screen(self, client_id: str, round_id: int, base_hash: str) -> Verdict:
        """Check an update's envelope before it is decoded: round, base, selection, duplicates."""
        if round_id < self.round_id or (round_id == self.round_id and self.closed):
            return late(round_id)
        if round_id > self.round_id:
            return Verdict(
                "wrong-round", f"wrong round: {round_id} has not started (current {self.round_id})"
            )
        if client_id in self.accepted:
            return Verdict(
                "duplicate", f"duplicate: an update from {client_id} was already counted"
            )
        if client_id not in self.selected:
            return Verdict("not-selected", f"not selected for round {round_id}")
        if base_hash != self.base_hash:
            return Verdict(
                "stale-base",
                f"stale base model {base_hash[:12]}, round is on {self.base_hash[:12]}",
            )
        return ACCEPT

    def accept(self, client_id: str, num_samples: int) -> None:
        """Record that ``client_id``'s update entered the sum."""
        verdict = self.screen(client_id, self.round_id, self.base_hash)
        if not verdict.accepted:
            raise ValueError(verdict.reason)
        self.accepted[client_id] = num_samples
        self.rejected.pop(client_id, None)

    def reject(self, client_id: str, reason: str) -> None:
        """Record a rejection (for metrics)."""
        self.rejected[client_id] = reason

    def decline(self, client_id: str, reason: str) -> None:
        """Record that a selected client cannot train this round (its model differs): the
        round is complete without it once the others are in (and quorum is met). A client
        that was not selected is only recorded as rejected (for metrics)."""
        if client_id in self.accepted:
            return
        self.reject(client_id, reason)
        if client_id in self.selected:
            self.declined.add(client_id)

    def phase(self, now: float) -> RoundPhase:
        """Decide whether the round should be applied now."""
        if self.closed:
            return RoundPhase.CLOSED
        # Sizes first: called for every message, it must not copy the accepted set each time.
        if len(self.accepted) >= len(self.selected) and self.selected <= self.accepted.keys():
            return RoundPhase.COMPLETE
        if (
            self.declined
            and len(self.accepted) >= self.min_clients
            and self.selected - self.declined <= self.accepted.keys()
        ):
            return RoundPhase.COMPLETE
        if now < self.deadline:
            return RoundPhase.OPEN
        if len(self.accepted) >= self.min_clients:
            return RoundPhase.QUORUM
        return RoundPhase.STARVED

    def extend(self, new_deadline: float, more_clients: list[str]) -> None:
        """Keep a starved round open longer, optionally inviting more clients."""
        self.deadline = new_deadline
        self.selected |= set(more_clients)
        self.extensions += 1

    def close(self) -> None:
        """Mark applied: later updates for this round are late."""
        self.closed = True

    @property
    def num_samples(self) -> int:
        """Total samples behind the accepted updates."""
        return sum(self.accepted.values())
