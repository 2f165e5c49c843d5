"""Records of a round's life in the aggregator: announced (open), then applied (closed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from aggregator.async_rounds import VersionWindow
from aggregator.intake import UpdateIntake
from aggregator.round_strategy import StrategyFigures
from aggregator.rounds import RoundState
from aggregator.strategy_config import scheduled_lr
from shared.protocol import messages as msg
from shared.protocol.messages import RoundMetrics

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from shared.runtime.training import EvalResult

Tensors = dict[str, np.ndarray]

log = logging.getLogger("fedmq.aggregator")


def log_latency(
    round_id: int, last_update: float, closed: float, computed: float, published: float
) -> float:
    """Log where the time from a round's last update to its published model went (monotonic
    seconds); return that time in milliseconds."""
    latency_ms = (published - last_update) * 1000
    log.info(
        "round %d: last update → model published %.0f ms (waited in the inbox %.0f, "
        "new model computed %.0f, published and acknowledged by the broker %.0f)",
        round_id,
        latency_ms,
        (closed - last_update) * 1000,
        (computed - closed) * 1000,
        (published - computed) * 1000,
    )
    return latency_ms


def round_start(
    cfg: AggregatorConfig,
    state: RoundState,
    spec: msg.ModelSpec,
    run: int,
    ts: float,
    fingerprint: str = "",
) -> msg.RoundStart:
    """The announcement of ``state``: who trains which model (and its architecture
    ``fingerprint``), how, until when (unsigned).

    ``ts`` is the aggregator's clock now, the one ``state.deadline`` is on: agents count the
    round's time as ``deadline - ts`` on their own clock (edge_agent/announcements.py).
    An asynchronous version window is announced as such, with its staleness bound.
    """
    announcement = msg.RoundStart(
        ts=ts,
        federation=cfg.federation,
        round=state.round_id,
        base_hash=state.base_hash,
        deadline=state.deadline,
        selected=sorted(state.selected),
        model=spec,
        train=msg.TrainParams(
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=scheduled_lr(cfg, state.round_id),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed * 100_003 + state.round_id,
            regression_loss=cfg.regression_loss,  # type: ignore[arg-type]  # checked in cfg
            proximal_mu=cfg.proximal_mu,
        ),
        codec=cfg.codec,
        max_update_bytes=cfg.max_update_bytes,
        download_codec=cfg.download_codec,
        run=run,
        fingerprint=fingerprint,
    )
    if isinstance(state, VersionWindow):
        announcement = msgspec.structs.replace(
            announcement, mode="async", max_staleness=state.max_staleness
        )
    return announcement


def round_decision(
    federation: str, state: RoundState, decision: str, reason: str
) -> msg.RoundDecision:
    """What happened to ``state`` (applied, discarded, extended, retried, failed) and why."""
    return msg.RoundDecision(
        federation=federation,
        round=state.round_id,
        decision=decision,  # type: ignore[arg-type]
        accepted=len(state.accepted),
        min_clients=state.min_clients,
        extensions=state.extensions,
        deadline=state.deadline,
        reason=reason,
    )


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
    strategy: StrategyFigures = field(default_factory=StrategyFigures)

    def metrics(
        self,
        federation: str,
        *,
        codec: str,
        download_codec: str,
        evaluation: EvalResult | None,
        onnx_export_s: float | None,
        task: str = "classification",
    ) -> RoundMetrics:
        """What this round did: one entry of ``metrics.json`` and the metrics topic."""
        state, intake = self.round.state, self.round.intake
        regression = evaluation is not None and evaluation.rmse is not None
        return RoundMetrics(
            federation=federation,
            round=state.round_id,
            participants=sorted(state.accepted),
            accepted=len(state.accepted),
            rejected=len(state.rejected),
            num_samples=state.num_samples,
            train_loss=intake.weighted_train_loss(),
            local_val_accuracy=intake.weighted_val_accuracy(),
            test_accuracy=evaluation.accuracy if evaluation and not regression else None,
            test_loss=evaluation.loss if evaluation else None,
            bytes_up=intake.bytes_received,
            update_bytes=sum(u.nbytes for u in intake.stats),
            bytes_down=self.bytes_down,
            model_bytes=len(self.frame),
            delta_bytes=self.delta_bytes,
            download_codec=download_codec,
            round_time_s=self.round_time_s,
            slowest_train_s=intake.slowest_train_s(),
            aggregate_latency_ms=self.latency_ms,
            codec=codec,
            model_hash=self.model_hash,
            onnx_export_s=onnx_export_s,
            task=task,  # type: ignore[arg-type]  # the spec's
            test_rmse=evaluation.rmse if evaluation else None,
            test_mae=evaluation.mae if evaluation else None,
            local_val_rmse=intake.pooled_val_rmse(),
            clip_bound=self.strategy.clip_bound,
            clipped=self.strategy.clipped,
            dp_epsilon=self.strategy.dp_epsilon,
            dp_delta=self.strategy.dp_delta,
        )
