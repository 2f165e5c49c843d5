"""Which global model an agent may load: integrity, origin (signature) and freshness.

Pure: the caller decodes the frame and hashes its tensors; this module only decides. Every
refusal is a :class:`ModelRejected` (a FrameError, so the agent logs it like any other bad
frame and keeps the model it already has).

Freshness is the order of ``(run, round)``: a new run of the federation (a larger run epoch,
see :mod:`shared.protocol.claims`) supersedes every model of an older one, whatever their
rounds, so a retained or replayed model of an earlier run can never freeze a new run; within
a run, a model never goes back to an earlier round.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.protocol.claims import frame_run, verify_model_v2
from shared.protocol.frames import FrameError, FrameHeader
from shared.protocol.signing import SignatureError


class ModelRejected(FrameError):
    """A global model frame that the agent refuses to load."""


@dataclass(frozen=True)
class HeldModel:
    """What the agent currently trusts: its round, hash and run."""

    round_id: int
    model_hash: str
    run: int = 0


def check_global_model(
    head: FrameHeader,
    actual_hash: str,
    federation: str,
    held: HeldModel | None,
    public_key: Ed25519PublicKey | None,
    *,
    kind: str = "model",
) -> None:
    """Raise ModelRejected unless the model may replace ``held``.

    ``head`` is the header of a full model frame (``kind="model"``) or of a global delta
    (``kind="global_delta"``, ``actual_hash`` = the hash after applying it): both claim the
    resulting model's hash, run and signatures in ``meta`` and its round in ``round``.
    With ``public_key`` pinned, the model must carry a valid ``signature_v2`` over
    (federation, run, round, hash) and may not differ from ``held`` in the same run and round.
    In every mode a model older than ``held`` by (run, round) is refused.
    """
    if head.kind != kind or head.federation != federation:
        what = "global model" if kind == "model" else "global delta"
        raise ModelRejected(f"not a {what} of {federation!r}")
    claimed = head.meta.get("model_hash")
    if claimed != actual_hash:
        raise ModelRejected(
            f"model hash mismatch: frame says {claimed!r}, content is {actual_hash}"
        )
    run = frame_run(head)
    if public_key is not None:
        try:
            verify_model_v2(
                public_key, federation, run, head.round, actual_hash, head.meta.get("signature_v2")
            )
        except SignatureError as exc:
            raise ModelRejected(f"round {head.round} model refused: {exc}") from exc
    if held is None:
        return
    refuse_older(run, head.round, held)
    same = (run, head.round) == (held.run, held.round_id)
    if public_key is not None and same and actual_hash != held.model_hash:
        raise ModelRejected(
            f"a second, different model for round {head.round} refused "
            f"({actual_hash[:12]} != held {held.model_hash[:12]})"
        )


def refuse_older(run: int, round_id: int, held: HeldModel) -> None:
    """Raise ModelRejected when (run, round) is older than the held model's."""
    if run < held.run:
        raise ModelRejected(
            f"model of an older run refused (run {run} < {held.run}, round {round_id})"
        )
    if run == held.run and round_id < held.round_id:
        raise ModelRejected(f"older model refused (round {round_id} < {held.round_id})")
