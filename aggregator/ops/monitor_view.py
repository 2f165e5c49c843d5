"""``fedmq monitor``: a live terminal view of a federation, built only from its MQTT topics.

:class:`MonitorState` is pure (``apply(topic, payload, retain, now)``; no MQTT, no clock), so
it is tested from recorded messages; :func:`render` turns it into rich renderables; and
:func:`run_monitor` is the thin shell that wires a transport to a ``rich.live.Live``.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared.mqtt.base import Inbound, TransportError
from shared.mqtt.options import ConnectOptions, add_plaintext_argument
from shared.mqtt.versions import AUTO, MQTT_VERSIONS, check_mqtt_version
from shared.protocol import messages as msg
from shared.protocol import topics
from shared.protocol.onnx_frame import OnnxFrameError, decode_onnx_frame
from shared.settings import load_settings

HISTORY_ROWS = 12


@dataclass
class AgentView:
    """What the monitor knows about one agent."""

    state: str
    round: int
    num_samples: int
    seen_at: float


@dataclass
class RoundView:
    """The announced round and the receipts seen for it."""

    round: int
    deadline: float
    selected: list[str]
    codec: str
    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, msg.Receipt] = field(default_factory=dict)  # client → last refusal
    closed: bool = False


@dataclass
class SiteView:
    """What the monitor knows about one site (docs/sites.md): its aggregator's status, its
    bridge, and the central aggregator's answer to its latest partial."""

    state: str = "unknown"
    devices: int = 0
    num_samples: int = 0
    open_round: int = -1
    updates: int = 0
    bridge: str = "?"
    partial_round: int = -1
    partial: str = ""  # the receipt code of the latest answered partial


@dataclass
class MonitorState:
    """Everything the view shows, updated one MQTT message at a time."""

    federation: str
    aggregator: str = "unknown"
    rounds_total: int = 0
    current: RoundView | None = None
    receipts_accepted: int = 0
    receipts_rejected: int = 0
    agents: dict[str, AgentView] = field(default_factory=dict)
    sites: dict[str, SiteView] = field(default_factory=dict)
    history: list[msg.RoundMetrics] = field(default_factory=list)
    global_round: int = -1
    global_hash: str = ""
    global_bytes: int = 0
    onnx_round: int = -1
    onnx_bytes: int = 0
    problems: deque[str] = field(default_factory=lambda: deque(maxlen=5))

    def apply(self, topic: str, payload: bytes, retain: bool, now: float = 0.0) -> None:
        """Fold one message into the state; a bad message is recorded, never raised."""
        try:
            parsed = topics.parse(topic)
            if parsed.federation != self.federation:
                return
            self._apply(parsed, payload, retain, now)
        except (topics.TopicError, msg.MessageError, OnnxFrameError) as exc:
            self.problems.append(f"{topic}: {exc}")

    def _apply(self, parsed: topics.ParsedTopic, payload: bytes, retain: bool, now: float) -> None:
        kind = parsed.kind
        if kind == "round_start":
            self._on_round_start(parsed.round_id, payload)
        elif not payload:
            if kind == "agent_status" and parsed.client_id:
                self.agents.pop(parsed.client_id, None)
        elif kind == "aggregator_status":
            status = msg.decode(payload, msg.AggregatorStatus)
            self.aggregator, self.rounds_total = status.state, status.rounds_total
        elif kind == "agent_status":
            a = msg.decode(payload, msg.AgentStatus)
            self.agents[a.client_id] = AgentView(a.state, a.round, a.num_samples, a.ts or now)
        elif kind == "receipt":
            self._on_receipt(msg.decode(payload, msg.Receipt))
        elif kind.startswith("site_") and parsed.site:
            self._on_site(kind, parsed, payload)
        elif kind == "metrics":
            self._on_metrics(msg.decode(payload, msg.RoundMetrics))
        elif kind == "global_meta":
            meta = msg.decode(payload, msg.GlobalMeta)
            self.global_round, self.global_hash = meta.round, meta.model_hash
            self.global_bytes = meta.nbytes
        elif kind == "global_onnx":
            frame = decode_onnx_frame(payload, federation=self.federation)
            self.onnx_round, self.onnx_bytes = frame.header.round, len(frame.onnx)

    def _on_round_start(self, round_id: int | None, payload: bytes) -> None:
        if not payload:  # the aggregator clears the announcement when the round closes
            if self.current is not None and self.current.round == round_id:
                self.current.closed = True
            return
        ann = msg.decode(payload, msg.RoundStart)
        if self.current is not None and self.current.round == ann.round:
            # A re-announcement (deadline extended): keep the receipts seen so far.
            self.current.deadline, self.current.selected = ann.deadline, list(ann.selected)
            return
        self.current = RoundView(ann.round, ann.deadline, list(ann.selected), ann.codec)

    def _on_site(self, kind: str, parsed: topics.ParsedTopic, payload: bytes) -> None:
        assert parsed.site is not None
        view = self.sites.setdefault(parsed.site, SiteView())
        if kind == "site_status":
            st = msg.decode(payload, msg.SiteStatus)
            view.state, view.devices, view.num_samples = st.state, st.devices, st.num_samples
            view.open_round, view.updates = st.open_round, st.updates
        elif kind == "site_bridge":
            view.bridge = {b"1": "up", b"0": "down"}.get(payload, "?")
        elif kind == "site_receipt" and parsed.round_id is not None:
            receipt = msg.decode(payload, msg.Receipt)
            if parsed.round_id >= view.partial_round:
                view.partial_round, view.partial = parsed.round_id, receipt.effective_code()

    def _on_receipt(self, receipt: msg.Receipt) -> None:
        if receipt.status == "accepted":
            self.receipts_accepted += 1
        else:
            self.receipts_rejected += 1
        cur = self.current
        if cur is None or cur.round != receipt.round:
            return
        if receipt.status == "accepted":
            cur.accepted.add(receipt.client_id)
        else:
            cur.rejected[receipt.client_id] = receipt

    def _on_metrics(self, m: msg.RoundMetrics) -> None:
        if self.history and self.history[-1].round >= m.round:
            self.history = [h for h in self.history if h.round != m.round]
        self.history.append(m)
        self.history.sort(key=lambda h: h.round)

    def counts(self) -> dict[str, int]:
        """Agents by state: online, training, offline."""
        out = {"online": 0, "training": 0, "offline": 0}
        for a in self.agents.values():
            out[a.state] = out.get(a.state, 0) + 1
        return out


# --- rendering ----------------------------------------------------------------------------
def render(state: MonitorState, now: float) -> RenderableType:
    """The whole screen: header, current round, agents, history."""
    tables = [_agents_table(state), _history_table(state)]
    if state.sites:
        tables.insert(0, _sites_table(state))
    return Group(_header(state, now), *tables)


def _header(s: MonitorState, now: float) -> Panel:
    c = s.counts()
    lines = [
        f"federation [bold]{s.federation}[/]   aggregator [bold]{s.aggregator}[/]   "
        f"agents: [green]{c['online']} online[/], [yellow]{c['training']} training[/], "
        f"[red]{c['offline']} offline[/]",
    ]
    cur = s.current
    if cur is None:
        lines.append("no round announced yet")
    else:
        left = cur.deadline - now
        when = "closed" if cur.closed else (f"deadline in {left:.0f}s" if left >= 0 else "overdue")
        total = f"/{s.rounds_total}" if s.rounds_total else ""
        lines.append(
            f"round [bold]{cur.round}{total}[/] ({when}, codec {cur.codec}): "
            f"{len(cur.accepted)}/{len(cur.selected)} updates accepted, "
            f"{len(cur.rejected)} rejected"
        )
        for cid, receipt in sorted(cur.rejected.items()):
            # The reason may quote what a device sent: shown as text, never as markup.
            why = f" ({escape(receipt.reason)})" if receipt.reason else ""
            lines.append(f"  [red]rejected[/] {cid}: {receipt.effective_code()}{why}")
    onnx = (
        f"   ONNX: round {s.onnx_round}, {s.onnx_bytes / 1e3:.1f} kB" if s.onnx_round >= 0 else ""
    )
    lines.append(
        f"receipts seen: {s.receipts_accepted} accepted, {s.receipts_rejected} rejected   "
        f"global model: round {s.global_round}, {s.global_bytes / 1e3:.1f} kB{onnx}"
    )
    privacy = _privacy(s)
    if privacy:
        lines.append(privacy)
    for p in s.problems:
        lines.append(f"[red]bad message[/] {p}")
    return Panel(Text.from_markup("\n".join(lines)), title="fedmq monitor")


def _privacy(s: MonitorState) -> str:
    """The (ε, δ) spent so far, from the latest metrics ("" without differential privacy)."""
    last = s.history[-1] if s.history else None
    if last is None or last.dp_epsilon is None:
        return ""
    return (
        f"differential privacy: [bold]ε = {last.dp_epsilon:.3g}[/] spent after round "
        f"{last.round} (δ = {last.dp_delta:g})"
    )


_STATE_STYLE = {"online": "green", "training": "yellow", "offline": "red"}


def _quality(m: msg.RoundMetrics) -> str:
    """Accuracy (classification) or RMSE (regression) on the held-out data."""
    if m.task == "regression":
        return "-" if m.test_rmse is None else f"rmse {m.test_rmse:.4g}"
    return "-" if m.test_accuracy is None else f"{100 * m.test_accuracy:.2f}%"


def _agents_table(s: MonitorState) -> Table:
    table = Table(title="agents", expand=False)
    for col in ("agent", "state", "round", "samples"):
        table.add_column(col)
    for cid, a in sorted(s.agents.items()):
        style = _STATE_STYLE.get(a.state, "")
        table.add_row(cid, f"[{style}]{a.state}[/]", str(a.round), str(a.num_samples))
    return table


def _sites_table(s: MonitorState) -> Table:
    table = Table(title="sites (each one contributor: its devices' partial aggregate)")
    for col in ("site", "state", "bridge", "devices", "samples", "summing", "last partial"):
        table.add_column(col)
    for name, v in sorted(s.sites.items()):
        style = _STATE_STYLE.get(v.state)
        state = f"[{style}]{v.state}[/]" if style else v.state
        summing = f"round {v.open_round}: {v.updates} updates" if v.open_round >= 0 else "-"
        partial = f"round {v.partial_round}: {v.partial}" if v.partial_round >= 0 else "-"
        table.add_row(name, state, v.bridge, str(v.devices),
                      str(v.num_samples), summing, partial)  # fmt: skip
    return table


def _history_table(s: MonitorState) -> Table:
    table = Table(title=f"rounds (from {topics.Topics(s.federation).metrics})")
    for col in ("round", "clients", "test", "test loss", "train loss", "up kB", "down kB"):
        table.add_column(col, justify="right")
    table.add_column("round s", justify="right")
    rows = s.history[-HISTORY_ROWS:]
    dp = any(m.dp_epsilon is not None for m in rows)
    table.add_column("clip", justify="right")
    if dp:
        table.add_column("ε", justify="right")
    for m in rows:
        extra = [] if not dp else ["-" if m.dp_epsilon is None else f"{m.dp_epsilon:.3g}"]
        table.add_row(
            str(m.round),
            str(m.accepted),
            _quality(m),
            "-" if m.test_loss is None else f"{m.test_loss:.4f}",
            "-" if m.train_loss is None else f"{m.train_loss:.4f}",
            f"{m.bytes_up / 1e3:.1f}",
            f"{m.bytes_down / 1e3:.1f}",
            f"{m.round_time_s:.2f}",
            "-" if m.clip_bound is None else f"{m.clip_bound:.3g} ({m.clipped})",
            *extra,
        )
    return table


# --- shell --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonitorConfig:
    """Settings of ``fedmq monitor`` (TOML ``[monitor]``, ``FEDMQ_MONITOR_*``).

    `fedmq broker init` writes ``identities/monitor/monitor.toml`` with all of them, so a
    secured broker is watched with ``--config`` and no password on the command line.
    """

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # the password, read from this file (first line)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 30.0
    mqtt_version: str = AUTO
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        topics.validate_name("federation", self.federation)
        check_mqtt_version(self.mqtt_version)
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password-file: give one, not both")

    def connect_options(self) -> ConnectOptions:
        """Credentials and TLS files; the password read from ``password_file`` when given."""
        password = self.password
        if self.password_file is not None:
            with open(self.password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        return ConnectOptions(
            username=self.username,
            password=password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            mqtt_version=self.mqtt_version,
            allow_plaintext=self.allow_plaintext,
        )


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq monitor`` (unset flags do not override the file or environment)."""
    parser.add_argument("--config", help="TOML file ([monitor] table), e.g. monitor.toml")
    parser.add_argument("--broker", help="broker URL (default mqtt://127.0.0.1:1883)")
    parser.add_argument("--federation", help="federation name (default: default)")
    parser.add_argument("--username")
    parser.add_argument(
        "--password", help="visible to `ps`: prefer --password-file or FEDMQ_MONITOR_PASSWORD"
    )
    parser.add_argument("--password-file", help="read the password from this file")
    parser.add_argument("--ca-file", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--cert-file", help="client certificate (brokers requiring one)")
    parser.add_argument("--key-file", help="private key of --cert-file")
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        help="MQTT protocol version: 5, 3.1.1, or auto (5, else 3.1.1; default auto)",
    )
    add_plaintext_argument(parser)
    parser.add_argument("--duration", type=float, help="exit after this many seconds")


def subscriptions(t: topics.Topics) -> list[tuple[str, int]]:
    """Every topic the view needs; never the (large) update payloads."""
    subs = [t.aggregator_status, t.global_meta, t.global_onnx, t.metrics, t.round_start_any]
    sites = [t.site_status_any, t.site_bridge_any, t.site_receipt_all]  # docs/sites.md
    return [(topic, 1) for topic in [*subs, t.receipt_any, t.agent_status_any, *sites]]


def monitor_config(args: argparse.Namespace) -> MonitorConfig:
    """Defaults < TOML ``[monitor]`` < ``FEDMQ_MONITOR_*`` < flags."""
    return load_settings(MonitorConfig, args, "monitor", "FEDMQ_MONITOR_")


def run_monitor(args: argparse.Namespace) -> int:
    """Follow the federation until Ctrl-C (or ``--duration``); 1 on a config/connect error."""
    from rich.live import Live

    from shared.mqtt.transport import MqttTransport

    try:
        cfg = monitor_config(args)
        transport = MqttTransport(
            cfg.broker,
            f"monitor-{int(time.time() * 1000) % 10**9}",
            subscriptions=subscriptions(topics.Topics(cfg.federation)),
            options=cfg.connect_options(),
        )
        transport.start(timeout=cfg.connect_timeout)
    except (ValueError, OSError, TransportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = MonitorState(cfg.federation)
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        with Live(render(state, time.time()), refresh_per_second=2) as live:
            while end is None or time.monotonic() < end:
                _drain(transport.inbox, state, timeout=0.5)
                live.update(render(state, time.time()))
    except KeyboardInterrupt:
        pass
    finally:
        transport.stop()
    return 0


def _drain(inbox: queue.Queue[Inbound], state: MonitorState, timeout: float) -> None:
    """Apply every queued message (waiting up to ``timeout`` for the first)."""
    try:
        item = inbox.get(timeout=timeout)
        while True:
            state.apply(item.topic, item.payload, item.retain, time.time())
            item = inbox.get_nowait()
    except queue.Empty:
        return
