"""Error feedback for sparse update codecs: what was not sent is sent later.

Top-k drops most of a delta. Error feedback (Seide et al. 2014; Stich et al. 2018; DGC) keeps
the dropped part on the device as a *residual* and adds it to the next round's delta, so no
update mass is lost, only delayed. The invariant (mass conservation)::

    sent + new_residual == delta + old_residual        (up to fp32 rounding)

:class:`ErrorFeedback` is pure math; :class:`ResidualStore` persists the residual so it
survives an agent restart: an ``.npz`` (no pickle: loaded with ``allow_pickle=False``) written
atomically (temporary file, fsync, rename). A residual that does not match the model's
tensor names/shapes, another federation's, or an unreadable file is discarded with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("fedmq.agent.error_feedback")

Tensors = dict[str, np.ndarray]
RESIDUAL_FILE = "residual.npz"
_META_KEY = "__meta__"


def arch_key(tensors: Mapping[str, np.ndarray]) -> list[list[object]]:
    """Names and shapes, in name order: a residual only fits a model with the same key."""
    return [[n, list(np.shape(tensors[n]))] for n in sorted(tensors)]


class ErrorFeedback:
    """The residual of one device, for one model architecture.

    ``momentum`` > 0 adds DGC's momentum correction across rounds (research option, not
    persisted): a velocity ``u ← m·u + delta`` is accumulated instead of ``delta``, and its
    coordinates that were sent are zeroed (momentum factor masking). Then the invariant reads
    ``sent + new_residual == u + old_residual``.
    """

    def __init__(self, residual: Tensors | None = None, momentum: float = 0.0) -> None:
        self.residual: Tensors = dict(residual or {})
        self.momentum = momentum
        self.velocity: Tensors = {}

    def compensate(self, delta: Mapping[str, np.ndarray]) -> Tensors:
        """``delta + residual``; a residual for another architecture is dropped first."""
        if self.residual and arch_key(self.residual) != arch_key(delta):
            log.warning("model architecture changed: error-feedback residual reset")
            self.residual = {}
            self.velocity = {}
        if self.momentum:
            self.velocity = {
                n: (self.momentum * self.velocity[n] + np.asarray(v, np.float32)).astype(np.float32)
                if n in self.velocity
                else np.asarray(v, np.float32).copy()
                for n, v in delta.items()
            }
            delta = self.velocity
        return {
            n: (np.asarray(v, np.float32) + self.residual[n]).astype(np.float32)
            if n in self.residual
            else np.asarray(v, np.float32).copy()
            for n, v in delta.items()
        }

    def update(self, compensated: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """Keep what the encoded update did not carry: ``compensated − decode(encode(...))``."""
        self.residual = {
            n: (np.asarray(compensated[n], np.float32) - np.asarray(sent[n], np.float32)).astype(
                np.float32
            )
            for n in compensated
        }
        for n, u in self.velocity.items():
            u[np.asarray(sent[n]) != 0] = 0.0

    def norm(self) -> float:
        """L2 norm of the residual (for logs)."""
        return float(
            np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in self.residual.values()))
        )


class ResidualStore:
    """The residual file in the agent's state directory."""

    def __init__(self, state_dir: Path, federation: str) -> None:
        self.path = Path(state_dir) / RESIDUAL_FILE
        self.federation = federation

    def load(self) -> ErrorFeedback:
        """The persisted residual, or an empty one (missing, corrupt or foreign file)."""
        if not self.path.exists():
            return ErrorFeedback()
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                meta = json.loads(npz[_META_KEY].tobytes())
                tensors = {n: npz[n].astype(np.float32) for n in npz.files if n != _META_KEY}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            log.warning("residual file %s unreadable (%s): starting from zero", self.path, exc)
            return ErrorFeedback()
        problem = _check(meta, tensors, self.federation)
        if problem:
            log.warning("residual file %s discarded: %s", self.path, problem)
            return ErrorFeedback()
        return ErrorFeedback(tensors)

    def save(self, ef: ErrorFeedback) -> None:
        """Write atomically: a crash leaves either the old file or the new one, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"federation": self.federation, "arch": arch_key(ef.residual)}
        arrays = dict(ef.residual)
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(prefix=".residual-", suffix=".npz", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, allow_pickle=False, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _check(meta: object, tensors: Tensors, federation: str) -> str:
    if not isinstance(meta, dict):
        return "metadata is not an object"
    if meta.get("federation") != federation:
        return f"it belongs to federation {meta.get('federation')!r}"
    if meta.get("arch") != arch_key(tensors):
        return "tensor names/shapes do not match its metadata"
    if not all(np.isfinite(v).all() for v in tensors.values()):
        return "non-finite values"
    return ""


class DeviceFeedback:
    """The agent's error-feedback state: loaded lazily, saved after every encoded update."""

    def __init__(self, state_dir: Path, federation: str) -> None:
        self.store = ResidualStore(state_dir, federation)
        self._ef: ErrorFeedback | None = None

    @property
    def ef(self) -> ErrorFeedback:
        """The residual, read from disk on first use."""
        if self._ef is None:
            self._ef = self.store.load()
        return self._ef

    def compensate(self, delta: Mapping[str, np.ndarray]) -> Tensors:
        """This round's delta plus everything earlier rounds did not send."""
        return self.ef.compensate(delta)

    def commit(self, compensated: Mapping[str, np.ndarray], payload: bytes) -> None:
        """Keep what ``payload`` (the encoded frame of ``compensated``) does not carry."""
        from shared.codec import decode_frame

        sent = decode_frame(payload, max_bytes=len(payload)).tensors
        self.ef.update(compensated, sent)
        self._save()

    def give_back(self, payload: bytes) -> None:
        """An update the aggregator refused as late or stale: its mass is owed again.

        Adds what ``payload`` carried back to the residual, so the next update sends it:
        error feedback then conserves mass across lost rounds too.
        """
        from shared.codec import decode_frame

        sent = decode_frame(payload, max_bytes=len(payload)).tensors
        ef = self.ef
        if ef.residual and set(ef.residual) != set(sent):
            log.warning("not giving back an update of another model layout")
            return
        for name, value in sent.items():
            ef.residual[name] = ef.residual.get(name, np.zeros_like(value)) + value
        self._save()

    def _save(self) -> None:
        try:
            self.store.save(self.ef)
        except OSError as exc:  # a full or read-only disk must not stop training
            log.warning("could not persist the residual to %s: %s", self.store.path, exc)
