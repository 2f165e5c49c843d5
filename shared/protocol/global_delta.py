"""Global deltas: the new global model sent to agents as a quantized step from the previous one.

Pure numpy + the frame codec (no MQTT, no torch). The aggregator and every agent compute the
new global model with the one function :func:`apply_delta`, from the same decoded step, so
all of them hold bit-identical parameters, and the same
:func:`~shared.protocol.frames.tensors_hash`.

The aggregator's step keeps *server-side error feedback*: what quantization dropped from one
round's step is carried to the next one instead of being lost::

    u          = target − old + residual        (target: old + the round's FedAvg step)
    q          = decode(encode(u))              (int8: stochastic rounding, seeded per round)
    published  = apply_delta(old, q)            (the new global model everyone holds)
    residual'  = u − q

so ``published + residual' == target + residual`` up to fp32 rounding. The frame
(kind ``global_delta``) names the round of ``published``, the hash of ``old`` as its base, and
in its meta the hash of ``published``, the base round and the same Ed25519 signature as the
full model of that round (over federation, round and ``published``'s hash).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.protocol.frames import FrameError, FrameHeader, decode_frame, encode_frame, tensors_hash

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
    q: Tensors  # decode(encode(u)): the step agents apply
    published: Tensors  # apply_delta(base, q)
    residual: Tensors  # u − q, carried into the next round
    model_hash: str  # tensors_hash(published)
    codec: str
    seed: int
    round_id: int


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
    update: Tensors = {}
    for name, b in old.items():
        u = np.subtract(target[name], b, dtype=np.float32)
        if residual is not None:
            u += np.asarray(residual[name], dtype=np.float32)
        update[name] = u
    header = _header(codec, round_id)
    q = decode_frame(encode_frame(header, update, rng=step_rng(seed, round_id)).payload).tensors
    published = apply_delta(old, q)
    new_residual = {n: np.subtract(update[n], q[n], dtype=np.float32) for n in update}
    return ServerStep(
        base=dict(old),
        update=update,
        q=q,
        published=published,
        residual=new_residual,
        model_hash=tensors_hash(published),
        codec=codec,
        seed=seed,
        round_id=round_id,
    )


def delta_frame(
    step: ServerStep, *, federation: str, base_hash: str, base_round: int, signature: str = ""
) -> bytes:
    """The ``global_delta`` frame of ``step``, verified to reproduce ``step.model_hash``.

    The hash must be in the header before the body is encoded, so the body is encoded a
    second time with the identically seeded stream, then decoded and applied again: a frame
    that would not give agents exactly ``step.published`` raises DeltaError.
    """
    header = _header(
        step.codec,
        step.round_id,
        federation=federation,
        base_hash=base_hash,
        meta={"model_hash": step.model_hash, "base_round": base_round, "signature": signature},
    )
    payload = encode_frame(header, step.update, rng=step_rng(step.seed, step.round_id)).payload
    again = decode_frame(payload, expect_shapes={n: v.shape for n, v in step.base.items()})
    got = tensors_hash(apply_delta(step.base, again.tensors))
    if got != step.model_hash:
        raise DeltaError(
            f"round {step.round_id}: the encoded delta gives model {got[:12]}, "
            f"not {step.model_hash[:12]}"
        )
    return payload


def _header(
    codec: str,
    round_id: int,
    *,
    federation: str = "",
    base_hash: str = "",
    meta: dict[str, object] | None = None,
) -> FrameHeader:
    return FrameHeader(
        kind=DELTA_KIND,
        federation=federation,
        round=round_id,
        codec=codec,
        base_hash=base_hash,
        meta=dict(meta or {}),
    )


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
