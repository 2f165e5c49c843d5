"""Records of a round's life in the aggregator: announced (open), then applied (closed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregator.intake import UpdateIntake
from aggregator.rounds import RoundState

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class OpenRound:
    """A round that has been announced and is collecting updates."""

    state: RoundState
    intake: UpdateIntake
    started: float


@dataclass(frozen=True)
class ClosedRound:
    """A round that has been applied, waiting to be evaluated and reported."""

    round: OpenRound
    round_time_s: float
    latency_ms: float
    params: Tensors
    model_hash: str
    bytes_down: int
    frame: bytes  # the published global-model frame
    delta_bytes: int = 0  # the published global-delta frame (0: none)
