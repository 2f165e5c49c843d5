"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): the pure part.

In ``--mode async`` the aggregator keeps a model *version* (the rounds applied so far) and one
open *version window* at a time, round ``R`` = version ``R − 1`` is current. Every device may
train on the newest model it holds and upload a delta on the topic of the round whose
announcement it trained on, ``r`` (its base version is ``r − 1``). The window screens it:

- staleness ``s = R − r``; ``s > max_staleness`` is refused ``stale`` (final);
- its base hash must be the one round ``r`` was announced with (``stale-base`` otherwise);
- a device counts at most once per window: a second update from it is refused ``busy``
  (retryable: the agent re-sends it after the next version, where it counts, staler); the
  same update again (same client and base round, counted in this or an earlier window)
  is a ``duplicate``;
- accepted, it enters the round's sum weighted by ``n · w(s)`` (:class:`StalenessWeight`):
  the round's aggregated delta is Σ nᵢ·w(sᵢ)·Δᵢ / Σ nᵢ, so stale updates move the model less.

The window is complete after ``buffer`` (K) accepted updates: the service applies it through
the same strategy (clipping, server optimizer, checks) and announces the next version. At
the deadline (``round_timeout``) a window with at least ``min_clients`` updates is applied
too; below, the starved-round policy applies as in synchronous rounds.

:class:`VersionWindow` is a :class:`~aggregator.rounds.RoundState` (the intake, the journal
and the service's round loop take it unchanged); :class:`AsyncIntake` is the intake with
the weighting. No MQTT, no files, no clock here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator.intake import Offer, UpdateIntake
from aggregator.round_strategy import RoundAggregate
from aggregator.rounds import ACCEPT, RoundPhase, RoundState, Verdict
from shared.protocol.frames import FrameHeader

MODES = ("sync", "async")


class AsyncConfigError(ValueError):
    """An asynchronous setting that cannot be used."""


@dataclass(frozen=True)
class StalenessWeight:
    """w(s), the weight of an update ``s`` versions stale (FedBuff's staleness functions).

    ``const``: 1; ``poly:a``: (1 + s)^−a; ``hinge:a,b``: 1 for s ≤ b, else 1 / (a(s − b) + 1).
    """

    kind: str = "const"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> StalenessWeight:
        """``const``, ``poly:<a>`` or ``hinge:<a>,<b>`` (a, b ≥ 0); AsyncConfigError otherwise."""
        name, _, args = text.strip().partition(":")
        try:
            values = [float(v) for v in args.split(",")] if args else []
        except ValueError:
            raise AsyncConfigError(f"staleness-weight {text!r}: numbers expected") from None
        want = {"const": 0, "poly": 1, "hinge": 2}.get(name)
        if want is None or len(values) != want:
            raise AsyncConfigError(
                f"staleness-weight {text!r}: use const, poly:<a> or hinge:<a>,<b>"
            )
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise AsyncConfigError(f"staleness-weight {text!r}: a and b must be finite and ≥ 0")
        return cls(name, *values)

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness must be ≥ 0, got {staleness}")
        if self.kind == "poly":
            return float((1.0 + staleness) ** -self.a)
        if self.kind == "hinge" and staleness > self.b:
            return 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0


@dataclass(frozen=True)
class AsyncSettings:
    """The asynchronous mode as configured: K, S and w."""

    buffer: int
    max_staleness: int
    weight: StalenessWeight

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise AsyncConfigError("buffer must be ≥ 1")
        if self.max_staleness < 0:
            raise AsyncConfigError("max-staleness must be ≥ 0")


@dataclass
class VersionWindow(RoundState):
    """The open version window of the asynchronous mode (see the module's docstring).

    ``bases``: round → the base hash it was announced with, for rounds
    ``round_id − max_staleness … round_id``; ``counted``: client → base rounds of its
    updates already counted in earlier windows still within the staleness bound.
    """

    buffer: int = 1
    max_staleness: int = 0
    weight: StalenessWeight = field(default_factory=StalenessWeight)
    bases: dict[int, str] = field(default_factory=dict)
    counted: dict[str, set[int]] = field(default_factory=dict)
    # client → base round of its update accepted in this window; staleness in order.
    accepted_base: dict[str, int] = field(default_factory=dict)
    staleness: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min_clients must be ≥ 1")
        self.bases[self.round_id] = self.base_hash

    def screen(self, client_id: str, round_id: int, base_hash: str) -> Verdict:
        """Check an update of base round ``round_id`` before it is decoded."""
        if self.closed:
            return Verdict("no-round", "no round is open")  # the next window takes it
        if round_id > self.round_id:
            return Verdict(
                "wrong-round", f"wrong round: {round_id} has not started (current {self.round_id})"
            )
        if round_id in self.counted.get(client_id, ()) or (
            self.accepted_base.get(client_id) == round_id
        ):
            return Verdict(
                "duplicate", f"duplicate: the update of {client_id} on round {round_id} counted"
            )
        staleness = self.round_id - round_id
        if staleness > self.max_staleness:
            return Verdict(
                "stale",
                f"stale: trained on version {round_id - 1}, {staleness} versions behind "
                f"{self.round_id - 1} (max-staleness {self.max_staleness})",
            )
        if client_id in self.accepted_base:
            return Verdict(
                "busy",
                f"busy: an update of {client_id} counts in version window {self.round_id} "
                "already; re-send it after the next version",
            )
        expected = self.bases.get(round_id)
        if base_hash != expected:
            return Verdict(
                "stale-base",
                f"stale base model {base_hash[:12]}, round {round_id} was on "
                f"{(expected or 'unknown')[:12]}",
            )
        return ACCEPT

    def accept_from(self, client_id: str, num_samples: int, base_round: int) -> None:
        """Record that ``client_id``'s update of ``base_round`` entered the sum."""
        verdict = self.screen(client_id, base_round, self.bases.get(base_round, ""))
        if not verdict.accepted:
            raise ValueError(verdict.reason)
        self.accepted[client_id] = num_samples
        self.accepted_base[client_id] = base_round
        self.staleness.append(self.round_id - base_round)
        self.rejected.pop(client_id, None)

    def decline(self, client_id: str, reason: str) -> None:
        """A final refusal: recorded (nobody is waited for in a window)."""
        if client_id not in self.accepted:
            self.reject(client_id, reason)

    def phase(self, now: float) -> RoundPhase:
        """Complete at ``buffer`` accepted updates; at the deadline as a synchronous round."""
        if self.closed:
            return RoundPhase.CLOSED
        if len(self.accepted) >= self.buffer:
            return RoundPhase.COMPLETE
        if now < self.deadline:
            return RoundPhase.OPEN
        return RoundPhase.QUORUM if len(self.accepted) >= self.min_clients else RoundPhase.STARVED

    def extend(self, new_deadline: float, more_clients: list[str]) -> None:
        """Keep a starved window open longer (every device may contribute: none invited)."""
        self.deadline = new_deadline
        self.extensions += 1

    def successor(
        self, round_id: int, base_hash: str, deadline: float, now: float
    ) -> VersionWindow:
        """The next window, on ``base_hash``, remembering what may still arrive."""
        low = round_id - self.max_staleness
        counted = {c: set(rs) for c, rs in self.counted.items()}
        for client, base in self.accepted_base.items():
            counted.setdefault(client, set()).add(base)
        # Older ones are refused "stale" anyway: memory stays O(devices × S).
        counted = {c: {r for r in rs if r >= low} for c, rs in counted.items()}
        return VersionWindow(
            round_id,
            base_hash,
            set(),
            self.min_clients,
            deadline,
            now,
            buffer=self.buffer,
            max_staleness=self.max_staleness,
            weight=self.weight,
            bases={r: h for r, h in self.bases.items() if r >= low},
            counted={c: rs for c, rs in counted.items() if rs},
        )

    def history_entry(self) -> dict[str, object]:
        """What the checkpoint keeps of this window to rebuild ``bases`` and ``counted``."""
        return {"base_hash": self.base_hash, "bases": dict(self.accepted_base)}


def window_from_history(
    history: Sequence[Mapping[str, object]],
    settings: AsyncSettings,
    round_id: int,
    base_hash: str,
    min_clients: int,
    deadline: float,
    now: float,
    initial_hash: str,
) -> VersionWindow:
    """Window ``round_id`` after a restart: bases and counted updates from the checkpoint's
    history (entries written by :meth:`VersionWindow.history_entry`)."""
    low = round_id - settings.max_staleness
    bases = {1: initial_hash} if low <= 1 else {}
    counted: dict[str, set[int]] = {}
    for entry in history:
        r = entry.get("round")
        if not isinstance(r, int) or r < low - 1:
            continue
        if isinstance(entry.get("base_hash"), str) and r >= low:
            bases[r] = str(entry["base_hash"])
        by_client = entry.get("bases")
        if isinstance(by_client, dict):
            for client, base in by_client.items():
                if isinstance(base, int) and base >= low:
                    counted.setdefault(str(client), set()).add(base)
    return VersionWindow(
        round_id,
        base_hash,
        set(),
        min_clients,
        deadline,
        now,
        buffer=settings.buffer,
        max_staleness=settings.max_staleness,
        weight=settings.weight,
        bases=bases,
        counted=counted,
    )


class AsyncIntake(UpdateIntake):
    """The intake of a version window: updates of earlier base rounds, weighted n·w(s)."""

    window: VersionWindow
    aggregate: RoundAggregate

    def bind(self, window: VersionWindow, aggregate: RoundAggregate) -> AsyncIntake:
        """The typed window and aggregate (the base class knows them as protocols)."""
        self.window, self.aggregate = window, aggregate
        return self

    def offer(self, topic_round: int, topic_client: str, payload: bytes) -> Offer:
        """As :meth:`UpdateIntake.offer`; a refused update of an earlier base round is
        recorded in the window's rejections too (its metrics' ``rejected``)."""
        result = super().offer(topic_round, topic_client, payload)
        window = self.window
        refused = not result.verdict.accepted and topic_client not in window.accepted
        if refused and topic_round != window.round_id:
            window.reject(topic_client, result.verdict.reason)
        return result

    def _count(self, head: FrameHeader, tensors: Mapping[str, np.ndarray], client: str) -> None:
        weight = self.window.weight(self.window.round_id - head.round)
        self.aggregate.add(tensors, head.num_samples, client, weight=weight)
        self.window.accept_from(client, head.num_samples, head.round)
