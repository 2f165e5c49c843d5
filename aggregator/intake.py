"""Screening one inbound update: envelope, frame, shapes, values — then into the sum.

Everything that can be wrong with an update becomes a rejection with a receipt code and a
reason; nothing raises out of :meth:`UpdateIntake.offer`. :func:`receipt_for` turns a verdict
into the receipt the agent gets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.rounds import ACCEPT, RoundState, Verdict
from aggregator.strategy import AggregationError, PartialSum, RoundSum
from aggregator.update_bounds import norm_violation, sample_violation, value_violation
from shared.protocol.frames import (
    FrameError,
    FrameHeader,
    NonFiniteError,
    ShapeMismatchError,
    decode_frame,
    read_header,
)
from shared.protocol.messages import AgentStatus, Receipt
from shared.protocol.receipts import ReceiptCode

log = logging.getLogger(__name__)

# Refusals after which a selected device has nothing more to send this round (its agent takes
# them as final and does not train again): the round completes without it once the others
# are in and the quorum is met, instead of holding every round open until its deadline. An
# update the device sends anyway is still screened (and may count) until the round closes.
ENDS_ROUND: frozenset[ReceiptCode] = frozenset(
    {"malformed", "too-large", "over-norm", "non-finite", "too-many-samples", "stale-base"}
)


@dataclass(frozen=True)
class UpdateStats:
    """What an accepted update told us about its local training."""

    client_id: str
    num_samples: int
    nbytes: int
    train_loss: float | None
    train_time_s: float | None
    val_accuracy: float | None
    val_samples: int
    download_bytes: int | None = None  # what the agent downloaded since its previous update
    val_rmse: float | None = None  # a regression task's local validation RMSE


@dataclass(frozen=True)
class Offer:
    """The outcome of offering one update."""

    verdict: Verdict
    stats: UpdateStats | None = None


class UpdateIntake:
    """Validates updates for the open round and folds accepted ones into the running sum."""

    def __init__(
        self,
        federation: str,
        state: RoundState,
        acc: RoundSum,
        max_bytes: int,
        max_norm: float | None = None,
        *,
        max_samples: int | None = None,
        declared: Callable[[str], int | None] | None = None,
        headroom: float = math.inf,
        fingerprint: str = "",
        site_devices: Callable[[str], int] | None = None,
    ) -> None:
        """``fingerprint``: the architecture fingerprint of the aggregator's model, named in
        the ``wrong-model`` receipt of an update whose tensors are another model's.
        ``site_devices``: how many devices a contributor stands for when it is a site (its
        update is a partial aggregate, docs/sites.md), 0 for a device."""
        self.federation = federation
        self.fingerprint = fingerprint
        self.state = state
        self.acc = acc
        self.max_bytes = max_bytes
        self.max_norm = max_norm
        self.max_samples = max_samples
        # The sample count each device declared in its status (None: unknown).
        self.declared = declared or (lambda _client: None)
        # Largest delta value the global model can take without overflowing fp32.
        self.headroom = headroom
        self.site_devices = site_devices or (lambda _client: 0)
        self.stats: list[UpdateStats] = []
        self.bytes_received = 0

    def offer(self, topic_round: int, topic_client: str, payload: bytes) -> Offer:
        """Screen, decode and (if valid) add one update. Never raises on bad input."""
        self.bytes_received += len(payload)
        verdict = self._screen(topic_round, topic_client, payload)
        if verdict.accepted:
            verdict, stats = self._decode_and_add(topic_client, payload)
            if stats is not None:
                self.stats.append(stats)
                return Offer(verdict, stats)
        if topic_round == self.state.round_id and topic_client not in self.state.accepted:
            if verdict.code in ENDS_ROUND:  # the agent will not send another: do not wait
                self.state.decline(topic_client, verdict.reason)
            else:
                self.state.reject(topic_client, verdict.reason)
        return Offer(verdict)

    def _screen(self, topic_round: int, client: str, payload: bytes) -> Verdict:
        try:
            head = read_header(payload, max_bytes=self.max_bytes)
        except FrameError as exc:
            # read_header refuses a payload over max_bytes before parsing it; every other
            # FrameError here is a broken frame.
            code: ReceiptCode = "too-large" if len(payload) > self.max_bytes else "malformed"
            return Verdict(code, f"undecodable: {exc}")
        mismatch = [
            (head.kind != "update", f"frame kind is {head.kind!r}, not 'update'"),
            (head.federation != self.federation, f"federation {head.federation!r} is not ours"),
            (head.round != topic_round, f"frame round {head.round} != topic round {topic_round}"),
            (head.client_id != client, f"frame client {head.client_id!r} != topic client"),
            (head.num_samples <= 0, "num_samples must be positive"),
        ]
        for bad, reason in mismatch:
            if bad:
                return Verdict("malformed", reason)
        verdict = self.state.screen(client, head.round, head.base_hash)
        if not verdict.accepted:
            return verdict
        # Header-only, so before any decompression.
        cap = self.max_samples
        if cap is not None:  # a site's partial: at most the maximum per device behind it
            cap *= max(1, self.site_devices(client))
        too_many = sample_violation(head.num_samples, self.declared(client), cap)
        return Verdict("too-many-samples", too_many) if too_many else ACCEPT

    def _decode_and_add(self, client: str, payload: bytes) -> tuple[Verdict, UpdateStats | None]:
        try:
            frame = decode_frame(payload, max_bytes=self.max_bytes, expect_shapes=self.acc.shapes)
        except NonFiniteError as exc:
            return Verdict("non-finite", f"non-finite: {exc}"), None
        except ShapeMismatchError as exc:
            return Verdict("wrong-model", wrong_model_reason(str(exc), self.fingerprint)), None
        except FrameError as exc:
            return Verdict("malformed", f"invalid update: {exc}"), None
        head = frame.header
        who = f"round {head.round} update of {client}"
        too_long = norm_violation(frame.tensors, self.max_norm, who)
        if too_long is not None:
            return Verdict("over-norm", too_long), None
        overflow = value_violation(frame.tensors, self.headroom)
        if overflow is not None:
            return Verdict("non-finite", overflow), None
        meta = head.meta
        # Everything is parsed before the delta touches the sum: nothing can fail after it.
        stats = UpdateStats(
            client_id=client,
            num_samples=head.num_samples,
            nbytes=len(payload),
            train_loss=_num(meta.get("train_loss")),
            train_time_s=_num(meta.get("train_time_s")),
            val_accuracy=_num(meta.get("val_accuracy")),
            val_samples=_count(meta.get("val_samples")),
            download_bytes=_count(meta["download_bytes"]) if "download_bytes" in meta else None,
            val_rmse=_num(meta.get("val_rmse")),
        )
        try:
            self._count(head, frame.tensors, client)
        except AggregationError as exc:
            return Verdict("malformed", f"invalid update: {exc}"), None
        return ACCEPT, stats

    def _count(self, head: FrameHeader, tensors: Mapping[str, np.ndarray], client: str) -> None:
        """Add a screened update to the sum and record it (AggregationError: not counted)."""
        if self.site_devices(client):
            if not isinstance(self.acc, PartialSum):
                raise AggregationError("this round takes no site partial aggregates")
            self.acc.add_partial(tensors, head.num_samples, client)
        else:
            self.acc.add(tensors, head.num_samples, client)
        self.state.accept(client, head.num_samples)

    def decline_wrong_model(self, status: AgentStatus, what: str) -> Verdict | None:
        """A device refused the open round: its build of the model has another fingerprint.

        Its ``wrong-model`` verdict (a receipt names both fingerprints, so the device's log and
        the operator's receipt topic say the same); it counts as a rejection of the round,
        which then does not wait for that device. None for a refusal of another round (only
        logged, by the roster) or from a device whose update was already accepted.
        """
        state = self.state
        if status.round != state.round_id or status.client_id in state.accepted:
            return None
        reason = wrong_model_reason(what, self.fingerprint, status.model_fingerprint)
        state.decline(status.client_id, reason)  # not waited for: it cannot send an update
        return Verdict("wrong-model", reason)

    def weighted_train_loss(self) -> float | None:
        """Sample-weighted mean of the agents' reported training losses."""
        pairs = [(s.train_loss, s.num_samples) for s in self.stats if s.train_loss is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    def weighted_val_accuracy(self) -> float | None:
        """Validation-sample-weighted mean of the agents' local accuracies."""
        pairs = [(s.val_accuracy, s.val_samples) for s in self.stats if s.val_accuracy is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    def pooled_val_rmse(self) -> float | None:
        """The agents' local validation RMSE over all their validation samples (regression)."""
        pairs = [(s.val_rmse, s.val_samples) for s in self.stats if s.val_rmse is not None]
        total = sum(n for _, n in pairs)
        return math.sqrt(sum(v * v * n for v, n in pairs) / total) if total else None

    def download_reports(self) -> list[int | None]:
        """Each accepted update's reported download bytes (None: it did not report)."""
        return [s.download_bytes for s in self.stats]

    def slowest_train_s(self) -> float:
        """The longest local training time among accepted updates."""
        return max((s.train_time_s or 0.0 for s in self.stats), default=0.0)


def wrong_model_reason(what: str, aggregator_fingerprint: str, device: str = "") -> str:
    """The reason of a ``wrong-model`` receipt: what differs, and the fingerprints."""
    theirs = f", this device's is {device}" if device else ""
    return (
        f"wrong model: {what}; the aggregator's architecture fingerprint is "
        f"{aggregator_fingerprint or 'unknown'}{theirs}"
    )


def receipt_for(round_id: int, client_id: str, verdict: Verdict) -> Receipt:
    """The receipt answering an update: its code for agents, its reason for people."""
    return Receipt(
        round=round_id,
        client_id=client_id,
        status="accepted" if verdict.accepted else "rejected",
        reason=verdict.reason,
        code=verdict.code,
    )


def _num(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
        return v if v == v and abs(v) != float("inf") else None
    return None


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40:
        return value
    return 0
