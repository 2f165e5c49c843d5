"""After a round is applied: held-out evaluation, ONNX export and the round's metrics.

The service reports a round once the next one is open, so evaluation overlaps with the
agents' training instead of adding to every round. The metrics go to the metrics topic
(retained), the metrics file (:class:`~aggregator.metrics_log.MetricsLog`) and the log.
"""

from __future__ import annotations

import logging

import msgspec

from aggregator.async_rounds import VersionWindow
from aggregator.config import AggregatorConfig
from aggregator.downloads import Publish
from aggregator.evaluation import Evaluator
from aggregator.metrics_log import MetricsLog
from aggregator.onnx_export import RoundExporter
from aggregator.round_records import ClosedRound
from shared.protocol import messages as msg

log = logging.getLogger("fedmq.aggregator")


class RoundReporter:
    """Evaluates, exports and records each applied round."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        spec: msg.ModelSpec,
        evaluator: Evaluator,
        exporter: RoundExporter,
        metrics: MetricsLog,
        publish: Publish,
        metrics_topic: str,
    ) -> None:
        self.cfg, self.spec = cfg, spec
        self.evaluator, self.exporter, self.metrics = evaluator, exporter, metrics
        self.publish, self.metrics_topic = publish, metrics_topic

    def report(self, closed: ClosedRound) -> None:
        """Evaluate ``closed``'s model, export it, publish and log its metrics."""
        state = closed.round.state
        evaluation = self.evaluator.evaluate(closed.params)
        exported = self.exporter.after_round(
            closed.params, state.round_id, self.publish, closed.frame
        )
        metrics = closed.metrics(
            self.cfg.federation,
            codec=self.cfg.codec,
            download_codec=self.cfg.download_codec,
            evaluation=evaluation,
            onnx_export_s=exported.export_s if exported else None,
            task=self.spec.task,
        )
        if isinstance(state, VersionWindow):
            metrics = msgspec.structs.replace(
                metrics, mode="async", staleness=list(state.staleness)
            )
        self.publish(self.metrics_topic, metrics.to_json(), retain=True)
        self.metrics.append(metrics)
        quality = (
            f"rmse={metrics.test_rmse}"
            if metrics.task == "regression"
            else f"acc={metrics.test_accuracy}"
        )
        log.info(
            "round %d applied: %d updates, %s, %.1fs",
            state.round_id,
            metrics.accepted,
            quality,
            metrics.round_time_s,
        )
