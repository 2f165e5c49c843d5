"""``fedmq bench sites``: the same devices flat and behind bridged site brokers.

The same S·A devices (ids, Fashion-MNIST shards, seed) run R rounds twice, one layout after
the other, with the real Mosquitto, the unchanged aggregators and the fleet bench's agent
processes (:mod:`aggregator.ops.bench.fleet_agents`, many :class:`EdgeAgent` per process):

- **flat**: one broker; every device connects to it; the central aggregator waits for all
  S·A (``--min-clients S*A --fraction 1 --clip none``).
- **sites**: a central broker and S site brokers, each bridged to the central one over
  plain loopback TCP (:func:`bridge_config`: the generated bridge's settings without TLS and
  its topic lines from :func:`aggregator.ops.bridge.topic_lines`); per site a site
  aggregator (``fedmq-aggregator --site NAME``) and its devices on the site broker; the
  central aggregator counts each site as one contributor (``--min-clients S``).

An observer on the central broker records ``$SYS/broker/bytes/received`` (every second), the
announcements, and the payloads of device updates and site partials that reach it, and of
the central aggregator's own publishes: in the sites layout the central broker receives the
bridges' traffic (partials, statuses) and those, which the report also shows apart (not WAN
when the aggregator runs beside its broker). ``--cut-site`` (:mod:`.sites_cut`) cuts one
site's bridge for some rounds. It writes ``DIR/sites.json``,
``DIR/sites.md`` and ``DIR/sites.png`` (docs/sites.md, "Measured").
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aggregator.ops.bench import sites_report as report
from aggregator.ops.bench.fleet import (
    AGENTS_PER_PROCESS,
    _env,
    _FleetWatch,
    _metrics,
    _split,
    _training_data,
    broker_config,
    write_shards,
)
from aggregator.ops.bench.fleet_report import SYS_COUNTERS
from aggregator.ops.bench.ingest import BenchError, _codec, _connect, _positive
from aggregator.ops.bench.sites_cut import (
    FIRST_CUT_ROUND,
    BridgeCut,
    add_cut_arguments,
    check_cut_arguments,
    cut_summary,
    cut_verdict,
)
from aggregator.ops.bridge import bridge_local_clientid, topic_lines
from aggregator.ops.demo import aggregator_command, stop_processes
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.netproxy import NetProxy
from shared.mqtt.base import Transport
from shared.protocol.topics import Topics, chunk_subscription
from shared.runtime.data import save_npz

FEDERATION = "sites"
# Reconnect backoff of the loopback bridges (base, cap seconds), as the integration tests'.
RESTART_TIMEOUT = (1, 2)
READY_TIMEOUT_S = 300.0  # for every device to be online before the central aggregator starts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq bench sites``."""
    p.add_argument("--sites", type=_positive, default=4, help="sites (default 4)")
    p.add_argument(
        "--agents-per-site", type=_positive, default=25, help="devices per site (default 25)"
    )
    p.add_argument("--rounds", type=_positive, default=5, help="rounds per layout (default 5)")
    p.add_argument("--model", choices=("lenet5", "cnn", "mlp"), default="lenet5")
    p.add_argument("--codec", type=_codec, default="int8", help="update codec (default int8)")
    p.add_argument(
        "--partial-codec",
        type=_codec,
        help="the site aggregators' codec for partials (default: --codec)",
    )
    p.add_argument(
        "--samples-per-agent",
        type=_positive,
        default=60,
        help="Fashion-MNIST training samples of each device's shard (default 60)",
    )
    # More local work than the aggregator's defaults (2 SGD steps on 60 samples), so that
    # five rounds move the model and the layouts' accuracies say something.
    p.add_argument("--local-epochs", type=_positive, default=2, help="(default 2)")
    p.add_argument("--batch-size", type=_positive, default=16, help="(default 16)")
    p.add_argument("--lr", type=float, default=0.05, help="devices' learning rate (default 0.05)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per layout (default 900)")
    p.add_argument("--out", type=Path, help="output directory (default runs/sites-<time>)")
    add_cut_arguments(p)


def site_names(sites: int) -> list[str]:
    """``site-0`` … ``site-{S-1}``."""
    return [f"site-{k}" for k in range(sites)]


def device_ids(sites: int, per_site: int) -> dict[str, list[str]]:
    """Each site's devices: consecutive ids, the same in both layouts."""
    ids = [f"dev-{i:05d}" for i in range(sites * per_site)]
    return {
        name: ids[k * per_site : (k + 1) * per_site] for k, name in enumerate(site_names(sites))
    }


def bridge_config(federation: str, site: str, central_port: int) -> str:
    """A site broker's bridge to a central broker on loopback: the settings of the generated
    bridge (``broker_config/mosquitto-bridge.conf``) without TLS or login, and its topics."""
    base, cap = RESTART_TIMEOUT
    lines = [
        f"connection fedmq-site-{site}",
        f"address 127.0.0.1:{central_port}",
        f"remote_clientid {site}",
        f"local_clientid {bridge_local_clientid(site)}",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "cleansession false",
        "local_cleansession false",
        f"restart_timeout {base} {cap}",
        "bridge_outgoing_retain true",
        "bridge_attempt_unsubscribe false",
        "notifications true",
        "notifications_local_only false",
        f"notification_topic {Topics(federation).site_bridge(site)}",
        *topic_lines(federation, site),
    ]
    return "\n".join(lines) + "\n"


def write_test_set(data_dir: Path) -> Path:
    """Fashion-MNIST's test set, on which the central aggregator measures each round."""
    from aggregator.ops.datasets import load_named_dataset

    path = data_dir / "test.npz"
    save_npz(path, load_named_dataset("fashion-mnist", train=False))
    return path


def observed_topics(federation: str) -> tuple[str, ...]:
    """What the observer on the central broker follows: announcements, metas, receipts, site
    statuses, device updates and site partials (with their chunks), ``$SYS`` counters."""
    t = Topics(federation)
    payloads = (t.update_any, t.site_partial_any)
    chunks = tuple(c for c in map(chunk_subscription, payloads) if c is not None)
    return (
        t.global_meta,
        *t.global_payloads,
        t.round_start_any,
        t.round_decision_any,
        t.aggregator_status,
        t.metrics,
        t.receipt_any,
        f"{t.root}/sites/+/round/+/receipt",  # every site's (Topics names one site's)
        t.site_status_any,
        t.agent_status_any,
        *payloads,
        *chunks,
        *SYS_COUNTERS,
    )


def run_sites(args: argparse.Namespace) -> int:
    """Both layouts; 0 when both applied every round, each site's partial counted once."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("sites-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    label = (
        f"fedmq bench sites --sites {args.sites} --agents-per-site {args.agents_per_site} "
        f"--rounds {args.rounds} --model {args.model} --codec {args.codec} "
        f"--samples-per-agent {args.samples_per_agent} --local-epochs {args.local_epochs} "
        f"--batch-size {args.batch_size} --lr {args.lr}"
    )
    if args.partial_codec:
        label += f" --partial-codec {args.partial_codec}"
    if args.cut_site is not None:
        label += f" --cut-site {args.cut_site} --cut-rounds {args.cut_rounds}"
    by_site = device_ids(args.sites, args.agents_per_site)
    problem = check_cut_arguments(args, list(by_site))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    data_dir = write_shards(
        _training_data(), [c for ids in by_site.values() for c in ids], args.samples_per_agent,
        out / "data",
    )  # fmt: skip
    args.eval_data = write_test_set(out / "data")
    # SIGTERM unwinds like Ctrl-C: brokers, aggregators and agent processes stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: dict[str, dict[str, Any]] = {}
    try:
        for layout in report.LAYOUTS:
            print(f"--- {layout}: {args.sites} × {args.agents_per_site} devices", flush=True)
            started = time.monotonic()
            try:
                runs[layout] = run_layout(args, layout, by_site, data_dir, out / layout)
            except BenchError as exc:
                print(f"    failed: {exc}", flush=True)
                runs[layout] = {"rows": [], "error": str(exc)}
            runs[layout]["wall_s"] = round(time.monotonic() - started, 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = report.compare(runs["flat"]["rows"], runs["sites"]["rows"])
    summ = report.summary(table)
    doc = {"command": label, "summary": summ, "rounds": table, "layouts": runs}
    (out / "sites.json").write_text(json.dumps(doc, indent=1))
    text = report.markdown_table(table, summ)
    if "cut" in runs["sites"]:
        text += "\n" + cut_summary(runs["sites"]["cut"])
    (out / "sites.md").write_text(f"`{label}`\n\n{text}\n")
    print(text)
    print(f"plot: {report.plot(table, out / 'sites.png', label)}")
    print(f"written: {out / 'sites.json'}")
    cut = [r["round"] for r in runs["sites"].get("cut", {}).get("rounds", [])]
    return 0 if complete(runs, args.rounds, args.sites, cut) else 1


def complete(
    runs: dict[str, dict[str, Any]], rounds: int, sites: int, cut: list[int] | None = None
) -> bool:
    """Both layouts applied rounds 1..R with unique participants and ended well; in the
    sites layout each round got one partial per site and no device update reached central
    (a cut round: the cut's own verdict, :func:`sites_cut.cut_verdict`)."""
    for layout in report.LAYOUTS:
        run = runs.get(layout, {})
        rows = [r for r in run.get("rows", []) if r["applied"]]
        if [r["round"] for r in rows] != list(range(1, rounds + 1)) or run.get("exit") != 0:
            return False
        if not all(r["participants_unique"] for r in rows):
            return False
    sites_rows = runs["sites"]["rows"]
    if not runs["sites"].get("cut", {"ok": True})["ok"]:
        return False
    return all(
        r["updates_on_central"] == 0
        and (
            r["round"] in (cut or [])
            or r["partial_sites"] == r["partials"] == r["participants"] == sites
        )
        for r in sites_rows
    )


def run_layout(
    args: argparse.Namespace,
    layout: str,
    by_site: dict[str, list[str]],
    data_dir: Path,
    out: Path,
) -> dict[str, Any]:
    """One layout: its brokers, aggregators and agent processes; its rows and exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    n = sum(len(ids) for ids in by_site.values())
    events = report.SitesEvents()
    cut: BridgeCut | None = None
    procs: list[subprocess.Popen[bytes]] = []  # every process started, stopped at the end
    brokers: list[LocalBroker] = []
    try:
        central = LocalBroker(out / "central", extra_config=broker_config(n)).start()
        brokers.append(central)
        ports = {name: central.port for name in by_site}
        if layout == "sites" and args.cut_site is not None:
            proxy = NetProxy(central.host, central.port)  # the cut site's WAN
            ports[args.cut_site] = proxy.port
            cut = BridgeCut(args.cut_site, proxy, FIRST_CUT_ROUND, args.cut_rounds)
        observer = _connect(central.url, "sites-observer", observed_topics(FEDERATION), 4 * n)
        try:
            agents, site_aggs = _start_devices(
                args, layout, by_site, data_dir, out, brokers, ports, procs
            )
            # In both layouts the central aggregator starts once every device is online, so
            # their rounds begin alike (its first model, then round 1 at once).
            _wait_ready(observer, events, agents, by_site, layout == "flat")
            contributors = n if layout == "flat" else len(by_site)
            watch = _CutWatch(
                _start_central(args, contributors, cut, central.url, out, procs),
                central.pid, agents, observer, events,
            )  # fmt: skip
            watch.cut = cut
            exit_code = _follow_run(watch, args.timeout, cut, site_aggs)
        finally:
            observer.stop()
    finally:
        stop_processes(procs)
        for broker in reversed(brokers):
            broker.stop()
        if cut is not None:
            cut.proxy.close()
    return {
        **_layout_rows(args, layout, out, events, cut),
        "exit": exit_code,
        "agent_exits": [p.poll() for p in agents],
        "site_aggregator_exits": [p.poll() for p in site_aggs],
        "central_broker_mb_in": _mb(events.counter_at("bytes_in", math.inf)),
        "central_broker_mb_out": _mb(events.counter_at("bytes_out", math.inf)),
    }


def _follow_run(
    watch: _CutWatch,
    timeout: float,
    cut: BridgeCut | None,
    site_aggs: list[subprocess.Popen[bytes]],
) -> int | None:
    """Watch until the central aggregator exits; its exit code."""
    watch.until_exit(time.monotonic() + timeout)
    exit_code = watch.agg.poll()
    if cut is not None:  # the site must hear the central aggregator's "finished"
        cut.heal("the run ended")
    # Everything stops at the central aggregator's "finished": let it say so.
    watch.agents = [*watch.agents, *site_aggs]
    watch.wait_agents(time.monotonic() + 60.0)
    return exit_code


def _layout_rows(
    args: argparse.Namespace,
    layout: str,
    out: Path,
    events: report.SitesEvents,
    cut: BridgeCut | None,
) -> dict[str, Any]:
    """The layout's rows (printed), and the cut's verdict when there was one."""
    metrics = _metrics(out / "metrics.json")
    rows = report.layout_rows(layout, events, metrics)
    for row in rows:
        print(f"    {json.dumps(row)}", flush=True)
    if cut is None:
        return {"rows": rows}
    verdict = cut_verdict(cut.site, metrics, events)
    print(f"    cut: {json.dumps(verdict)}", flush=True)
    return {"rows": rows, "cut": verdict, "cut_log": cut.log}


def _start_devices(
    args: argparse.Namespace,
    layout: str,
    by_site: dict[str, list[str]],
    data_dir: Path,
    out: Path,
    brokers: list[LocalBroker],
    bridge_ports: dict[str, int],
    procs: list[subprocess.Popen[bytes]],
) -> tuple[list[subprocess.Popen[bytes]], list[subprocess.Popen[bytes]]]:
    """Per site: its agent processes (and in the sites layout its broker, bridged to
    127.0.0.1:``bridge_ports[site]``, and its site aggregator). The flat layout groups the
    devices into the same processes."""
    central = brokers[0]
    agents: list[subprocess.Popen[bytes]] = []
    site_aggs: list[subprocess.Popen[bytes]] = []
    for name, ids in by_site.items():
        url, site = central.url, ""
        if layout == "sites":
            extra = broker_config(len(ids)) + bridge_config(FEDERATION, name, bridge_ports[name])
            broker = LocalBroker(out / name / "broker", extra_config=extra).start()
            brokers.append(broker)
            url, site = broker.url, name
            site_aggs.append(_start_site_aggregator(args, name, url, out / name))
            procs.append(site_aggs[-1])
        for k, part in enumerate(_split(ids, math.ceil(len(ids) / AGENTS_PER_PROCESS))):
            pace = args.cut_pace_ms if args.cut_site is not None else 0.0
            agents.append(_start_agents(url, part, data_dir, out / name, k, site, pace))
            procs.append(agents[-1])
    return agents, site_aggs


def _wait_ready(
    observer: Transport,
    events: report.SitesEvents,
    agents: list[subprocess.Popen[bytes]],
    by_site: dict[str, list[str]],
    flat: bool,
) -> None:
    """Until every device is online: its status on the central broker (flat), or counted by
    its site aggregator's status bridged up (the central aggregator selects the sites it
    knows when it starts)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    offset = time.time() - time.monotonic()
    while not events.ready(by_site, flat):
        if time.monotonic() > deadline:
            seen = {n: (s.state, s.devices) for n, s in events.site_status.items()}
            online = len(events.devices_online)
            raise BenchError(f"not every device came online: {online} flat, sites {seen}")
        if all(p.poll() is not None for p in agents):
            raise BenchError("every agent process exited before the sites were ready")
        try:
            item = observer.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        events.record(item.topic, item.payload, item.received_at + offset)


class _CutWatch(_FleetWatch):
    """The fleet bench's watch, cutting and healing a site's bridge as the rounds go."""

    cut: BridgeCut | None = None

    def _step(self) -> None:
        super()._step()
        if self.cut is not None:
            assert isinstance(self.events, report.SitesEvents)
            self.cut.follow(self.events)


def _central_flags(
    args: argparse.Namespace, contributors: int, round_timeout: float, out: Path
) -> list[str]:
    """The central aggregator's flags: R rounds, every online contributor selected, a
    quorum of ``contributors``, no clipping."""
    return [
        *("--model", args.model, "--codec", args.codec, "--rounds", str(args.rounds)),
        *("--min-clients", str(contributors), "--fraction", "1", "--clip", "none"),
        *("--local-epochs", str(args.local_epochs), "--batch-size", str(args.batch_size)),
        *("--lr", str(args.lr), "--max-extensions", "0", "--round-timeout", str(round_timeout)),
        *("--wait-clients-timeout", str(args.timeout)),
        *("--metrics-file", str(out / "metrics.json"), "--no-onnx"),
        *("--eval-data", str(args.eval_data)),
    ]


def _start_central(
    args: argparse.Namespace,
    contributors: int,
    cut: BridgeCut | None,
    url: str,
    out: Path,
    procs: list[subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """The central aggregator; with a cut, its rounds close at ``--cut-deadline`` without
    the cut site (quorum: the others)."""
    round_timeout = args.timeout
    if cut is not None:
        contributors, round_timeout = contributors - 1, args.cut_deadline
    flags = _central_flags(args, contributors, round_timeout, out)
    cmd = aggregator_command(url, FEDERATION, *flags)
    with open(out / "aggregator.log", "wb") as log:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()))
    return procs[-1]


def _start_site_aggregator(
    args: argparse.Namespace, site: str, url: str, out: Path
) -> subprocess.Popen[bytes]:
    cmd = aggregator_command(
        url,
        FEDERATION,
        *("--site", site, "--clip", "none", "--state-dir", str(out / "aggregator-state")),
        *("--model", args.model, "--codec", args.codec),
        *(("--partial-codec", args.partial_codec) if args.partial_codec else ()),
    )
    with open(out / "site-aggregator.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _start_agents(
    url: str, ids: list[str], data_dir: Path, out: Path, k: int, site: str, pace_ms: float
) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "aggregator.ops.bench.fleet_agents", "--broker", url,
        "--federation", FEDERATION, "--ids", f"{ids[0]}:{len(ids)}",
        "--data-dir", str(data_dir), "--state-dir", str(out / "state"),
        "--events", str(out / f"events-{k}.jsonl"),
        *(("--site", site) if site else ()),
        *(("--min-batch-ms", f"{pace_ms:g}") if pace_ms else ()),
    ]  # fmt: skip
    with open(out / f"agents-{k}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _mb(x: float | None) -> float | None:
    return None if x is None else round(x / 1e6, 3)
