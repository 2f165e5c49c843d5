"""JSON control messages of the fedmq protocol.

Control messages are JSON so that ``mosquitto_sub -v -t 'fl/#'`` shows them readably. Each is
a frozen msgspec Struct with an explicit ``schema`` version; decoding validates every field and
raises :class:`MessageError` naming the field, which callers turn into a receipt or a log line.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from shared.protocol.receipts import ReceiptCode, code_from_legacy_reason, known_code

SCHEMA = 1

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")]
Hash = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
CodeName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9\-]{0,31}\Z")]

# Control messages are small; anything bigger is hostile or a bug.
MAX_CONTROL_BYTES = 256 * 1024

# Bounds of every training parameter an agent accepts, signed or not: an announcement outside
# them fails to decode (MessageError naming the field), so the agent logs and skips it. They
# are the protocol's (a sane SGD step); each device may cap what it can afford below them
# (edge_agent.config: max_local_epochs, max_batch_size). The aggregator refuses to start
# outside them (aggregator.config).
MAX_LR = 10.0
MAX_MOMENTUM = 1.0  # exclusive: heavy-ball SGD diverges at momentum ≥ 1
MAX_WEIGHT_DECAY = 1.0
MAX_LOCAL_EPOCHS = 1000
MAX_BATCH_SIZE = 65536
MAX_SEED = 2**63 - 1
MAX_PROXIMAL_MU = 100.0  # FedProx's μ (Li et al. 2020 searched 0.001 … 1)
MAX_INPUT_DIM = 4096
MAX_CLASSES = 100_000
MAX_OUTPUTS = 4096  # values a regression model predicts per sample
# Versions an asynchronous update may lag behind the current one (docs/async.md).
MAX_STALENESS = 1000
# A run epoch (milliseconds since 1970 by default): any JSON number that is exactly an integer.
MAX_RUN = 2**53 - 1

Run = Annotated[int, msgspec.Meta(ge=0, le=MAX_RUN)]
Dim = Annotated[int, msgspec.Meta(gt=0, le=MAX_INPUT_DIM)]
# base64 of a 64-byte Ed25519 signature is 88 characters; "" = unsigned.
Signature = Annotated[str, msgspec.Meta(max_length=128)]
# The architecture fingerprint (shared/runtime/plugins.py): hex SHA-256, or "" = none.
Fingerprint = Annotated[str, msgspec.Meta(pattern=r"^(?:[0-9a-f]{64})?\Z")]
# One sample's shape: an image's (C, H, W), a sensor window's (C, L), a feature vector's (F,).
InputShape = Annotated[tuple[Dim, ...], msgspec.Meta(min_length=1, max_length=3)]
Task = Literal["classification", "regression"]
TASKS: tuple[Task, ...] = ("classification", "regression")
RegressionLoss = Literal["mse", "mae"]
REGRESSION_LOSSES: tuple[RegressionLoss, ...] = ("mse", "mae")


class MessageError(ValueError):
    """A control message could not be decoded or failed validation."""


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=False, kw_only=True):
    """Base of every control message: a schema version and a send time."""

    schema: int = SCHEMA
    ts: float = msgspec.field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise ValueError(f"unsupported schema version {self.schema} (this is {SCHEMA})")

    def to_json(self) -> bytes:
        """Encode as compact JSON bytes."""
        return msgspec.json.encode(self)


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Which architecture to build and what it predicts: agents need no code change per model.

    ``arch`` names a built-in model or a plugin (:mod:`shared.runtime.plugins`); no code travels.
    ``input_shape`` is one float32 sample's shape, 1 to 3 dimensions. ``task`` says what the
    outputs are: ``num_classes`` logits (classification) or ``num_outputs`` values
    (regression; ``num_classes`` is then unused).
    """

    arch: Name
    input_shape: InputShape = (1, 28, 28)
    num_classes: Annotated[int, msgspec.Meta(gt=0, le=MAX_CLASSES)] = 10
    # Since model plugins: older agents ignore both (they only know classification), and
    # only announcements that keep them at their defaults carry a signature they can verify.
    task: Task = "classification"
    num_outputs: Annotated[int, msgspec.Meta(gt=0, le=MAX_OUTPUTS)] = 1

    @property
    def output_size(self) -> int:
        """Values the model outputs per sample: logits of the classes, or regression outputs."""
        return self.num_classes if self.task == "classification" else self.num_outputs


class TrainParams(msgspec.Struct, frozen=True, kw_only=True):
    """Local training hyper-parameters chosen by the operator for a round."""

    local_epochs: Annotated[int, msgspec.Meta(gt=0, le=MAX_LOCAL_EPOCHS)] = 1
    batch_size: Annotated[int, msgspec.Meta(gt=0, le=MAX_BATCH_SIZE)] = 32
    lr: Annotated[float, msgspec.Meta(gt=0, le=MAX_LR)] = 0.01
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=MAX_MOMENTUM)] = 0.9
    weight_decay: Annotated[float, msgspec.Meta(ge=0, le=MAX_WEIGHT_DECAY)] = 0.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] = 0
    # The loss of a regression task (classification always trains on cross-entropy).
    regression_loss: RegressionLoss = "mse"
    # FedProx (Li et al. 2020): μ of the proximal term μ/2·‖w − w_global‖² added to the local
    # loss; 0 = plain local SGD. Agents older than it ignore the field and train without the
    # term; pinned ones refuse a μ > 0 announcement, whose signature covers it
    # (shared/protocol/claims.py, docs/strategies.md "FedProx").
    proximal_mu: Annotated[float, msgspec.Meta(ge=0, le=MAX_PROXIMAL_MU)] = 0.0


class RoundStart(Message, frozen=True, kw_only=True):
    """Announcement of a training round: who trains which base model, how, and until when."""

    federation: Name
    round: NonNeg
    base_hash: Hash
    # Unix time (the aggregator's clock) after which the round may close without stragglers.
    # Agents count deadline - ts from the arrival on their own clock, never comparing it
    # with theirs, which may be minutes off (edge_agent/announcements.py, open_until).
    deadline: float
    selected: list[Name]
    model: ModelSpec
    train: TrainParams
    codec: str = "int8"
    max_update_bytes: Positive = 64 * 1024 * 1024
    # How the aggregator publishes each new global model on global/delta (a quantized step
    # from the previous one); "none" (also: an older aggregator) = only the full model.
    download_codec: str = "none"
    # The aggregator's run epoch: a new run of the federation has a larger one (0: an
    # aggregator older than runs). Agents order announcements and models by (run, round).
    run: Run = 0
    # base64 Ed25519 over the fields older agents know (shared/protocol/claims.py); "" =
    # unsigned, or an announcement older agents cannot follow (a regression task, ...).
    # Agents pinning the aggregator's key refuse an announcement without a valid signature.
    signature: Signature = ""
    # The architecture fingerprint of the model the aggregator built from ``model``: a
    # device whose own build differs refuses the round (shared/runtime/plugins.py). "" = an
    # aggregator older than fingerprints.
    fingerprint: Fingerprint = ""
    # base64 Ed25519 over every field but ts and the signatures, the fingerprint included
    # (claims.py, "fedmq-round-start-v2"); "" = an aggregator older than it.
    signature_v2: Signature = ""
    # Buffered asynchronous aggregation (FedBuff, docs/async.md): "async" = every device may
    # train on the newest model it holds and upload a delta naming its base round (``selected``
    # is empty); updates up to ``max_staleness`` versions old still count. Signed in v2 only
    # when not "sync" (claims.py); agents older than it see an unsigned-v1 announcement.
    mode: Literal["sync", "async"] = "sync"
    max_staleness: Annotated[int, msgspec.Meta(ge=0, le=MAX_STALENESS)] = 0


class AgentStatus(Message, frozen=True, kw_only=True):
    """Presence of one agent; retained, with an ``offline`` last will."""

    client_id: Name
    state: Literal["online", "training", "offline"]
    num_samples: NonNeg = 0
    round: int = -1
    device: dict[str, str] = msgspec.field(default_factory=dict)
    # Why the agent sent no update for ``round`` ("" = it did not skip it): its training
    # diverged, or its delta could not be encoded. Older aggregators ignore the field.
    skipped: Annotated[str, msgspec.Meta(max_length=300)] = ""
    # When it skipped ``round`` because its own build of the round's model has another
    # architecture fingerprint than the announced one: its fingerprint ("" otherwise). The
    # aggregator answers with a ``wrong-model`` receipt naming both.
    model_fingerprint: Fingerprint = ""


class SiteStatus(Message, frozen=True, kw_only=True):
    """Presence of one site aggregator (docs/sites.md); retained on ``sites/{site}/status``
    with an ``offline`` last will, and carried over the bridge to the central broker.

    The central aggregator treats an online site as one contributor whose update may claim
    at most ``num_samples`` (its online devices' declared samples) and which stands for
    ``devices`` devices.
    """

    site: Name
    state: Literal["online", "offline"]
    devices: NonNeg = 0  # devices online behind the site
    num_samples: NonNeg = 0  # their declared samples, in all
    round: int = -1  # the last round whose partial the site sent (-1: none yet)
    # The central round the site is summing now (-1: none), and its devices' updates so far.
    open_round: int = -1
    updates: NonNeg = 0


class Receipt(Message, frozen=True, kw_only=True):
    """The aggregator's application-level acknowledgement of one update.

    Programs decide on :meth:`effective_code`; ``reason`` is for people (and for older agents,
    which match on its text). ``code`` is None only from an aggregator older than the codes.
    """

    round: NonNeg
    client_id: Name
    status: Literal["accepted", "rejected"]
    reason: str = ""
    # A str on the wire, not the Literal: a newer aggregator may send a code this agent does
    # not know, and the receipt must still be read (see effective_code).
    code: CodeName | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.code is not None and (self.code == "accepted") != (self.status == "accepted"):
            raise ValueError(f"status {self.status!r} contradicts code {self.code!r}")

    def effective_code(self) -> ReceiptCode:
        """The code; for a receipt without one, derived from its reason text.

        A code this version does not know (a newer aggregator) reads as ``malformed`` when the
        update was refused: final, not counted, not owed, so the agent neither re-sends it
        nor counts its mass twice.
        """
        if self.code is None:
            return code_from_legacy_reason(self.status, self.reason)
        return known_code(self.code, self.status)


class GlobalMeta(Message, frozen=True, kw_only=True):
    """Describes the retained global model: which round produced it and its hash."""

    federation: Name
    round: NonNeg  # number of rounds applied so far; 0 is the initial model
    model_hash: Hash
    model: ModelSpec
    nbytes: NonNeg
    final: bool = False
    # base64 Ed25519 over (federation, round, model_hash), see shared/protocol/signing.py;
    # "" = unsigned. Read by agents older than runs.
    signature: str = ""
    run: Run = 0  # the run that produced the model (0: an aggregator older than runs)
    # base64 Ed25519 over (federation, run, round, model_hash), shared/protocol/claims.py
    signature_v2: Signature = ""


class RoundDecision(Message, frozen=True, kw_only=True):
    """What the aggregator decided about a round: applied, extended, retried, failed, or
    discarded (closed, but its result was not a usable model: the global model is unchanged
    and the federation goes on with the next round)."""

    federation: Name
    round: NonNeg
    decision: Literal["applied", "extended", "retried", "failed", "discarded"]
    accepted: NonNeg
    min_clients: Positive
    extensions: NonNeg = 0
    deadline: float = 0.0  # the new deadline of an extended/retried round
    reason: str = ""


class AggregatorStatus(Message, frozen=True, kw_only=True):
    """Life-cycle of the aggregator: agents exit when the federation is finished."""

    federation: Name
    state: Literal["running", "finished", "offline"]
    round: int = -1
    rounds_total: NonNeg = 0
    run: Run = 0  # the aggregator's run epoch (0: an aggregator older than runs)
    # base64 Ed25519 over every field but ts (shared/protocol/claims.py); "" = unsigned. A
    # pinned agent ends on "finished" only when it is signed and of the run it follows.
    signature: Signature = ""


class RoundMetrics(Message, frozen=True, kw_only=True):
    """What one applied round did; one entry of ``metrics.json``."""

    federation: Name
    round: NonNeg
    participants: list[str]
    accepted: NonNeg
    rejected: NonNeg
    num_samples: NonNeg
    train_loss: float | None = None
    local_val_accuracy: float | None = None
    test_accuracy: float | None = None  # classification only
    test_loss: float | None = None  # cross-entropy, or the regression loss (MSE or MAE)
    bytes_up: NonNeg = 0  # every update payload received, re-sends and rejected ones included
    update_bytes: NonNeg = 0  # the accepted update frames, each counted once
    # Global models and deltas the round's accepted agents downloaded since their previous
    # update, as they report it (an agent that does not report counts one full model; when
    # none reports: the old estimate, full model frame × online agents).
    bytes_down: NonNeg = 0
    model_bytes: NonNeg = 0  # the full global-model frame published after this round
    delta_bytes: NonNeg = 0  # the global-delta frame published after this round (0: none)
    download_codec: str = ""
    round_time_s: NonNegFloat = 0.0
    slowest_train_s: NonNegFloat = 0.0
    aggregate_latency_ms: NonNegFloat = 0.0
    codec: str = ""
    model_hash: str = ""
    onnx_export_s: NonNegFloat | None = None  # None: ONNX export off or failed
    # What the model predicts; regression rounds report errors instead of accuracy (an
    # older aggregator's metrics have no task: classification).
    task: Task = "classification"
    test_rmse: float | None = None  # regression only
    test_mae: float | None = None  # regression only
    local_val_rmse: float | None = None  # regression: the agents' pooled validation RMSE
    # The strategy (docs/strategies.md): the L2 bound updates were clipped to this round
    # (None: not clipped), how many were shortened, and with differential privacy the ε
    # spent so far at δ (None: no DP).
    clip_bound: float | None = None
    clipped: NonNeg = 0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    # Asynchronous mode (docs/async.md): the staleness (versions behind) of each update this
    # version applied, in acceptance order; empty for synchronous rounds.
    mode: Literal["sync", "async"] = "sync"
    staleness: list[NonNeg] = msgspec.field(default_factory=list)


M = TypeVar("M", bound=Message)


# One decoder per message type, built once under a lock. msgspec builds a type's validation
# info on its first use and calls back into Python meanwhile: the first decodes of one type
# on several threads at once crashed the process (a segmentation fault in msgspec 0.22 with
# 125 agents per process in ``fedmq bench fleet``). A built Decoder is safe on any thread.
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_decoders_lock = threading.Lock()


def decoder(kind: type[M]) -> msgspec.json.Decoder[M]:
    """The shared decoder of ``kind`` (built on first use, by one thread)."""
    found = _decoders.get(kind)
    if found is None:
        with _decoders_lock:
            found = _decoders.get(kind)
            if found is None:
                found = _decoders[kind] = msgspec.json.Decoder(kind)
    return found


def decode(payload: bytes, kind: type[M]) -> M:
    """Decode and validate ``payload`` as a ``kind`` message, or raise MessageError."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise MessageError(f"{kind.__name__}: {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        return decoder(kind).decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"invalid {kind.__name__}: {exc}") from exc


def to_builtins(msg: Message) -> dict[str, Any]:
    """Plain-dict form of a message (for metrics files)."""
    out = msgspec.to_builtins(msg)
    assert isinstance(out, dict)
    return out
