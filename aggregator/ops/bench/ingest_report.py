"""The pure half of ``fedmq bench ingest``: what the aggregator said, and the figures from it.

:class:`IngestEvents` records the aggregator's messages as the bench observed them (receipts,
round announcements, global-model metas and frames), each with its arrival time;
:func:`summarize` turns one run's events into a row, :func:`spread` several rows into
min/median/max, :func:`markdown_table` both into the printed table. No MQTT, no clock, no files.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import messages as msg
from shared.protocol import topics


@dataclass
class IngestEvents:
    """The aggregator's messages of one run, in arrival order, with their arrival times."""

    receipts: list[tuple[float, str, str]] = field(default_factory=list)  # (t, client, code)
    starts: dict[int, msg.RoundStart] = field(default_factory=dict)
    metas: dict[int, float] = field(default_factory=dict)  # round → first meta's arrival
    model: bytes | None = None  # the latest global-model frame

    def record(self, topic: str, payload: bytes, t: float) -> None:
        """Record one message (MessageError/TopicError for one the aggregator cannot send)."""
        parsed = topics.parse(topic)
        if not payload:  # a cleared retained message (a closed round's announcement)
            return
        if parsed.kind == "receipt":
            receipt = msg.decode(payload, msg.Receipt)
            self.receipts.append((t, receipt.client_id, receipt.effective_code()))
        elif parsed.kind == "round_start" and parsed.round_id is not None:
            self.starts[parsed.round_id] = msg.decode(payload, msg.RoundStart)
        elif parsed.kind == "global_meta":
            self.metas.setdefault(msg.decode(payload, msg.GlobalMeta).round, t)
        elif parsed.kind == "global_model":
            self.model = payload

    def answered(self) -> set[str]:
        """The clients that got a receipt."""
        return {client for _, client, _ in self.receipts}


@dataclass(frozen=True)
class RunFacts:
    """What the bench itself knows of one run, beside the aggregator's messages."""

    clients: list[str]
    first_publish: float  # monotonic time of the first update published
    all_published: float  # ... when the broker had acknowledged the last one
    frame_bytes: int
    rss_before_kb: int | None  # aggregator's VmHWM when the round was announced
    rss_peak_kb: int | None  # ... after the new global model was published
    exit_code: int | None


def summarize(
    events: IngestEvents, facts: RunFacts, metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """One run's row: updates counted, ingest rate, latency to the new model, memory.

    ``metrics`` is round 1's entry of the aggregator's metrics.json (None: it wrote none).
    """
    accepted_at = [(t, c) for t, c, code in events.receipts if code == "accepted"]
    per_client = Counter(c for _, c in accepted_at)
    refused = Counter(code for _, _, code in events.receipts if code != "accepted")
    last = max((t for t, _ in accepted_at), default=None)
    ingest_s = last - facts.first_publish if last is not None else None
    meta_at = events.metas.get(1)
    participants = sorted(metrics.get("participants", [])) if metrics else []
    return {
        "updates": len(facts.clients),
        "frame_bytes": facts.frame_bytes,
        "accepted": len(per_client),
        "accepted_twice": sorted(c for c, n in per_client.items() if n > 1),
        "refused": dict(sorted(refused.items())),
        "unanswered": len(set(facts.clients) - events.answered()),
        "counted_once": participants == sorted(facts.clients)
        and max(per_client.values(), default=0) == 1,
        "publish_s": _round(facts.all_published - facts.first_publish, 3),
        "ingest_s": _round(ingest_s, 3),
        "updates_per_s": _round(len(accepted_at) / ingest_s if ingest_s else None, 1),
        "last_accepted_to_model_ms": _round(
            (meta_at - last) * 1000 if meta_at is not None and last is not None else None, 1
        ),
        "aggregator_latency_ms": _round(
            metrics.get("aggregate_latency_ms") if metrics else None, 1
        ),
        "metrics_accepted": metrics.get("accepted") if metrics else None,
        "metrics_rejected": metrics.get("rejected") if metrics else None,
        "rss_before_mb": _mb(facts.rss_before_kb),
        "rss_peak_mb": _mb(facts.rss_peak_kb),
        "exit_code": facts.exit_code,
    }


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """min / median / max of each timing and memory figure over ``rows`` (its missing values
    left out)."""
    keys = ("updates_per_s", "ingest_s", "last_accepted_to_model_ms", "rss_peak_mb")
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        if values:
            out[key] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
    return out


def markdown_table(label: str, rows: list[dict[str, Any]]) -> str:
    """The runs of one configuration as a markdown table, plus min/median/max when several."""
    lines = [
        f"{label}",
        "",
        "| run | accepted | refused | unanswered | updates/s | ingest s | publish s "
        "| last accepted → model ms | aggregator latency ms | RSS before → peak MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(rows, 1):
        refused = ", ".join(f"{k}: {v}" for k, v in r["refused"].items()) or "0"
        lines.append(
            f"| {i} | {r['accepted']}/{r['updates']} | {refused} | {r['unanswered']} "
            f"| {_fmt(r['updates_per_s'])} | {_fmt(r['ingest_s'])} | {_fmt(r['publish_s'])} "
            f"| {_fmt(r['last_accepted_to_model_ms'])} | {_fmt(r['aggregator_latency_ms'])} "
            f"| {_fmt(r['rss_before_mb'])} → {_fmt(r['rss_peak_mb'])} |"
        )
    stats = spread(rows)
    if len(rows) > 1 and stats:
        lines.append("")
        for key, s in stats.items():
            lines.append(f"- {key}: min {s['min']:g}, median {s['median']:g}, max {s['max']:g}")
    return "\n".join(lines) + "\n"


def parse_vm_hwm(status: str) -> int | None:
    """The peak resident set size in kB (``VmHWM``) from a ``/proc/PID/status`` text."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _fmt(value: object) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
