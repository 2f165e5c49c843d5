"""What agents download after each round: the full model, a compact global delta, the meta.

Each new global model is published, in this order, all retained:

1. ``global/model``: the full fp32 model, for agents that join late or fell behind;
2. ``global/delta``: the step from the previous global model, quantized with the download
   codec (``shared/protocol/global_delta.py``; int8 by default, with server-side error
   feedback), for agents that hold the previous model: ≥ 4× smaller. Cleared when there is none (the
   initial or a resumed model, ``--download-codec none``, or a delta that failed its check);
3. ``global/meta``.

With a download codec the published model *is* the quantized path (previous model + decoded
step): the aggregator continues from exactly what the agents hold. With ``none`` it is the
exact FedAvg result and nothing but the full model and the meta is published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.protocol import messages as msg
from shared.protocol.claims import sign_model_v2
from shared.protocol.frames import FrameError, FrameHeader, encode_frame, tensors_hash
from shared.protocol.global_delta import delta_frame, server_step
from shared.protocol.signing import sign_model
from shared.protocol.topics import Topics

log = logging.getLogger("fedmq.aggregator.downloads")

Tensors = dict[str, np.ndarray]
Publish = Callable[..., None]  # (topic, payload, retain=, wait=) like RetainedPublisher.publish

_UNKNOWN = -2  # what the broker retains on global/delta is unknown (e.g. after a restart)
_CLEARED = -1


def model_frame(
    federation: str,
    round_id: int,
    spec: msg.ModelSpec,
    params: Tensors,
    *,
    model_hash: str | None = None,
    signature: str = "",
    run: int = 0,
    signature_v2: str = "",
) -> bytes:
    """The global-model frame: fp32 tensors, their hash, run, signatures and architecture.

    The same bytes are published on ``global/model`` and saved for ``fedmq export``.
    """
    header = FrameHeader(
        kind="model",
        federation=federation,
        round=round_id,
        codec="fp32",
        meta={
            "model_hash": model_hash or tensors_hash(params),
            "signature": signature,
            "run": run,
            "signature_v2": signature_v2,
            "model": _model_meta(spec),
        },
    )
    return encode_frame(header, params).payload


def _model_meta(spec: msg.ModelSpec) -> dict[str, object]:
    """The architecture in a model frame (what ``fedmq export`` rebuilds); a regression task's
    fields only when it is one, so a classifier's frame is byte for byte what it was."""
    meta: dict[str, object] = {
        "arch": spec.arch,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
    }
    if spec.task != "classification":
        meta.update(task=spec.task, num_outputs=spec.num_outputs)
    return meta


@dataclass(frozen=True)
class ModelSignatures:
    """A global model's two signatures: ``v1`` for agents older than runs, ``v2`` with its run."""

    v1: str
    v2: str


class GlobalDownloads:
    """Computes the published model of each round and publishes what agents download."""

    def __init__(
        self,
        federation: str,
        spec: msg.ModelSpec,
        codec: str,
        seed: int,
        signing_key: Ed25519PrivateKey | None,
        run: int = 0,
    ) -> None:
        self.federation = federation
        self.run = run  # the aggregator's run epoch (set again when it resumes a run)
        self.topics = Topics(federation)
        self.spec = spec
        self.codec = codec
        self.seed = seed
        self.signing_key = signing_key
        self.residual: Tensors | None = None  # server error feedback (persisted)
        self.model_frame = b""
        self._delta: tuple[int, bytes] | None = None  # (round, frame) leading to that round
        self._retained_delta = _UNKNOWN  # round whose delta the broker retains

    def signatures(self, round_id: int, model_hash: str) -> ModelSignatures:
        """The model's signatures (over its run and without it); "" without a signing key."""
        key = self.signing_key
        if key is None:
            return ModelSignatures("", "")
        return ModelSignatures(
            # Still written for agents older than runs, which verify only this one.
            sign_model(key, self.federation, round_id, model_hash),
            sign_model_v2(key, self.federation, self.run, round_id, model_hash),
        )

    def advance(
        self, old: Tensors, old_hash: str, old_round: int, target: Tensors, new_round: int
    ) -> tuple[Tensors, str]:
        """The model to publish after ``new_round`` (and its hash); prepares the delta frame."""
        self._delta = None
        if self.codec == "none":
            self.residual = None
            return target, tensors_hash(target)
        try:
            step = server_step(
                old, target, self.residual, codec=self.codec, seed=self.seed, round_id=new_round
            )
        except FrameError as exc:  # e.g. a step outside the fp16 range
            log.error(
                "round %d: no global delta (%s); agents download the full model", new_round, exc
            )
            self.residual = None
            return target, tensors_hash(target)
        self.residual = step.residual
        sigs = self.signatures(new_round, step.model_hash)
        try:
            frame = delta_frame(
                step,
                federation=self.federation,
                base_hash=old_hash,
                base_round=old_round,
                signature=sigs.v1,
                run=self.run,
                signature_v2=sigs.v2,
            )
        except FrameError as exc:
            log.error(
                "round %d: global delta withheld (%s); agents download the full model",
                new_round,
                exc,
            )
        else:
            self._delta = (new_round, frame)
        return step.published, step.model_hash

    def delta_bytes(self, round_id: int) -> int:
        """Size of the delta frame that leads to ``round_id``'s model (0: none)."""
        return len(self._delta[1]) if self._delta and self._delta[0] == round_id else 0

    def publish(
        self, round_id: int, params: Tensors, model_hash: str, final: bool, publish: Publish
    ) -> None:
        """Publish the full model, the delta (or clear it) and the meta of ``round_id``.

        Only the meta waits for the broker's acknowledgement: one connection's QoS 1
        messages are handled in order, so its PUBACK follows the model's and the delta's.
        Waiting for each in turn cost two more broker round trips after every round, each
        behind the broker's fan-out of the delta to every agent (259 of 270 ms from the last
        update to the new model at 1,000 agents, ``fedmq bench fleet``).
        """
        sigs = self.signatures(round_id, model_hash)
        frame = model_frame(
            self.federation,
            round_id,
            self.spec,
            params,
            model_hash=model_hash,
            signature=sigs.v1,
            run=self.run,
            signature_v2=sigs.v2,
        )
        self.model_frame = frame
        publish(self.topics.global_model, frame, retain=True, wait=False)
        delta = self._delta[1] if self._delta and self._delta[0] == round_id else None
        if delta is not None and self._retained_delta != round_id:
            publish(self.topics.global_delta, delta, retain=True, wait=False)
            self._retained_delta = round_id
        elif delta is None and self._retained_delta != _CLEARED:
            # No stale delta next to this model: agents that missed it fetch the full model.
            publish(self.topics.global_delta, b"", retain=True, wait=False)
            self._retained_delta = _CLEARED
        meta = msg.GlobalMeta(
            federation=self.federation,
            round=round_id,
            model_hash=model_hash,
            model=self.spec,
            nbytes=len(frame),
            final=final,
            signature=sigs.v1,
            run=self.run,
            signature_v2=sigs.v2,
        )
        publish(self.topics.global_meta, meta.to_json(), retain=True, wait=True)


def bytes_down(reports: Sequence[int | None], model_bytes: int, online: int) -> int:
    """Downloads of a round's accepted agents: what they report, else one full model each.

    When no agent reports (older agents), the estimate from before deltas existed: one full
    model frame per online agent.
    """
    if all(r is None for r in reports):
        return model_bytes * max(online, 1)
    return sum(model_bytes if r is None else r for r in reports)
