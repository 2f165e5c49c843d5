"""The pure half of ``fedmq bench sites``: what the central broker saw, per layout and round.

:class:`SitesEvents` is :class:`~aggregator.ops.bench.fleet_report.FleetEvents` (announcements,
metas, ``$SYS`` counters) plus the payloads of device updates and site partials the bench's
observer received on the central broker. :func:`layout_rows` joins them with the central
aggregator's ``metrics.json`` into one row per round; :func:`compare` puts the flat and the
sites layout side by side (WAN bytes, accuracy, round time) and :func:`summary` gives the
ratio and the largest accuracy difference. No MQTT, no processes here.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.ops.bench.fleet_report import FleetEvents, _delta
from shared.protocol import messages as msg
from shared.protocol import topics

LAYOUTS = ("flat", "sites")
# What the central aggregator publishes (models, announcements, decisions, receipts, metrics,
# its status): received by the central broker in both layouts, WAN traffic in neither when the
# aggregator runs beside its broker.
CENTRAL_KINDS = frozenset(
    {
        "aggregator_status", "global_meta", "global_model", "global_delta", "global_onnx",
        "metrics", "round_start", "decision", "receipt", "site_receipt",
    }
)  # fmt: skip


@dataclass
class SitesEvents(FleetEvents):
    """One layout's observations on the central broker, in arrival order."""

    # round → (sender, payload bytes) of every non-empty message, chunks included
    update_bytes: dict[int, list[tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    partial_bytes: dict[int, list[tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # round → sender of each whole partial message (not its chunks): re-sends show here
    partials: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    site_status: dict[str, msg.SiteStatus] = field(default_factory=dict)
    central_bytes: list[tuple[float, int]] = field(default_factory=list)  # t, payload bytes
    devices_online: set[str] = field(default_factory=set)  # on the central broker (flat)
    site_receipts: list[tuple[int, str, str]] = field(default_factory=list)  # round, site, code

    def record(self, topic: str, payload: bytes, t: float) -> None:
        """One message seen on the central broker at wall time ``t``."""
        chunk = topics.split_chunk_topic(topic)
        base = chunk[0] if chunk else topic
        try:
            parsed = topics.parse(base) if not topic.startswith("$SYS/") else None
        except topics.TopicError:
            return
        if parsed is not None and parsed.round_id is not None and payload:
            if parsed.kind == "update" and parsed.client_id:
                self.update_bytes[parsed.round_id].append((parsed.client_id, len(payload)))
                return
            if parsed.kind == "site_partial" and parsed.site:
                self.partial_bytes[parsed.round_id].append((parsed.site, len(payload)))
                if chunk is None:
                    self.partials[parsed.round_id].append(parsed.site)
                return
        if parsed is not None and parsed.kind in CENTRAL_KINDS:
            self.central_bytes.append((t, len(payload)))
        if parsed is not None and parsed.kind == "site_receipt" and parsed.site and payload:
            receipt = msg.decode(payload, msg.Receipt)
            self.site_receipts.append((receipt.round, parsed.site, receipt.effective_code()))
            return
        if parsed is not None and parsed.kind == "site_status" and payload:
            status = msg.decode(payload, msg.SiteStatus)
            self.site_status[status.site] = status
            return
        if parsed is not None and parsed.kind == "agent_status" and parsed.client_id:
            online = bool(payload) and msg.decode(payload, msg.AgentStatus).state != "offline"
            (self.devices_online.add if online else self.devices_online.discard)(parsed.client_id)
            return
        if chunk is None:
            super().record(topic, payload, t)

    def ready(self, sites: dict[str, list[str]], flat: bool) -> bool:
        """Whether every device is online: on the central broker (``flat``), or as every
        site's aggregator counts them."""
        if flat:
            return self.devices_online >= {c for ids in sites.values() for c in ids}
        return all(
            (s := self.site_status.get(name)) is not None
            and s.state == "online"
            and s.devices >= len(ids)
            for name, ids in sites.items()
        )


def layout_rows(
    layout: str, events: SitesEvents, metrics: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per round the central aggregator announced or applied."""
    by_round = {m["round"]: m for m in metrics if isinstance(m.get("round"), int)}
    rows = []
    for r in sorted(set(events.starts) | set(by_round)):
        m = by_round.get(r, {})
        ann = events.starts.get(r)
        nxt = events.starts.get(r + 1)
        # From the round's announcement to the next one's (the last round: to the run's end),
        # so the model download of a round counts with it; $SYS ticks every second.
        wan = (
            _delta(events, "bytes_in", ann.published, nxt.published if nxt else math.inf)
            if ann is not None
            else None
        )
        start, end = (ann.published, nxt.published if nxt else math.inf) if ann else (0, 0)
        central = sum(b for t, b in events.central_bytes if start <= t < end)
        participants = list(m.get("participants", []))
        updates, partials = events.update_bytes.get(r, []), events.partial_bytes.get(r, [])
        rows.append(
            {
                "layout": layout,
                "round": r,
                "applied": bool(m),
                "participants": len(participants),
                "participants_unique": len(participants) == len(set(participants)),
                "num_samples": m.get("num_samples"),
                "test_accuracy": m.get("test_accuracy"),
                "round_time_s": m.get("round_time_s"),
                "wan_bytes": None if wan is None else int(wan),
                "central_publish_bytes": central,
                "update_payload_bytes": sum(b for _, b in updates),
                "updates_on_central": len({c for c, _ in updates}),
                "partial_payload_bytes": sum(b for _, b in partials),
                "partials": len(events.partials.get(r, [])),
                "partial_sites": len(set(events.partials.get(r, []))),
            }
        )
    return rows


def compare(flat: list[dict[str, Any]], sites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: both layouts' WAN bytes, payload bytes, accuracy and round time, and the
    accuracy difference sites − flat in percentage points."""
    f_by, s_by = {r["round"]: r for r in flat}, {r["round"]: r for r in sites}
    out = []
    for r in sorted(set(f_by) | set(s_by)):
        f, s = f_by.get(r, {}), s_by.get(r, {})
        fa, sa = f.get("test_accuracy"), s.get("test_accuracy")
        out.append(
            {
                "round": r,
                "flat_wan_bytes": f.get("wan_bytes"),
                "sites_wan_bytes": s.get("wan_bytes"),
                "flat_central_publish_bytes": f.get("central_publish_bytes"),
                "sites_central_publish_bytes": s.get("central_publish_bytes"),
                "flat_update_bytes": f.get("update_payload_bytes"),
                "sites_partial_bytes": s.get("partial_payload_bytes"),
                "sites_partials": s.get("partials"),
                "flat_accuracy": fa,
                "sites_accuracy": sa,
                "accuracy_diff_pts": None
                if fa is None or sa is None
                else round((sa - fa) * 100, 3),
                "flat_round_s": _r(f.get("round_time_s")),
                "sites_round_s": _r(s.get("round_time_s")),
            }
        )
    return out


def summary(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The WAN-bytes ratio flat/sites (means per round), the payload ratio, the largest
    |accuracy difference| in points, and the mean round times."""

    def mean(key: str) -> float | None:
        values = [row[key] for row in table if row.get(key) is not None]
        return statistics.fmean(values) if values else None

    diffs = [abs(row["accuracy_diff_pts"]) for row in table if row["accuracy_diff_pts"] is not None]
    return {
        "flat_wan_bytes_per_round": _r(mean("flat_wan_bytes"), 0),
        "sites_wan_bytes_per_round": _r(mean("sites_wan_bytes"), 0),
        "wan_ratio": _ratio(mean("flat_wan_bytes"), mean("sites_wan_bytes")),
        "payload_ratio": _ratio(mean("flat_update_bytes"), mean("sites_partial_bytes")),
        # The $SYS figure less the central aggregator's own payloads: what came from outside.
        "wan_ratio_without_central_publishes": _ratio(
            _less(mean("flat_wan_bytes"), mean("flat_central_publish_bytes")),
            _less(mean("sites_wan_bytes"), mean("sites_central_publish_bytes")),
        ),
        "max_abs_accuracy_diff_pts": round(max(diffs), 3) if diffs else None,
        "flat_round_s_mean": _r(mean("flat_round_s")),
        "sites_round_s_mean": _r(mean("sites_round_s")),
    }


def _less(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


COLUMNS = [
    ("round", "round"),
    ("flat_wan_bytes", "flat WAN B"),
    ("sites_wan_bytes", "sites WAN B"),
    ("flat_update_bytes", "flat updates B"),
    ("sites_partial_bytes", "sites partials B"),
    ("sites_partials", "partials"),
    ("flat_accuracy", "flat acc"),
    ("sites_accuracy", "sites acc"),
    ("accuracy_diff_pts", "Δ acc (pts)"),
    ("flat_round_s", "flat round s"),
    ("sites_round_s", "sites round s"),
]


def markdown_table(table: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    """The per-round comparison as a Markdown table, the summary below it."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(k, row.get(k)) for k, _ in COLUMNS) + " |" for row in table]
    lines = [head, rule, *body, ""]
    lines.append(
        f"WAN bytes per round: flat {_cell('', summ['flat_wan_bytes_per_round'])}, sites "
        f"{_cell('', summ['sites_wan_bytes_per_round'])}: ratio {summ['wan_ratio']} "
        f"({summ['wan_ratio_without_central_publishes']} without the central aggregator's own "
        f"publishes; update/partial payloads: {summ['payload_ratio']}); max |Δ accuracy| "
        f"{summ['max_abs_accuracy_diff_pts']} points; mean round s: flat "
        f"{summ['flat_round_s_mean']}, sites {summ['sites_round_s_mean']}"
    )
    return "\n".join(lines)


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key.endswith("accuracy") and isinstance(v, float):
        return f"{v * 100:.2f} %"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 100:
        v = int(v)
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def plot(table: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy per round of both layouts, and WAN bytes per round (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, wan_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, marker in zip(LAYOUTS, ("o", "s"), strict=True):
        acc = [(r["round"], r[f"{layout}_accuracy"]) for r in table if r[f"{layout}_accuracy"]]
        acc_ax.plot([x for x, _ in acc], [y * 100 for _, y in acc], marker=marker, label=layout)
        wan = [(r["round"], r[f"{layout}_wan_bytes"]) for r in table if r[f"{layout}_wan_bytes"]]
        wan_ax.plot([x for x, _ in wan], [y for _, y in wan], marker=marker, label=layout)
    acc_ax.set_title("test accuracy (%)", fontsize=10)
    wan_ax.set_title("central broker bytes received per round (WAN)", fontsize=10)
    wan_ax.set_yscale("log")
    for ax in (acc_ax, wan_ax):
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
