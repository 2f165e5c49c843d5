"""The device's error-feedback residual, persisted so it survives an agent restart.

The residual (:class:`shared.compression.error_feedback.ErrorFeedback`) lives in an ``.npz``
(no pickle: loaded with ``allow_pickle=False``) written atomically. A residual that does not
match the model's tensor names/shapes, another federation's, or an unreadable file is
discarded with a log line.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shared.compression.error_feedback import ErrorFeedback, arch_key
from shared.files import write_atomic
from shared.protocol.frames import decode_frame

log = logging.getLogger("fedmq.agent.residual")

Tensors = dict[str, np.ndarray]
RESIDUAL_FILE = "residual.npz"
_META_KEY = "__meta__"


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
        meta = {"federation": self.federation, "arch": arch_key(ef.residual)}
        arrays = dict(ef.residual)
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        write_atomic(self.path, lambda fh: np.savez(fh, allow_pickle=False, **arrays))


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

    def commit(self, compensated: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """Keep what the update did not carry.

        ``sent`` is what encoding ``compensated`` sent (``EncodedFrame.sent``): no decode.
        """
        self.ef.update(compensated, sent)
        self._save()

    def give_back(self, payload: bytes) -> None:
        """An update the aggregator refused as late or stale: its mass is owed again.

        Adds what ``payload`` carried back to the residual, so the next update sends it:
        error feedback then conserves mass across lost rounds too.
        """
        sent = decode_frame(payload, max_bytes=len(payload)).tensors
        ef = self.ef
        if ef.residual and set(ef.residual) != set(sent):
            log.warning("not giving back an update of another model layout")
            return
        for name, value in sent.items():
            ef.residual[name] = ef.residual.get(name, np.zeros_like(value)) + value
        self._save()

    def reset(self) -> None:
        """Forget the residual (a new run: what was owed belongs to another model)."""
        self._ef = ErrorFeedback()
        self._save()

    def _save(self) -> None:
        try:
            self.store.save(self.ef)
        except OSError as exc:  # a full or read-only disk must not stop training
            log.warning("could not persist the residual to %s: %s", self.store.path, exc)
