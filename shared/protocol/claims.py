"""What the aggregator signs: global models bound to a run, round announcements, ONNX headers.

Each claim is the canonical JSON (:func:`shared.protocol.signing.canonical_json`) of a signing
domain and every field that changes what a device does with the signed thing; the domain
names the claim's version, so a signature of one kind never verifies another, and a new
field means a new domain. Signed fields, by claim:

- ``fedmq-global-model-v2`` (model frame, global delta, ``global/meta``: ``signature_v2``):
  federation, run, round, model hash (the SHA-256 of every tensor).
- ``fedmq-round-start-v2`` (``RoundStart.signature_v2``): every field but ``ts`` (the send
  time, informative) and the two signatures: schema, federation, run, round, base hash,
  deadline, selection, the whole model spec (task and outputs included), the whole training
  parameters (seed and regression loss included), codec, maximum update size, download codec
  and the architecture fingerprint. FedProx's ``proximal_mu`` is signed only when it is not
  0: agents older than it verify the announcements they can follow (μ = 0) and refuse the
  others, which they would train without the proximal term.
- ``fedmq-round-start-v1`` (``RoundStart.signature``): the fields agents older than model
  plugins know: the same minus the fingerprint, the model's task and outputs and the
  regression loss. Written only when such agents can follow the round (a classification task
  on ``(C, H, W)`` samples), so they keep verifying their announcements; an agent that knows
  ``signature_v2`` verifies that one and follows an announcement with only ``signature`` only
  when it holds nothing the v1 claim leaves out (:func:`verify_round_start`).
- ``fedmq-onnx-header-v2`` (ONNX frame version 2, ``signature``): federation, run, round,
  model hash, ONNX SHA-256, input shape, number of classes, architecture, opset; and the
  task and number of outputs when they are not a classifier's (so servers older than them
  refuse a regression model instead of serving its values as class scores).
- ``fedmq-aggregator-status-v1`` (``AggregatorStatus.signature``: a live ``finished`` ends
  the agents): schema, federation, state, round, rounds total, run.

A *run* is the aggregator's run epoch (:class:`shared.protocol.messages.RoundStart.run`): a
new run of a federation has a larger one, and devices order models by ``(run, round)``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.protocol.frames import FrameError, FrameHeader
from shared.protocol.messages import MAX_RUN, AggregatorStatus, RoundStart
from shared.protocol.onnx_frame import OnnxFrame, OnnxHeader
from shared.protocol.signing import SignatureError, canonical_json, sign_bytes, verify_bytes

MODEL_CONTEXT = "fedmq-global-model-v2"
ROUND_START_CONTEXT = "fedmq-round-start-v1"
ROUND_START_V2_CONTEXT = "fedmq-round-start-v2"
STATUS_CONTEXT = "fedmq-aggregator-status-v1"
ONNX_HEADER_CONTEXT = "fedmq-onnx-header-v2"


def model_claim(federation: str, run: int, round_id: int, model_hash: str) -> bytes:
    """The signed bytes of one global model of one run."""
    body = [federation, int(run), int(round_id), model_hash]
    return canonical_json(MODEL_CONTEXT, body)


def sign_model_v2(
    key: Ed25519PrivateKey, federation: str, run: int, round_id: int, model_hash: str
) -> str:
    """Ed25519 over (federation, run, round, model hash): the ``signature_v2`` of a model."""
    return sign_bytes(key, model_claim(federation, run, round_id, model_hash))


def verify_model_v2(
    key: Ed25519PublicKey,
    federation: str,
    run: int,
    round_id: int,
    model_hash: str,
    signature: object,
) -> None:
    """Raise SignatureError unless ``signature`` signs this model of this run."""
    if not isinstance(signature, str) or not signature:
        raise SignatureError("model is not signed (no run-bound signature_v2)")
    what = f"federation {federation!r} run {run} round {round_id} model {model_hash[:12]}"
    verify_bytes(key, model_claim(federation, run, round_id, model_hash), signature, what)


def frame_run(head: FrameHeader) -> int:
    """The run a model or delta frame names in its meta (0: an aggregator older than runs).

    Raises FrameError when it is not an integer in [0, MAX_RUN]: it orders models, so a
    malformed one is never guessed at.
    """
    run = head.meta.get("run", 0)
    if not isinstance(run, int) or isinstance(run, bool) or not 0 <= run <= MAX_RUN:
        raise FrameError(f"bad run {run!r} in the frame header")
    return run


# What agents older than model plugins know of an announcement, and so sign (v1 claim).
_V1_FIELDS = (
    "schema",
    "federation",
    "round",
    "base_hash",
    "deadline",
    "selected",
    "model",
    "train",
    "codec",
    "max_update_bytes",
    "download_codec",
    "run",
)
_V1_MODEL_FIELDS = ("arch", "input_shape", "num_classes")
_V1_TRAIN_FIELDS = ("local_epochs", "batch_size", "lr", "momentum", "weight_decay", "seed")


def round_start_claim(ann: RoundStart) -> bytes:
    """The v1 claim of a round announcement: the fields agents older than model plugins know.

    A test pins the list; new fields go into :func:`round_start_claim_v2` only, so those
    agents (which drop unknown fields) still verify what they can follow.
    """
    body = _body(ann)
    v1 = {name: body[name] for name in _V1_FIELDS}
    v1["model"] = {name: body["model"][name] for name in _V1_MODEL_FIELDS}
    v1["train"] = {name: body["train"][name] for name in _V1_TRAIN_FIELDS}
    return canonical_json(ROUND_START_CONTEXT, v1)


def round_start_claim_v2(ann: RoundStart) -> bytes:
    """The v2 claim of a round announcement: every field but ``ts`` and the signatures."""
    body = _body(ann)
    del body["signature_v2"]
    return canonical_json(ROUND_START_V2_CONTEXT, body)


def older_agents_follow(ann: RoundStart) -> bool:
    """True when agents older than model plugins can train ``ann`` (and so get a v1
    signature): a classification task on ``(C, H, W)`` samples, without FedProx's term."""
    return (
        ann.model.task == "classification"
        and len(ann.model.input_shape) == 3
        and ann.train.proximal_mu == 0
        and ann.mode == "sync"
    )


def _body(ann: RoundStart) -> dict[str, Any]:
    body = msgspec.to_builtins(_normalized(ann, "", ""))
    assert isinstance(body, dict)
    del body["ts"], body["signature"]
    if not body["train"]["proximal_mu"]:  # as agents older than FedProx sign it
        del body["train"]["proximal_mu"]
    if body["mode"] == "sync":  # as aggregators older than the asynchronous mode sign it
        del body["mode"], body["max_staleness"]
    return body


def _normalized(ann: RoundStart, signature: str, signature_v2: str) -> RoundStart:
    """``ann`` with its signatures and its floats as floats: an int ``lr`` would sign as
    ``1``, and the agent, which decodes it as a float, would verify ``1.0``."""
    return msgspec.structs.replace(
        ann,
        signature=signature,
        signature_v2=signature_v2,
        deadline=float(ann.deadline),
        train=msgspec.structs.replace(
            ann.train,
            lr=float(ann.train.lr),
            momentum=float(ann.train.momentum),
            weight_decay=float(ann.train.weight_decay),
            proximal_mu=float(ann.train.proximal_mu),
        ),
    )


def sign_round_start(key: Ed25519PrivateKey, ann: RoundStart) -> RoundStart:
    """``ann`` with its signatures: v2 always, v1 when older agents can follow it."""
    v1 = sign_bytes(key, round_start_claim(ann)) if older_agents_follow(ann) else ""
    return _normalized(ann, v1, sign_bytes(key, round_start_claim_v2(ann)))


def verify_round_start(key: Ed25519PublicKey, ann: RoundStart) -> None:
    """Raise SignatureError unless ``ann`` carries a valid signature over all it holds.

    ``signature_v2`` covers every field. Without it (an aggregator older than fingerprints,
    or a broker that stripped it) the v1 ``signature`` is accepted only for an announcement
    that holds nothing it leaves out: no fingerprint, a classification task on images.
    """
    what = f"the round {ann.round} announcement of run {ann.run}"
    if ann.signature_v2:
        verify_bytes(key, round_start_claim_v2(ann), ann.signature_v2, what)
        return
    if not ann.signature:
        raise SignatureError("announcement is not signed")
    if ann.fingerprint or not older_agents_follow(ann):
        raise SignatureError(
            f"{what} carries fields its v1 signature does not cover (fingerprint, task, "
            "sample shape) and no signature_v2"
        )
    verify_bytes(key, round_start_claim(ann), ann.signature, what)


def status_claim(status: AggregatorStatus) -> bytes:
    """The signed bytes of an aggregator status: every field but ``ts`` and the signature."""
    body = msgspec.to_builtins(msgspec.structs.replace(status, signature=""))
    assert isinstance(body, dict)
    del body["ts"], body["signature"]
    return canonical_json(STATUS_CONTEXT, body)


def sign_status(key: Ed25519PrivateKey, status: AggregatorStatus) -> AggregatorStatus:
    """``status`` with its Ed25519 signature (over :func:`status_claim`)."""
    return msgspec.structs.replace(status, signature=sign_bytes(key, status_claim(status)))


def verify_status(key: Ed25519PublicKey, status: AggregatorStatus) -> None:
    """Raise SignatureError unless ``status`` carries a valid signature over all its fields."""
    if not status.signature:
        raise SignatureError("status is not signed")
    what = f"the {status.state!r} status of run {status.run}"
    verify_bytes(key, status_claim(status), status.signature, what)


def onnx_claim(header: OnnxHeader) -> bytes:
    """The signed bytes of an ONNX header: every field but the signature."""
    body: dict[str, Any] = {
        "federation": header.federation,
        "run": int(header.run),
        "round": int(header.round),
        "model_hash": header.model_hash,
        "onnx_sha256": header.onnx_sha256,
        "input_shape": [int(d) for d in header.input_shape],
        "num_classes": int(header.num_classes),
        "arch": header.arch,
        "opset": int(header.opset),
    }
    # Signed only when they differ from their defaults: a classifier's claim stays the one
    # older servers verify, and they refuse a regression model's (which they cannot serve).
    if header.task != "classification" or header.num_outputs != 1:
        body.update(task=header.task, num_outputs=int(header.num_outputs))
    return canonical_json(ONNX_HEADER_CONTEXT, body)


def sign_onnx_header(key: Ed25519PrivateKey, header: OnnxHeader) -> OnnxHeader:
    """``header`` with its Ed25519 signature (over :func:`onnx_claim`)."""
    return replace(header, signature=sign_bytes(key, onnx_claim(header)))


def verify_onnx_frame(key: Ed25519PublicKey, frame: OnnxFrame) -> None:
    """Raise SignatureError unless ``frame`` is a version-2 frame whose header is signed.

    A version-1 frame (an aggregator older than signed headers) signed only the ONNX hash:
    its input shape, classes and architecture could be relabelled, so it is refused.
    """
    head = frame.header
    if frame.version < 2:
        raise SignatureError(
            f"ONNX frame version {frame.version} has an unsigned header "
            "(an aggregator older than signed ONNX headers): refused"
        )
    if not head.signature:
        raise SignatureError("ONNX model is not signed")
    what = f"the ONNX header of run {head.run} round {head.round}"
    verify_bytes(key, onnx_claim(head), head.signature, what)
