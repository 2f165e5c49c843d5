"""The pure half of ``fedmq bench fleet``: events in, one row per (fleet size, round) out.

:class:`FleetEvents` holds what one run observed: the aggregator's announcements, receipts and
global-model metas as the bench's observer received them, the broker's ``$SYS`` counters, and
the agents' own events (``fleet_agents``: trainings, sends, receipts). :func:`round_rows`
turns them, with the aggregator's ``metrics.json``, into the rows of ``fleet.json``;
:func:`markdown_table` and :func:`plot` show how each figure grows with the fleet. Every time
is a wall-clock time of this one machine. No MQTT, no processes here.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol import messages as msg
from shared.protocol import topics

# The broker's $SYS counters the bench follows (Mosquitto publishes them every sys_interval).
SYS_COUNTERS = {
    "$SYS/broker/bytes/received": "bytes_in",
    "$SYS/broker/bytes/sent": "bytes_out",
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/clients/connected": "connected",
}


@dataclass
class Announcement:
    round: int
    published: float  # the aggregator's ts (its clock: this machine's)
    received: float
    selected: int
    payload_bytes: int
    parse_ms: float  # one agent's cost to decode and validate it (best of 5)


@dataclass
class FleetEvents:
    """One run's observations, in arrival order."""

    starts: dict[int, Announcement] = field(default_factory=dict)  # round → first announcement
    metas: dict[int, float] = field(default_factory=dict)  # round → the new model's meta arrived
    receipts: list[tuple[float, int, str, str]] = field(default_factory=list)  # t, round, id, code
    sys: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    samples: list[tuple[float, str, float]] = field(default_factory=list)  # t, what, value

    def record(self, topic: str, payload: bytes, t: float) -> None:
        """One message of the aggregator or the broker, received at wall time ``t``."""
        if topic in SYS_COUNTERS:
            with contextlib.suppress(ValueError):  # not a number: not a counter we know
                self.sys[SYS_COUNTERS[topic]].append((t, float(payload)))
            return
        if not payload:  # a cleared retained message
            return
        parsed = topics.parse(topic)
        if parsed.kind == "receipt":
            r = msg.decode(payload, msg.Receipt)
            self.receipts.append((t, r.round, r.client_id, r.effective_code()))
        elif parsed.kind == "round_start" and parsed.round_id is not None:
            if parsed.round_id not in self.starts:
                ann = msg.decode(payload, msg.RoundStart)
                self.starts[parsed.round_id] = Announcement(
                    parsed.round_id, ann.ts, t, len(ann.selected), len(payload), _parse_ms(payload)
                )
        elif parsed.kind == "global_meta":
            self.metas.setdefault(msg.decode(payload, msg.GlobalMeta).round, t)

    def sample(self, t: float, what: str, value: float) -> None:
        """A measurement of a process (peak RSS in MB, CPU seconds) at wall time ``t``."""
        self.samples.append((t, what, value))

    def counter_at(self, name: str, t: float) -> float | None:
        """The last value of $SYS counter ``name`` received at or before ``t``."""
        values = [v for at, v in self.sys.get(name, []) if at <= t]
        return values[-1] if values else None

    def sample_at(self, what: str, t: float) -> float | None:
        """The last sample of ``what`` taken at or before ``t``."""
        values = [v for at, w, v in self.samples if w == what and at <= t]
        return values[-1] if values else None


def _parse_ms(payload: bytes) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        msg.decode(payload, msg.RoundStart)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def round_rows(
    n: int,
    events: FleetEvents,
    agent_events: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per round of a fleet of ``n``: see docs/scaling.md for each column."""
    by_round = {m["round"]: m for m in metrics if isinstance(m, dict) and "round" in m}
    rows = []
    for r in sorted(events.starts):
        ann = events.starts[r]
        meta_at = events.metas.get(r)
        m = by_round.get(r, {})
        end = meta_at if meta_at is not None else float("inf")
        # The broker's traffic of a round: from its announcement to the next one's (the last
        # round: to the end of the run), so the model download is counted with its round.
        nxt = events.starts.get(r + 1)
        cycle_end = nxt.published if nxt is not None else float("inf")
        trains = [
            e for e in agent_events if e["ev"] == "train" and ann.published <= e["asked"] < end
        ]
        sends = [e for e in agent_events if e["ev"] == "send" and e["round"] == r]
        got = [e for e in agent_events if e["ev"] == "receipt" and e["round"] == r]
        accepted = [(t, c) for t, rr, c, code in events.receipts if rr == r and code == "accepted"]
        per_client = Counter(c for _, c in accepted)
        participants = m.get("participants", [])
        sent_by = {e["client"] for e in sends}
        answered = {e["client"] for e in got}
        # Late: the receipt reached the agent only after the next round was announced.
        late = {e["client"] for e in got if e["t"] > cycle_end}
        first_send: dict[str, float] = {}
        for e in sends:
            first_send.setdefault(e["client"], e["t"])
        waits = sorted(e["t"] - first_send[e["client"]] for e in got if e["client"] in first_send)
        # Done: after a slow device's own extra time (events of older runs: the training's end).
        span = max((e.get("done", e["end"]) for e in trains), default=None)
        round_s = meta_at - ann.published if meta_at is not None else None
        train_span_s = span - ann.published if span is not None else None
        row: dict[str, Any] = {
            "agents": n,
            "round": r,
            "selected": ann.selected,
            "accepted": m.get("accepted", len(per_client)),
            "counted_once": bool(participants)
            and len(participants) == len(set(participants)) == len(per_client)
            and set(participants) == set(per_client)
            and all(k == 1 for k in per_client.values()),
            "round_s": _r(round_s, 2),
            "slowest_train_s": _r(max((e["end"] - e["start"] for e in trains), default=None), 3),
            "train_span_s": _r(train_span_s, 2),
            "overhead_s": _r(
                round_s - train_span_s
                if round_s is not None and train_span_s is not None
                else None,
                2,
            ),
            "last_update_to_model_ms": _r(m.get("aggregate_latency_ms"), 1),
            "updates_per_s": _rate(accepted),
            "agg_cpu_ms_per_update": _cpu_per_update(events, ann.published, end, len(per_client)),
            "broker_cpu_s": _cpu_between(events, "broker_cpu_s", ann.published, cycle_end),
            "agg_rss_mb": _r(events.sample_at("agg_rss_mb", end), 1),
            "broker_rss_mb": _r(events.sample_at("broker_rss_mb", end), 1),
            "agents_rss_mb": _r(events.sample_at("agents_rss_mb", end), 1),
            "broker_mb_in": _delta_mb(events, "bytes_in", ann.published, cycle_end),
            "broker_mb_out": _delta_mb(events, "bytes_out", ann.published, cycle_end),
            "broker_dropped": _delta(events, "dropped", ann.published, cycle_end),
            "update_bytes": m.get("update_bytes"),
            "announce_bytes": ann.payload_bytes,
            "announce_parse_ms": round(ann.parse_ms, 3),
            "resends": len(sends) - len(sent_by),
            "receipts_lost": len(sent_by - answered),
            "receipt_wait_median_ms": _r(statistics.median(waits) * 1000, 1) if waits else None,
            "receipt_wait_max_ms": _r(waits[-1] * 1000, 1) if waits else None,
            "receipts_late": len(late),
            "test_accuracy": m.get("test_accuracy"),
        }
        rows.append(row)
    return rows


def run_summary(
    n: int, events: FleetEvents, agent_events: list[dict[str, Any]], exit_code: int | None
) -> dict[str, Any]:
    """Per fleet size: agents that ran to the end, reconnects, the aggregator's exit code, and
    the broker's traffic per round averaged over the run (first announcement to the end)."""
    ended = [e for e in agent_events if e["ev"] == "agent"]
    first = min((a.published for a in events.starts.values()), default=None)
    rounds = max(1, len(events.starts))
    per_round: dict[str, float | None] = {}
    for name in ("in", "out"):
        d = None if first is None else _delta(events, f"bytes_{name}", first, float("inf"))
        per_round[f"broker_mb_{name}_per_round"] = None if d is None else round(d / 1e6 / rounds, 2)
    return {
        **per_round,
        "agents": n,
        "agents_ended": len(ended),
        "agents_failed": sum(1 for e in ended if e["exit_code"] != 0),
        # connects beyond the first one, summed over the fleet
        "reconnects": sum(max(0, e["connects"] - 1) for e in ended),
        "aggregator_exit": exit_code,
    }


def counted_once_async(events: FleetEvents, metrics: list[dict[str, Any]]) -> bool:
    """Async mode (FedBuff): a window counts updates trained on earlier versions, and each
    receipt names the round its update was trained on, so a window's participants cannot be
    matched with one round's receipts. Over the whole run instead: no update (device, round)
    accepted twice, and the windows' participants are exactly the accepted receipts' devices,
    as many times each."""
    accepted = [(rr, c) for _, rr, c, code in events.receipts if code == "accepted"]
    participants = Counter(c for m in metrics for c in m.get("participants", []))
    return (
        bool(accepted)
        and len(accepted) == len(set(accepted))
        and participants == Counter(c for _, c in accepted)
    )


def heterogeneity_summary(agent_events: list[dict[str, Any]]) -> dict[str, Any]:
    """How heterogeneous the fleet was, from each agent's own ``agent`` event (its config's
    slowdown and on-line fraction, the off-line spells it went through): slow agents,
    part-time agents and their off-line spells summed. Older event files lack the fields."""
    ended = [e for e in agent_events if e["ev"] == "agent"]
    return {
        "agents_slow": sum(1 for e in ended if e.get("slowdown", 1.0) > 1),
        "agents_part_time": sum(1 for e in ended if e.get("online", 1.0) < 1),
        "offline_spells": sum(e.get("offline_spells", 0) for e in ended),
        "rounds_trained": sum(e.get("rounds_trained", 0) for e in ended),
    }


def settings_line(settings: dict[str, Any]) -> str:
    """The fleet's mode and heterogeneity in one line above the table."""
    return "settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def _rate(accepted: list[tuple[float, str]]) -> float | None:
    """Accepted updates per second while they arrived (bound by how fast agents send)."""
    if len(accepted) < 2:
        return None
    times = sorted(t for t, _ in accepted)
    return round((len(times) - 1) / max(times[-1] - times[0], 1e-6), 1)


def _cpu_per_update(events: FleetEvents, start: float, end: float, updates: int) -> float | None:
    """The aggregator's CPU time from the announcement to the new model, per update counted."""
    cpu = _cpu_between(events, "agg_cpu_s", start, end)
    return None if cpu is None or updates == 0 else round(cpu * 1000 / updates, 3)


def _cpu_between(events: FleetEvents, what: str, start: float, end: float) -> float | None:
    """CPU seconds a process used between two times (its samples, 0.2 s apart)."""
    a, b = events.sample_at(what, start), events.sample_at(what, end)
    return None if a is None or b is None else round(b - a, 3)


def _delta(events: FleetEvents, name: str, start: float, end: float) -> float | None:
    """The growth of $SYS counter ``name`` from ``start`` to ``end``: to within the broker's
    one-second $SYS interval, so only rounds of several seconds are measured well (the run's
    average per round, :func:`run_summary`, holds for short ones too)."""
    a, b = events.counter_at(name, start), events.counter_at(name, end)
    return None if a is None or b is None else b - a


def _delta_mb(events: FleetEvents, name: str, start: float, end: float) -> float | None:
    d = _delta(events, name, start, end)
    return None if d is None else round(d / 1e6, 2)


COLUMNS = [
    ("agents", "N"),
    ("round", "round"),
    ("accepted", "accepted"),
    ("round_s", "round s"),
    ("slowest_train_s", "slowest train s"),
    ("train_span_s", "all trained s"),
    ("overhead_s", "overhead s"),
    ("last_update_to_model_ms", "last update → model ms"),
    ("agg_cpu_ms_per_update", "agg CPU ms/update"),
    ("agg_rss_mb", "agg RSS MB"),
    ("broker_rss_mb", "broker RSS MB"),
    ("broker_cpu_s", "broker CPU s"),
    ("broker_mb_in_per_round", "broker MB in/round"),
    ("broker_mb_out_per_round", "broker MB out/round"),
    ("announce_bytes", "announce B"),
    ("receipts_lost", "receipts lost"),
    ("receipt_wait_max_ms", "receipt wait max ms"),
    ("resends", "re-sends"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the columns of docs/scaling.md)."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


PLOTTED = [
    ("overhead_s", "round overhead (s)"),
    ("last_update_to_model_ms", "last update → model (ms)"),
    ("agg_cpu_ms_per_update", "aggregator CPU per update (ms)"),
    ("agg_rss_mb", "aggregator peak RSS (MB)"),
    ("broker_rss_mb", "broker peak RSS (MB)"),
    ("broker_mb_out_per_round", "broker bytes out per round (MB)"),
]


def medians_by_size(rows: list[dict[str, Any]]) -> dict[int, dict[str, float | None]]:
    """Per fleet size, the median over its rounds of each plotted figure."""
    return {n: {k: v[1] for k, v in spread.items()} for n, spread in spread_by_size(rows).items()}


def spread_by_size(
    rows: list[dict[str, Any]],
) -> dict[int, dict[str, tuple[float, float, float] | tuple[None, None, None]]]:
    """Per fleet size, (min, median, max) over its rounds of each plotted figure."""
    out: dict[int, dict[str, tuple[float, float, float] | tuple[None, None, None]]] = {}
    for n in sorted({row["agents"] for row in rows}):
        mine = [row for row in rows if row["agents"] == n]
        out[n] = {}
        for key, _ in PLOTTED:
            values = [row[key] for row in mine if row.get(key) is not None]
            out[n][key] = (
                (min(values), statistics.median(values), max(values))
                if values
                else (None, None, None)
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per figure against the fleet size (log scale): the median of the rounds,
    bars from the smallest to the largest; every axis starts at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = spread_by_size(rows)
    sizes = sorted(spread)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, PLOTTED, strict=True):
        known = [(n, spread[n][key]) for n in sizes if spread[n][key][1] is not None]
        xs = [n for n, _ in known]
        lo = [float(m) - float(a) for _, (a, m, _b) in known]  # type: ignore[arg-type]
        hi = [float(b) - float(m) for _, (_a, m, b) in known]  # type: ignore[arg-type]
        ax.errorbar(xs, [m for _, (_a, m, _b) in known], yerr=[lo, hi], marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("simulated devices")
        ax.grid(True, alpha=0.3)
    fig.suptitle("fedmq bench fleet: median over rounds (bars: min to max), per fleet size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
