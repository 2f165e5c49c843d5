"""Which global model an agent may load: integrity, origin (signature) and freshness.

Pure: the caller decodes the frame and hashes its tensors; this module only decides. Every
refusal is a :class:`ModelRejected` (a FrameError, so the agent logs it like any other bad
frame and keeps the model it already has).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.protocol.frames import FrameError, FrameHeader
from shared.protocol.signing import SignatureError, verify_model


class ModelRejected(FrameError):
    """A global model frame that the agent refuses to load."""


@dataclass(frozen=True)
class HeldModel:
    """What the agent currently trusts: its round and hash."""

    round_id: int
    model_hash: str


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
    resulting model's hash and signature in ``meta`` and its round in ``round``.
    With ``public_key`` pinned, the model must carry a valid signature over (federation,
    round, hash) and may not be older than ``held`` nor differ from it in the same round.
    Without a key (dev mode) only integrity and the round order are checked.
    """
    if head.kind != kind or head.federation != federation:
        what = "global model" if kind == "model" else "global delta"
        raise ModelRejected(f"not a {what} of {federation!r}")
    claimed = head.meta.get("model_hash")
    if claimed != actual_hash:
        raise ModelRejected(
            f"model hash mismatch: frame says {claimed!r}, content is {actual_hash}"
        )
    if public_key is not None:
        try:
            verify_model(
                public_key, federation, head.round, actual_hash, head.meta.get("signature")
            )
        except SignatureError as exc:
            raise ModelRejected(f"round {head.round} model refused: {exc}") from exc
    if held is None:
        return
    if head.round < held.round_id:
        raise ModelRejected(f"older model refused (round {head.round} < {held.round_id})")
    if public_key is not None and head.round == held.round_id and actual_hash != held.model_hash:
        raise ModelRejected(
            f"a second, different model for round {head.round} refused "
            f"({actual_hash[:12]} != held {held.model_hash[:12]})"
        )
