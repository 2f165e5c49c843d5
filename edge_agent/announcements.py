"""Which round announcements an agent follows: origin (signature), cost, codecs and order.

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

The aggregator's live ``finished`` status ends the agent: :func:`check_finished` holds it to
the same origin (signed, when pinned) and to the run the agent follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.compression.quantize import CodecError
from shared.compression.registry import resolve_codec
from shared.protocol.claims import verify_round_start, verify_status
from shared.protocol.global_delta import DOWNLOAD_CODECS
from shared.protocol.messages import AggregatorStatus, MessageError, RoundStart
from shared.protocol.signing import SignatureError


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
