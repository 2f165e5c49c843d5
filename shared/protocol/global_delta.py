"""Global deltas: the new global model sent to agents as a quantized step from the previous one.

Pure numpy + the frame codec (no MQTT, no torch). The aggregator and every agent compute the
new global model with the one function :func:`apply_delta`, from the same decoded step, so
all of them hold bit-identical parameters, and the same
:func:`~shared.protocol.frames.tensors_hash`.

The aggregator's step keeps *server-side error feedback*
(:class:`~shared.compression.error_feedback.ErrorFeedback`, the agents' implementation): what
quantization dropped from one round's step is carried to the next one instead of being lost::

    u          = target − old + residual        (target: old + the round's FedAvg step)
    q          = what encode(u) sends           (int8: stochastic rounding, seeded per round)
    published  = apply_delta(old, q)            (the new global model everyone holds)
    residual'  = u − q

so ``published + residual' == target + residual`` up to fp32 rounding. The step is encoded
once; ``q`` is what the encoder says it sent (bit-identical to decoding it). The frame
(kind ``global_delta``) names the round of ``published``, the hash of ``old`` as its base, and
in its meta the hash of ``published``, the base round, the run and the same Ed25519 signatures
as the full model of that round (``signature``: over federation, round and ``published``'s
hash; ``signature_v2``: the same bound to the run, :mod:`shared.protocol.claims`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.compression.error_feedback import ErrorFeedback
from shared.protocol.frames import (
    EncodedTensors,
    FrameError,
    FrameHeader,
    encode_tensors,
    pack_frame,
    tensors_hash,
)

Tensors = dict[str, np.ndarray]

DELTA_KIND = "global_delta"
#: ``none``: no deltas, agents download the full model each round (the old behaviour).
DOWNLOAD_CODECS = ("none", "fp32", "fp16", "int8")
# Separates the download quantizer's random stream from every other use of the seed.
_STREAM = 0x676C6F62


class DeltaError(FrameError):
    """A global delta cannot be computed, applied or verified."""


def apply_delta(base: Mapping[str, np.ndarray], q: Mapping[str, np.ndarray]) -> Tensors:
    """``base + q`` per tensor in fp32: the one function that makes a new global model.

    Raises DeltaError when names or shapes differ or when a value is (or becomes) non-finite.
    """
    if set(base) != set(q):
        missing, extra = sorted(set(base) - set(q)), sorted(set(q) - set(base))
        raise DeltaError(
            f"delta tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: Tensors = {}
    for name, b in base.items():
        d = np.asarray(q[name])
        if d.shape != np.shape(b):
            raise DeltaError(
                f"delta tensor {name!r} has shape {list(d.shape)}, the model {list(np.shape(b))}"
            )
        if not np.isfinite(d).all():
            raise DeltaError(f"delta tensor {name!r} has non-finite values")
        with np.errstate(over="ignore"):  # overflow is refused just below
            out[name] = np.add(b, d, dtype=np.float32)
        if not np.isfinite(out[name]).all():
            raise DeltaError(f"tensor {name!r} overflows when the delta is applied")
    return out


def step_rng(seed: int, round_id: int) -> np.random.Generator:
    """The quantizer's random stream for round ``round_id``: the same on every re-run."""
    return np.random.default_rng([_STREAM, seed, round_id])


@dataclass(frozen=True)
class ServerStep:
    """One round's download step: what was quantized, and what everybody now holds."""

    base: Tensors  # the previous published model
    update: Tensors  # u = target − base + residual, the values quantized
    encoded: EncodedTensors  # u, encoded once; its ``sent`` is q
    published: Tensors  # apply_delta(base, q)
    residual: Tensors  # u − q, carried into the next round
    model_hash: str  # tensors_hash(published)
    codec: str
    round_id: int

    @property
    def q(self) -> Tensors:
        """The step agents apply: what the encoded frame carries."""
        return self.encoded.sent


def server_step(
    old: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    *,
    codec: str,
    seed: int,
    round_id: int,
) -> ServerStep:
    """Quantize the step ``old → target`` (plus ``residual``) with ``codec`` (fp32/fp16/int8)."""
    if codec not in DOWNLOAD_CODECS or codec == "none":
        raise DeltaError(f"download codec must be one of {DOWNLOAD_CODECS[1:]}, got {codec!r}")
    _same_layout("target", target, old)
    if residual is not None:
        _same_layout("residual", residual, old)
    ef = ErrorFeedback(
        None if residual is None else {n: np.asarray(v, np.float32) for n, v in residual.items()}
    )
    update = ef.compensate({n: np.subtract(target[n], b, dtype=np.float32) for n, b in old.items()})
    encoded = encode_tensors(update, codec=codec, round_id=round_id, rng=step_rng(seed, round_id))
    published = apply_delta(old, encoded.sent)
    ef.update(update, encoded.sent)
    return ServerStep(
        base=dict(old),
        update=update,
        encoded=encoded,
        published=published,
        residual=ef.residual,
        model_hash=tensors_hash(published),
        codec=codec,
        round_id=round_id,
    )


def delta_frame(
    step: ServerStep,
    *,
    federation: str,
    base_hash: str,
    base_round: int,
    signature: str = "",
    run: int = 0,
    signature_v2: str = "",
) -> bytes:
    """The ``global_delta`` frame of ``step``, verified to reproduce ``step.model_hash``.

    The body is the step :func:`server_step` encoded; only the header (with the model hash)
    is new. What the body carries is ``step.q`` (the codecs guarantee decoding gives exactly
    what they sent), so applying ``q`` to the base checks the frame without decoding it: a
    step whose frame would not give agents the model of ``step.model_hash`` raises DeltaError.
    """
    got = tensors_hash(apply_delta(step.base, step.q))
    if got != step.model_hash:
        raise DeltaError(
            f"round {step.round_id}: the encoded delta gives model {got[:12]}, "
            f"not {step.model_hash[:12]}"
        )
    header = FrameHeader(
        kind=DELTA_KIND,
        federation=federation,
        round=step.round_id,
        codec=step.codec,
        base_hash=base_hash,
        meta={
            "model_hash": step.model_hash,
            "base_round": base_round,
            "signature": signature,
            "run": run,
            "signature_v2": signature_v2,
        },
    )
    return pack_frame(header, step.encoded)


def _same_layout(
    what: str, tensors: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]
) -> None:
    if set(tensors) != set(model):
        raise DeltaError(f"{what} tensors do not match the model")
    for name, v in model.items():
        if np.shape(tensors[name]) != np.shape(v):
            raise DeltaError(
                f"{what} tensor {name!r} has shape {list(np.shape(tensors[name]))}, "
                f"the model {list(np.shape(v))}"
            )
        if not np.isfinite(tensors[name]).all():
            raise DeltaError(f"{what} tensor {name!r} has non-finite values")
