"""A site aggregator's partial aggregates: the frame it sends up, and its durable outbox.

A partial is an ordinary update frame whose client is the site: the weighted mean of its
devices' (clipped) deltas, with their total sample count as ``num_samples``. The central
aggregator's FedAvg weighs it by that count, which gives flat FedAvg over every device
(Σ_s N_s·(Σ_{i∈s} n_i·Δ_i / N_s) / Σ_s N_s = Σ_i n_i·Δ_i / Σ_i n_i) up to codec error.
Sending the mean rather than the sum keeps the frame on the scale of one update, so the
central norm bound and codecs apply unchanged. Pure: no MQTT, no clock.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aggregator.intake import UpdateIntake
from shared.compression.error_feedback import ErrorFeedback
from shared.files import write_atomic
from shared.protocol import messages as msg
from shared.protocol.frames import FrameError, FrameHeader, decode_frame, encode_frame

log = logging.getLogger("fedmq.site")

Tensors = dict[str, np.ndarray]
_FILE = re.compile(r"round-(\d+)\.fmq")


def partial_meta(intake: UpdateIntake) -> dict[str, object]:
    """What the central metrics read from the site's devices: loss, validation, timing."""
    meta: dict[str, object] = {"site_devices": len(intake.stats)}
    loss, acc = intake.weighted_train_loss(), intake.weighted_val_accuracy()
    if loss is not None:
        meta["train_loss"] = loss
    if acc is not None:
        meta["val_accuracy"] = acc
    meta["val_samples"] = sum(s.val_samples for s in intake.stats)
    meta["train_time_s"] = intake.slowest_train_s()
    downloads = [d for d in intake.download_reports() if d is not None]
    if downloads:
        meta["download_bytes"] = sum(downloads)
    return meta


class PartialEncoder:
    """Encodes partials with the round's codec, keeping what a partial did not carry in an
    error-feedback residual that goes with the next one.

    A device does this for biased codecs only (top-k, low-rank). A site does it for every
    codec: its partial is quantized a second time, after its devices' updates were, and
    without the residual that second rounding error (int8: zero-mean noise per round) would
    add up in the global model as a random walk. With it the model stays within one round's
    rounding of the flat federation's. Measured: docs/sites.md.
    """

    def __init__(self, federation: str, site: str, codec: str = "") -> None:
        """``codec``: the partials' codec ("" = each round's announced one)."""
        self.federation = federation
        self.site = site
        self.codec = codec
        self.feedback = ErrorFeedback()

    def encode(
        self, ann: msg.RoundStart, delta: Mapping[str, np.ndarray], num_samples: int, meta: dict
    ) -> bytes:
        """The partial of round ``ann.round``; FrameError when it cannot be encoded."""
        carried = self.feedback.compensate(delta)
        header = FrameHeader(
            kind="update",
            federation=self.federation,
            round=ann.round,
            client_id=self.site,
            base_hash=ann.base_hash,
            codec=self.codec or ann.codec,
            num_samples=num_samples,
            meta=meta,
        )
        seed = [ann.train.seed, ann.round, zlib.crc32(self.site.encode())]
        encoded = encode_frame(header, carried, rng=np.random.default_rng(seed))
        self.feedback.update(carried, encoded.sent)
        return encoded.payload

    def give_back(self, payload: bytes) -> None:
        """A partial the central aggregator refused as late: its mass is owed again (the
        residual sends it with the next partial)."""
        try:
            sent = decode_frame(payload, max_bytes=len(payload)).tensors
        except FrameError as exc:
            log.warning("not giving back an unreadable partial: %s", exc)
            return
        if self.feedback.residual and set(sent) != set(self.feedback.residual):
            return
        for name, value in sent.items():
            self.feedback.residual[name] = self.feedback.residual.get(name, 0) + value


class PartialOutbox:
    """Partials not yet acknowledged by the central aggregator: in memory, and on disk under
    ``<state_dir>/partials/`` when the site has a state directory (written atomically before
    the partial is published, deleted on its receipt), so a restart re-sends them."""

    def __init__(self, state_dir: Path | None) -> None:
        self.dir = None if state_dir is None else Path(state_dir) / "partials"
        self.pending: dict[int, bytes] = {}
        if self.dir is not None and self.dir.is_dir():
            for path in sorted(self.dir.iterdir()):
                m = _FILE.fullmatch(path.name)
                if m:
                    self.pending[int(m.group(1))] = path.read_bytes()

    def put(self, round_id: int, payload: bytes) -> None:
        """Keep ``payload`` until its receipt (durably first)."""
        if self.dir is not None:
            write_atomic(self.dir / f"round-{round_id}.fmq", payload)
        self.pending[round_id] = payload

    def done(self, round_id: int) -> bytes | None:
        """Forget round ``round_id``'s partial (answered); the payload, if it was pending."""
        if self.dir is not None:
            (self.dir / f"round-{round_id}.fmq").unlink(missing_ok=True)
        return self.pending.pop(round_id, None)

    def rounds(self) -> list[int]:
        """Rounds whose partial waits for a receipt, oldest first."""
        return sorted(self.pending)
