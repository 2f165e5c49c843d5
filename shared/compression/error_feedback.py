"""Error feedback for biased codecs: what was not sent is sent later.

Top-k drops most of a delta, low-rank most of its directions, the int8 download step a
little. Error feedback (Seide et al. 2014; Stich et al. 2018; DGC) keeps the dropped part as
a *residual* and adds it to the next round's delta, so no
update mass is lost, only delayed. The invariant (mass conservation)::

    sent + new_residual == delta + old_residual        (up to fp32 rounding)

Pure math, used on both sides: the agent keeps its update residual across rounds (persisted by
:mod:`edge_agent.residual`), the aggregator its download residual (``global_delta``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

log = logging.getLogger("fedmq.error_feedback")

Tensors = dict[str, np.ndarray]


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
        """Keep what the encoded update did not carry: ``compensated − sent``.

        ``sent`` is what the encoder says it sent (``EncodedFrame.sent``), which is exactly what
        decoding the frame gives.
        """
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
