"""A live per-round view of a federation, built only from its MQTT topics."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.mqtt.options import ConnectOptions
from shared.mqtt.transport import MqttTransport
from shared.mqtt.versions import AUTO
from shared.protocol import messages as msg
from shared.protocol import topics

# (title, width): one line per round fits a 100-column terminal.
COLUMNS = (
    ("round", 7),
    ("clients", 7),
    ("test", 10),  # accuracy (classification) or "rmse ..." (regression)
    ("test loss", 9),
    ("train loss", 10),
    ("up kB", 8),
    ("down kB", 8),
    ("round s", 7),
    ("train s", 7),
    ("agg ms", 7),
)


class RoundTable:
    """Prints one row per applied round as the aggregator publishes its metrics."""

    def __init__(
        self, url: str, federation: str, rounds_total: int, mqtt_version: str = AUTO
    ) -> None:
        self.topics = topics.Topics(federation)
        self.rounds_total = rounds_total
        self.console = Console(width=max(100, Console().width))
        self.rows: list[msg.RoundMetrics] = []
        self.online: dict[str, str] = {}
        self.transport = MqttTransport(
            url,
            f"monitor-{int(time.time() * 1000) % 10**9}",
            subscriptions=[(self.topics.metrics, 1), (self.topics.agent_status_any, 1)],
            options=ConnectOptions(mqtt_version=mqtt_version),
        )

    def follow(self, until: Callable[[], bool], timeout: float | None = None) -> None:
        """Print rows until ``until()`` is true (checked twice a second)."""
        self.transport.start()
        self._print_header()
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while not until() and (end is None or time.monotonic() < end):
                try:
                    item = self.transport.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._on_message(item.topic, item.payload, item.retain)
            self._drain()
        finally:
            self.transport.stop()

    def _drain(self) -> None:
        while True:
            try:
                item = self.transport.inbox.get_nowait()
            except queue.Empty:
                return
            self._on_message(item.topic, item.payload, item.retain)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if not payload:
            return
        try:
            # Inside the try: anyone can publish a status under a malformed client id on an
            # open broker (`agents/bad id!/status`), and one such topic must not end the demo.
            kind = topics.parse(topic).kind
            if kind == "metrics" and not retain:
                self._print_row(msg.decode(payload, msg.RoundMetrics))
            elif kind == "agent_status":
                status = msg.decode(payload, msg.AgentStatus)
                self.online[status.client_id] = status.state
        except (topics.TopicError, msg.MessageError) as exc:
            self.console.print(f"bad message on {escape(topic)}: {escape(str(exc))}", style="red")

    def _print_header(self) -> None:
        self.console.print(" ".join(f"{c:>{w}}" for c, w in COLUMNS), style="bold")

    def _print_row(self, m: msg.RoundMetrics) -> None:
        self.rows.append(m)
        cells = [
            f"{m.round}/{self.rounds_total}",
            str(m.accepted),
            quality_cell(m),
            _f(m.test_loss),
            _f(m.train_loss),
            f"{m.bytes_up / 1e3:.1f}",
            f"{m.bytes_down / 1e3:.1f}",
            f"{m.round_time_s:.2f}",
            f"{m.slowest_train_s:.2f}",
            f"{m.aggregate_latency_ms:.1f}",
        ]
        self.console.print(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))

    def print_summary(self, summary: dict[str, Any]) -> None:
        """A two-column table of the run's headline figures."""
        table = Table(title="summary", show_header=False)
        for key, value in summary.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        self.console.print(table)


def quality_cell(m: msg.RoundMetrics) -> str:
    """A round's held-out quality: accuracy, or the RMSE of a regression (``-``: none)."""
    if m.task == "regression":
        return "-" if m.test_rmse is None else f"rmse {m.test_rmse:.4g}"
    return _pct(m.test_accuracy)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
