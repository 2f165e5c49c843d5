"""Which round announcements an agent follows: origin (signature), cost, codecs, order, and
for how long.

Pure: the agent decodes the announcement (which already bounds every training parameter,
:mod:`shared.protocol.messages`) and this module decides. Every refusal is an
:class:`AnnouncementRefused` (a MessageError), which the agent logs with the topic and skips:
it keeps its model and follows the next genuine announcement.

- Origin: an agent pinning the aggregator's key follows only announcements whose signature
  covers every field (:func:`shared.protocol.claims.verify_round_start`); without a key (dev
  mode) unsigned ones are followed.
- Cost: what this device affords (:class:`DeviceLimits`), below the protocol's bounds.
- Codecs: the update codec and the download codec must be ones this agent can use.
- Order: ``(run, round)`` never goes back. A later run supersedes an earlier one (a new run
  of the federation starts again at round 1), so a replayed announcement of an old run, or of
  an earlier round of this run, is refused instead of replacing the current round.
- Time: a round is open for the duration it announces, counted on the agent's monotonic
  clock from the announcement's arrival (:func:`open_until`), never by comparing the
  aggregator's deadline with the device's wall clock, which may be minutes off.

The aggregator's live ``finished`` status ends the agent: :func:`check_finished` holds it to
the same origin (signed, when pinned) and to the run the agent follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.compression.quantize import CodecError
from shared.compression.registry import resolve_codec
from shared.protocol.claims import verify_round_start, verify_status
from shared.protocol.global_delta import DOWNLOAD_CODECS
from shared.protocol.messages import AggregatorStatus, MessageError, RoundStart
from shared.protocol.signing import SignatureError

# A round counts as open this long past its announced end (updates already on their way).
GRACE_S = 1.0


class AnnouncementRefused(MessageError):
    """A round announcement the agent does not follow."""


@dataclass(frozen=True)
class DeviceLimits:
    """What one round may cost this device, at most (``--max-local-epochs``, ...)."""

    max_local_epochs: int
    max_batch_size: int


def check_announcement(
    ann: RoundStart,
    public_key: Ed25519PublicKey | None,
    limits: DeviceLimits,
    current: RoundStart | None,
) -> None:
    """Raise AnnouncementRefused unless the agent may follow ``ann`` instead of ``current``."""
    what = f"round {ann.round} announcement (run {ann.run}) refused"
    if public_key is not None:
        try:
            verify_round_start(public_key, ann)
        except SignatureError as exc:
            raise AnnouncementRefused(f"{what}: {exc}") from exc
    problem = _unaffordable(ann, limits) or _unusable_codec(ann)
    if problem:
        raise AnnouncementRefused(f"{what}: {problem}")
    if current is not None and (ann.run, ann.round) < (current.run, current.round):
        raise AnnouncementRefused(
            f"{what}: older than round {current.round} of run {current.run}, which it follows"
        )


def selects(ann: RoundStart, client_id: str, site: str = "") -> bool:
    """Whether a synchronous round invites this device: by its id, or by its site's name
    (docs/sites.md: the central aggregator selects sites, each site all its devices)."""
    return client_id in ann.selected or bool(site and site in ann.selected)


def open_until(ann: RoundStart, arrived: float, retained: bool) -> float:
    """Until when (the agent's monotonic clock) the round of ``ann`` counts as open.

    A Pi without a real-time clock can be minutes off, so the aggregator's deadline (its wall
    clock) is never compared with the device's: ``deadline - ts``, both the aggregator's clock,
    is the time the round had left when it was published, and counts from ``arrived`` (the
    agent's monotonic reading when the announcement arrived; its transit time is unknown and
    small next to a round).

    A retained announcement may have been published long before it arrives (at a reconnect,
    to a late joiner), so that duration is stale. But the aggregator clears a round's retained
    announcement when it closes the round: a retained one is of an open round, open at its
    arrival. It counts as open for the time it had left when published (never less than the
    grace): an overestimate by its age, at most one round, whose only cost is a re-send the
    aggregator answers ``late``, where the other choice, expired, could miss a round.
    """
    remaining = ann.deadline - ann.ts
    if not math.isfinite(remaining):  # an absurd deadline or ts: a round already over
        remaining = -math.inf
    if retained:
        remaining = max(remaining, 0.0)
    return arrived + remaining + GRACE_S


def check_finished(
    status: AggregatorStatus, public_key: Ed25519PublicKey | None, current: RoundStart | None
) -> None:
    """Raise AnnouncementRefused unless a ``finished`` status may end the agent.

    Pinned: it must be signed. Always: it must be of the run the agent follows (a replayed
    ``finished`` of an earlier run must not stop a new one).
    """
    what = f"'finished' of run {status.run} ignored"
    if public_key is not None:
        try:
            verify_status(public_key, status)
        except SignatureError as exc:
            raise AnnouncementRefused(f"{what}: {exc}") from exc
    if current is not None and status.run != current.run:
        raise AnnouncementRefused(f"{what}: the agent follows run {current.run}")


def _unaffordable(ann: RoundStart, limits: DeviceLimits) -> str:
    train = ann.train
    if train.local_epochs > limits.max_local_epochs:
        return (
            f"{train.local_epochs} local epochs exceed this device's limit "
            f"of {limits.max_local_epochs} (--max-local-epochs)"
        )
    if train.batch_size > limits.max_batch_size:
        return (
            f"batch size {train.batch_size} exceeds this device's limit "
            f"of {limits.max_batch_size} (--max-batch-size)"
        )
    return ""


def _unusable_codec(ann: RoundStart) -> str:
    try:
        resolve_codec(ann.codec)
    except CodecError as exc:
        return f"update codec: {exc}"
    if ann.download_codec not in DOWNLOAD_CODECS:
        return f"unknown download codec {ann.download_codec!r}"
    return ""
