"""How an agent keeps its global model current: compact deltas, the full model only when needed.

The aggregator publishes every new global model twice, both retained: in full on
``global/model`` (for agents that join late or fell behind) and as a quantized step from the
previous model on ``global/delta`` (≥ 4× smaller with int8). An agent always follows the
delta topic, and subscribes to the full model only while it needs it (:class:`SyncPolicy`):

- it holds no model yet (start), or no round announcement has told it yet whether the
  aggregator publishes deltas,
- a delta was refused (bad hash, shapes, signature) or builds on a model it does not hold
  (it missed a round),
- a round is announced on a model it does not hold and no usable delta came within
  ``delta_wait_s``, or at once when the round belongs to another run (no delta crosses runs),
- the aggregator publishes no deltas (the announcement's ``download_codec`` is ``none``).

:class:`ModelSync` holds the verified model, applies deltas with
:func:`shared.protocol.global_delta.apply_delta` (so it holds exactly the aggregator's parameters),
checks both kinds of frame with :func:`edge_agent.model_guard.check_global_model`, and counts
the bytes it downloads. Pure: no MQTT; the clock is injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.model_guard import HeldModel, ModelRejected, check_global_model, refuse_older
from shared.protocol.claims import frame_run
from shared.protocol.frames import FrameError, decode_frame, read_header, tensors_hash
from shared.protocol.global_delta import DELTA_KIND, apply_delta

log = logging.getLogger("fedmq.agent.sync")

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class GlobalModel:
    """The verified global model this agent holds."""

    round_id: int
    model_hash: str
    params: Tensors
    run: int = 0


@dataclass(frozen=True)
class _Announced:
    round_id: int
    base_hash: str
    deltas: bool  # the aggregator publishes global deltas
    seen_at: float
    run: int = 0


class SyncPolicy:
    """Decides whether the agent needs the full global model topic. Pure; clock injected."""

    def __init__(self, delta_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delta_wait_s = delta_wait_s
        self.clock = clock
        self.held: HeldModel | None = None
        self._announced: _Announced | None = None
        self._fallback = ""  # why a delta could not be used ("" = no reason)

    def holds(self, held: HeldModel) -> None:
        """The agent now holds ``held`` (from a delta or a full model)."""
        self.held = held
        self._fallback = ""

    def announced(self, round_id: int, base_hash: str, deltas: bool, run: int = 0) -> None:
        """A round of ``run`` was announced on model ``base_hash``; ``deltas``: deltas come."""
        prev = self._announced
        if prev is not None and (prev.run, prev.round_id, prev.base_hash) == (
            run,
            round_id,
            base_hash,
        ):
            self._announced = _Announced(round_id, base_hash, deltas, prev.seen_at, run)
            return  # re-announced (extended, reconnect): the grace period keeps running
        self._announced = _Announced(round_id, base_hash, deltas, self.clock(), run)

    def fall_back(self, why: str) -> None:
        """A delta could not be used: fetch the full model until a new model is held."""
        self._fallback = why

    def why_full(self) -> str:
        """Why the full model is needed now; ``""`` when deltas suffice."""
        held, ann = self.held, self._announced
        if held is None:
            return "no global model held yet"
        if self._fallback:
            return self._fallback
        if ann is None:
            # Until an announcement says whether deltas come (an older aggregator, or
            # --download-codec none, sends none), keep the full model: unsubscribing and
            # re-subscribing would only open a window in which a new model is missed.
            return "no round announced yet"
        if not ann.deltas:
            return "the aggregator publishes no global deltas"
        if ann.base_hash == held.model_hash:
            return ""  # announced on the model held
        if ann.run > held.run:
            # A new run starts from its own initial model: no delta leads there.
            return f"run {ann.run} supersedes the run {held.run} of the model held"
        if (ann.run, ann.round_id) <= (held.run, held.round_id):
            return ""  # an old announcement
        waited = self.clock() - ann.seen_at
        if waited < self.delta_wait_s:
            return ""
        return (
            f"round {ann.round_id} trains model {ann.base_hash[:12]}, no usable delta "
            f"for it within {self.delta_wait_s:g}s"
        )

    def wants_full(self) -> bool:
        """True while the agent should be subscribed to the full global model."""
        return bool(self.why_full())


class ModelSync:
    """The agent's verified global model, kept current from deltas or full models."""

    def __init__(
        self,
        federation: str,
        public_key: Ed25519PublicKey | None,
        *,
        max_frame_bytes: int,
        delta_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.federation = federation
        self.public_key = public_key
        self.max_frame_bytes = max_frame_bytes
        self.policy = SyncPolicy(delta_wait_s, clock)
        self.model: GlobalModel | None = None
        self.download_bytes = 0  # model and delta payloads received since the last take
        self.deltas_applied = 0

    def take_download_bytes(self) -> int:
        """Bytes downloaded since the previous call (reported in the next update)."""
        n, self.download_bytes = self.download_bytes, 0
        return n

    def on_announcement(
        self, round_id: int, base_hash: str, download_codec: str, run: int = 0
    ) -> None:
        """A round announcement: which model it trains, whether deltas come."""
        self.policy.announced(round_id, base_hash, download_codec != "none", run)

    def on_full_model(self, payload: bytes) -> GlobalModel:
        """Verify and hold a full global model frame; raise FrameError (ModelRejected) if bad."""
        self.download_bytes += len(payload)
        frame = decode_frame(payload, max_bytes=self.max_frame_bytes)
        head = frame.header
        actual = tensors_hash(frame.tensors)
        check_global_model(head, actual, self.federation, self._held(), self.public_key)
        model = GlobalModel(head.round, actual, frame.tensors, frame_run(head))
        self._hold(model)
        log.info(
            "global model of round %d: %s (full model, %d bytes)",
            head.round,
            actual[:12],
            len(payload),
        )
        return model

    def on_delta(self, payload: bytes) -> GlobalModel | None:
        """Apply a global delta to the held model; None when it is not for the held model.

        A delta on another base: an older one is refused (ModelRejected), a newer one means
        a missed round (fall back to the full model). A delta that fails to apply or verify
        raises FrameError and also falls back; the held model is kept either way.
        """
        self.download_bytes += len(payload)
        head = read_header(payload, max_bytes=self.max_frame_bytes)
        if head.kind != DELTA_KIND or head.federation != self.federation:
            raise ModelRejected(f"not a global delta of {self.federation!r}")
        held = self.model
        if held is None:
            log.debug("global delta of round %d ignored: no model to apply it to", head.round)
            return None
        if head.meta.get("model_hash") == held.model_hash:
            return None  # the model it gives is held already (e.g. fetched in full)
        if head.base_hash != held.model_hash:
            refuse_older(frame_run(head), head.round, HeldModel(*_identity(held)))
            why = (
                f"global delta of round {head.round} builds on {head.base_hash[:12]}, "
                f"we hold round {held.round_id} ({held.model_hash[:12]})"
            )
            log.info("%s: fetching the full model", why)
            self.policy.fall_back(why)
            return None
        try:
            model = self._apply(payload, held)
        except FrameError as exc:
            self.policy.fall_back(f"global delta of round {head.round} refused: {exc}")
            raise
        self._hold(model)
        self.deltas_applied += 1
        log.info(
            "global model of round %d: %s (delta, %s, %d bytes)",
            model.round_id,
            model.model_hash[:12],
            head.codec,
            len(payload),
        )
        return model

    def _apply(self, payload: bytes, held: GlobalModel) -> GlobalModel:
        shapes = {n: v.shape for n, v in held.params.items()}
        frame = decode_frame(payload, max_bytes=self.max_frame_bytes, expect_shapes=shapes)
        params = apply_delta(held.params, frame.tensors)
        actual = tensors_hash(params)
        check_global_model(
            frame.header, actual, self.federation, self._held(), self.public_key, kind=DELTA_KIND
        )
        return GlobalModel(frame.header.round, actual, params, frame_run(frame.header))

    def _held(self) -> HeldModel | None:
        m = self.model
        return HeldModel(*_identity(m)) if m is not None else None

    def _hold(self, model: GlobalModel) -> None:
        self.model = model
        self.policy.holds(HeldModel(*_identity(model)))


def _identity(model: GlobalModel) -> tuple[int, str, int]:
    """(round, hash, run): what :class:`HeldModel` keeps of a model."""
    return model.round_id, model.model_hash, model.run
