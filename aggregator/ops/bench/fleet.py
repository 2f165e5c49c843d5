"""``fedmq bench fleet``: N real edge agents, a real Mosquitto and the real aggregator.

For each fleet size N: a Mosquitto on a free loopback port (:class:`LocalBroker`, ``$SYS``
every second), the unchanged ``fedmq-aggregator`` process (``--min-clients N --fraction 1``, R
rounds) and P processes of ``aggregator.ops.bench.fleet_agents``, each running N/P unchanged
:class:`~edge_agent.agent.EdgeAgent` objects (own MQTT connection, client id, last will,
outbox, receipts) that train for real on their own shard of Fashion-MNIST. The bench only
watches: an observer connection (announcements, receipts, metas, ``$SYS``), the processes'
peak RSS and the aggregator's and broker's CPU time from ``/proc``, the agents' event files, the
aggregator's ``metrics.json``. It writes ``DIR/fleet.json`` and ``DIR/fleet.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.ops.bench import fleet_hetero
from aggregator.ops.bench.fleet_report import (
    SYS_COUNTERS,
    FleetEvents,
    counted_once_async,
    heterogeneity_summary,
    markdown_table,
    plot,
    round_rows,
    run_summary,
    settings_line,
)
from aggregator.ops.bench.ingest import SOURCE_ROOT, BenchError, _codec, _connect, _positive
from aggregator.ops.bench.ingest_report import parse_vm_hwm
from aggregator.ops.demo import aggregator_command, stop_processes
from aggregator.ops.local_broker import LocalBroker
from shared.mqtt.base import Transport
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset, save_npz

FEDERATION = "fleet"
# Agents per process when --processes is not given: 1,000 agents in 8 processes.
AGENTS_PER_PROCESS = 125
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq bench fleet``."""
    p.add_argument(
        "--agents",
        type=_sizes,
        default=[10],
        help="fleet size, or sizes run one after the other: 10,100,300,1000 (default 10)",
    )
    p.add_argument(
        "--rounds", type=_positive, default=3, help="rounds per fleet (async: versions; default 3)"
    )
    p.add_argument("--model", choices=("lenet5", "cnn", "mlp"), default="lenet5")
    p.add_argument("--codec", type=_codec, default="int8", help="update codec (default int8)")
    p.add_argument(
        "--samples-per-agent",
        type=_positive,
        default=60,
        help="Fashion-MNIST training samples of each agent's shard (default 60)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help=f"agent processes (default: one per {AGENTS_PER_PROCESS} agents)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per fleet size (default 1800)"
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/fleet-<time>)")
    fleet_hetero.add_arguments(p)


def run_fleet(args: argparse.Namespace) -> int:
    """Run each fleet size; 0 when every round of every size counted each update once."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("fleet-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    label = (
        f"fedmq bench fleet --agents {','.join(map(str, args.agents))} --rounds {args.rounds} "
        f"--model {args.model} --codec {args.codec} --samples-per-agent {args.samples_per_agent}"
        f"{fleet_hetero.label(args)}"
    )
    # SIGTERM unwinds like Ctrl-C: the broker, the aggregator and the agent processes stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rows, runs = _run_sizes(args, out, label)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(settings_line(fleet_hetero.settings(args)))
    print(markdown_table(rows))
    if rows:
        print(f"plot: {plot(rows, out / 'fleet.png')}")
    print(f"written: {out / 'fleet.json'}")
    complete = all(
        len([r for r in rows if r["agents"] == s["agents"]]) == args.rounds
        and s.get("aggregator_exit") == 0
        for s in runs
    )
    return 0 if complete and all(r["counted_once"] for r in rows) else 1


def _run_sizes(
    args: argparse.Namespace, out: Path, label: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    train = _training_data()
    for n in args.agents:
        procs = args.processes or math.ceil(n / AGENTS_PER_PROCESS)
        print(f"--- {n} agents in {procs} processes, {args.rounds} rounds", flush=True)
        try:
            size_rows, summary = run_size(args, n, procs, train, out / f"n{n}")
        except BenchError as exc:
            print(f"    failed: {exc}", flush=True)
            size_rows, summary = [], {"agents": n, "error": str(exc)}
        summary["processes"] = procs
        for row in size_rows:  # $SYS counts to the second: the run's average per round
            row["broker_mb_in_per_round"] = summary.get("broker_mb_in_per_round")
            row["broker_mb_out_per_round"] = summary.get("broker_mb_out_per_round")
        rows += size_rows
        runs.append(summary)
        for row in size_rows:
            print(f"    {json.dumps(row)}", flush=True)
        print(f"    {json.dumps(summary)}", flush=True)
        _write(out, label, fleet_hetero.settings(args), rows, runs)
    return rows, runs


def _write(
    out: Path,
    label: str,
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
) -> None:
    doc = {"command": label, "settings": settings, "rows": rows, "runs": runs}
    (out / "fleet.json").write_text(json.dumps(doc, indent=1))


def run_size(
    args: argparse.Namespace, n: int, procs: int, train: ArrayDataset, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fleet: broker, aggregator, ``procs`` agent processes; its rows and summary."""
    out.mkdir(parents=True, exist_ok=True)
    clients = [f"dev-{i:05d}" for i in range(n)]
    data_dir = write_shards(train, clients, args.samples_per_agent, out / "data")
    t = Topics(FEDERATION)
    events = FleetEvents()
    with LocalBroker(out / "broker", extra_config=broker_config(n)) as broker:
        subs = (t.round_start_any, t.global_meta, t.receipt_any, *SYS_COUNTERS)
        observer = _connect(broker.url, "fleet-observer", subs, 4 * n)
        agg = _start_aggregator(args, n, broker.url, out)
        slow = fleet_hetero.slow_clients(clients, args.slow_fraction, args.seed)
        agents = [
            _start_agents(
                broker.url, ids, data_dir, out, k, fleet_hetero.agent_flags(args, ids, slow)
            )
            for k, ids in enumerate(_split(clients, procs))
        ]
        watch = _FleetWatch(agg, broker.pid, agents, observer, events)
        try:
            watch.until_exit(time.monotonic() + args.timeout)
            exit_code = agg.poll()
            # The agents stop at the aggregator's live "finished": give them time to say offline.
            # A part-time one off-line then never hears it (docs/async.md): it is stopped.
            watch.wait_agents(time.monotonic() + (60.0 if args.online >= 1 else 5.0))
        finally:
            stop_processes([agg, *agents])
            observer.stop()
    agent_events = read_events(out)
    metrics = _metrics(out / "metrics.json")
    rows = round_rows(n, events, agent_events, metrics)
    if args.mode == "async":  # a window's updates were trained on earlier rounds
        whole_run = counted_once_async(events, metrics)
        for row in rows:
            # Trainings that began before the window opened count for it: no training span.
            row.update(counted_once=whole_run, train_span_s=None, overhead_s=None)
    summary = run_summary(n, events, agent_events, exit_code)
    summary.update(heterogeneity_summary(agent_events))
    summary["agents_peak_rss_mb"] = watch.peak("agents_rss_mb")
    return rows, summary


def broker_config(n: int) -> str:
    """Mosquitto settings for a fleet of ``n``: $SYS every second, per-client queues that hold
    a round's traffic for the aggregator: the development config's 20,000, or more for a
    fleet over 5,000 (see docs/scaling.md: Mosquitto's default 1,000 drops the retained
    statuses beyond ~1,100 devices)."""
    return f"sys_interval 1\nmax_queued_messages {max(20_000, 4 * n + 100)}\n"


def write_shards(train: ArrayDataset, clients: list[str], samples: int, out: Path) -> Path:
    """One ``<client>.npz`` per client: ``samples`` distinct training samples each (the
    dataset is cycled when the fleet needs more than it holds)."""
    order = np.random.default_rng(0).permutation(len(train))
    for i, client in enumerate(clients):
        idx = np.take(order, np.arange(i * samples, (i + 1) * samples), mode="wrap")
        save_npz(out / f"{client}.npz", train.subset(np.sort(idx)))
    return out


def _split(clients: list[str], parts: int) -> list[list[str]]:
    parts = max(1, min(parts, len(clients)))
    size = math.ceil(len(clients) / parts)
    return [clients[i : i + size] for i in range(0, len(clients), size)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def _start_aggregator(
    args: argparse.Namespace, n: int, url: str, out: Path
) -> subprocess.Popen[bytes]:
    """``fedmq-aggregator`` for R rounds (async: R versions) that waits for all N agents (when
    part-time: :func:`fleet_hetero.quorum`) and selects them all (one BLAS thread, as its
    systemd unit runs it)."""
    deadline = args.round_timeout or args.timeout
    cmd = aggregator_command(
        url,
        FEDERATION,
        *("--model", args.model, "--codec", args.codec, "--rounds", str(args.rounds)),
        *("--min-clients", str(fleet_hetero.quorum(args, n)), "--fraction", "1"),
        *("--max-extensions", "0", "--round-timeout", str(deadline)),
        *("--wait-clients-timeout", str(args.timeout), *fleet_hetero.mode_flags(args)),
        *("--metrics-file", str(out / "metrics.json"), "--no-onnx"),
    )
    with open(out / "aggregator.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _start_agents(
    url: str, ids: list[str], data_dir: Path, out: Path, k: int, extra: list[str]
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "aggregator.ops.bench.fleet_agents", "--broker", url,
        "--federation", FEDERATION, "--ids", f"{ids[0]}:{len(ids)}",
        "--data-dir", str(data_dir), "--state-dir", str(out / "state"),
        "--events", str(out / f"events-{k}.jsonl"), *extra,
    ]  # fmt: skip
    with open(out / f"agents-{k}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


class _FleetWatch:
    """Records the observer's messages and samples the processes until the aggregator ends."""

    def __init__(
        self,
        agg: subprocess.Popen[bytes],
        broker_pid: int | None,
        agents: list[subprocess.Popen[bytes]],
        observer: Transport,
        events: FleetEvents,
    ) -> None:
        self.agg, self.broker_pid, self.agents = agg, broker_pid, agents
        self.observer, self.events = observer, events
        # Inbound.received_at is monotonic; the agents' events are wall-clock times.
        self.wall_offset = time.time() - time.monotonic()
        self._next_sample = 0.0

    def until_exit(self, deadline: float) -> None:
        while self.agg.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError("the aggregator did not finish before the deadline")
            if all(p.poll() is not None for p in self.agents):
                raise BenchError("every agent process exited before the aggregator finished")
            self._step()
        self._drain()
        self._sample(force=True)

    def wait_agents(self, deadline: float) -> None:
        while any(p.poll() is None for p in self.agents) and time.monotonic() < deadline:
            self._step()
        self._sample(force=True)

    def _step(self) -> None:
        self._sample()
        try:
            item = self.observer.inbox.get(timeout=0.05)
        except queue.Empty:
            return
        self.events.record(item.topic, item.payload, item.received_at + self.wall_offset)

    def _drain(self) -> None:
        while True:
            try:
                item = self.observer.inbox.get_nowait()
            except queue.Empty:
                return
            self.events.record(item.topic, item.payload, item.received_at + self.wall_offset)

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_sample and not force:
            return
        self._next_sample = now + 0.2
        t = time.time()
        for what, pids in (
            ("agg_rss_mb", [self.agg.pid]),
            ("broker_rss_mb", [self.broker_pid] if self.broker_pid else []),
            ("agents_rss_mb", [p.pid for p in self.agents]),
        ):
            peaks = [_vm_hwm_mb(pid) for pid in pids]
            known = [p for p in peaks if p is not None]
            if known:
                # A peak never shrinks: keep the largest seen (a process that exited has none).
                prev = self.events.sample_at(what, t) or 0.0
                self.events.sample(t, what, max(prev, sum(known)))
        for what, pid in (("agg_cpu_s", self.agg.pid), ("broker_cpu_s", self.broker_pid)):
            cpu = _cpu_s(pid) if pid else None
            if cpu is not None:
                self.events.sample(t, what, cpu)

    def peak(self, what: str) -> float | None:
        return self.events.sample_at(what, float("inf"))


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        kb = parse_vm_hwm(Path(f"/proc/{pid}/status").read_text())
    except OSError:  # exited
        return None
    return None if kb is None else kb / 1024


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def read_events(out: Path) -> list[dict[str, Any]]:
    """Every agent process's events (a torn last line of a killed process is skipped)."""
    found = []
    for path in sorted(out.glob("events-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _metrics(path: Path) -> list[dict[str, Any]]:
    try:
        rounds = json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []
    return [r for r in rounds if isinstance(r, dict)]


def _training_data() -> ArrayDataset:
    from aggregator.ops.datasets import load_named_dataset

    return load_named_dataset("fashion-mnist", train=True)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"fleet sizes must be ≥ 1, got {text!r}")
    return sizes
