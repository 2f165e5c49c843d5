"""``fedmq bench ingest``: how many updates per second the real aggregator validates and sums.

A real Mosquitto (:class:`~aggregator.ops.local_broker.LocalBroker`, free port) and the real,
unchanged ``fedmq-aggregator`` process (``python -m aggregator.cli``, one round, ``--min-clients
U --fraction 1``). The bench drives the protocol as U devices would: it publishes U retained
``online`` statuses, so the aggregator selects all of them and announces round 1; from the
announced global model it trains one real local round with the agent's own trainer on a few
Fashion-MNIST samples, encodes that delta once with the announced codec (fedmq's encoder, the
agent's encoder seed), frames it once per virtual device (its own client id, the announced
base hash: each is counted), and publishes the U frames from a few MQTT connections as fast
as the broker takes them.

Every figure comes from the aggregator: its receipts (each published once the update was
validated and added to the sum), the meta of its new global model, its ``metrics.json``
and its peak RSS (``VmHWM``). One delta for every device: the intake's work per update is the
same as for distinct deltas of the same size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import queue
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aggregator
from aggregator.ops.bench.ingest_report import (
    IngestEvents,
    RunFacts,
    markdown_table,
    parse_vm_hwm,
    spread,
    summarize,
)
from aggregator.ops.demo import aggregator_command, stop_processes
from aggregator.ops.local_broker import LocalBroker
from shared.compression.quantize import CodecError
from shared.compression.registry import resolve_codec
from shared.mqtt.base import Session, Transport
from shared.mqtt.connector import mqtt_connector
from shared.mqtt.inbox import InboxLimits
from shared.mqtt.options import ConnectOptions
from shared.protocol import messages as msg
from shared.protocol.frames import (
    FrameHeader,
    decode_frame,
    encode_tensors,
    pack_frame,
    tensors_hash,
)
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset

FEDERATION = "bench"
# The aggregator's source tree: the child runs the same code as this bench.
SOURCE_ROOT = Path(aggregator.__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """The run could not be driven to its end (timeout, the aggregator exited early)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq bench ingest``."""
    p.add_argument("--updates", type=_positive, default=1000, help="virtual devices (default 1000)")
    p.add_argument("--codec", type=_codec, default="int8", help="update codec (default int8)")
    p.add_argument("--model", choices=("lenet5", "cnn", "mlp"), default="lenet5")
    p.add_argument(
        "--publishers", type=_positive, default=4, help="MQTT connections publishing (default 4)"
    )
    p.add_argument(
        "--samples",
        type=_positive,
        default=64,
        help="Fashion-MNIST samples of the one real local round (each update's count; default 64)",
    )
    p.add_argument("--repeat", type=_positive, default=1, help="runs, each with a fresh broker")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the aggregator under cProfile: RUN/aggregator.prof and RUN/profile.txt "
        "(slower: figures not comparable)",
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/ingest-<time>)")


def run_ingest(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.repeat`` times; 0 when every update was counted exactly once."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("ingest-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    data = _samples(args.samples)
    label = (
        f"fedmq bench ingest --updates {args.updates} --codec {args.codec} --model {args.model} "
        f"--publishers {args.publishers} --samples {args.samples} --repeat {args.repeat}"
    )
    rows = []
    for i in range(1, args.repeat + 1):
        print(f"--- run {i}/{args.repeat}: {args.updates} × {args.model} {args.codec}", flush=True)
        rows.append(run_once(args, data, out / f"run-{i}"))
        print(f"    {json.dumps(rows[-1])}", flush=True)
    result = {"command": label, "runs": rows, "spread": spread(rows)}
    (out / "ingest.json").write_text(json.dumps(result, indent=1))
    print(markdown_table(f"`{label}`", rows))
    print(f"written: {out / 'ingest.json'}")
    return 0 if all(r["counted_once"] and r["exit_code"] == 0 for r in rows) else 1


def run_once(args: argparse.Namespace, data: ArrayDataset, out: Path) -> dict[str, Any]:
    """One run: fresh broker and aggregator, U statuses, round 1, U updates; its row."""
    out.mkdir(parents=True, exist_ok=True)
    t = Topics(FEDERATION)
    clients = [f"dev-{i:05d}" for i in range(args.updates)]
    events = IngestEvents()
    with LocalBroker(out / "broker", extra_config=broker_queue(args.updates)) as broker:
        subs = (t.receipt_any, t.round_start_any, t.global_meta, t.global_model)
        observer = _connect(broker.url, "bench-observer", subs, args.updates)
        publishers = [_connect(broker.url, f"bench-pub-{k}") for k in range(args.publishers)]
        agg = _start_aggregator(args, broker.url, out)
        watch = _Watch(agg, observer, events, time.monotonic() + args.timeout)
        try:
            statuses = [(t.agent_status(c), _online(c, args.samples)) for c in clients]
            _publish(publishers, statuses, retain=True)
            watch.until(lambda: 1 in events.starts and events.model is not None, "round 1")
            frames = _frames(events.starts[1], events.model, data, clients)
            rss_before = watch.rss_kb
            first = time.monotonic()
            _publish(
                publishers, [(t.update(1, c), f) for c, f in zip(clients, frames, strict=True)]
            )
            published = time.monotonic()
            watch.until(lambda: 1 in events.metas, "the new global model")
            exit_code = watch.exit(60.0)
        finally:
            stop_processes([agg])
            for transport in (observer, *publishers):
                transport.stop()
    if args.profile:
        _write_profile(out)
    facts = RunFacts(clients, first, published, len(frames[0]), rss_before, watch.rss_kb, exit_code)
    return summarize(events, facts, _round_metrics(out / "metrics.json"))


def broker_queue(updates: int) -> str:
    """Broker settings so that every status and update can wait for the aggregator.

    Mosquitto silently drops QoS 1 messages for a client holding ``max_queued_messages``
    beyond its in-flight window: with its default 1,000, at 2,000 devices the retained
    statuses delivered at the aggregator's subscription were cut there, and the round never
    opened. The development config now holds 20,000; past that the bench raises it.
    """
    return f"max_queued_messages {max(20_000, 2 * updates + 100)}"


class _Watch:
    """Reads the observer's messages into ``events`` while watching the aggregator process."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        observer: Transport,
        events: IngestEvents,
        deadline: float,
    ) -> None:
        self.proc, self.observer, self.events, self.deadline = proc, observer, events, deadline
        self.rss_kb: int | None = None  # the aggregator's peak RSS (VmHWM) last seen

    def until(self, done: Callable[[], bool], what: str) -> None:
        """Record messages until ``done()``; BenchError at the deadline or an early exit."""
        while not done():
            self._sample_rss()
            if time.monotonic() > self.deadline:
                raise BenchError(f"no {what} before the deadline")
            if self.proc.poll() is not None and self.observer.inbox.empty():
                raise BenchError(f"the aggregator exited ({self.proc.returncode}) before {what}")
            try:
                item = self.observer.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            self.events.record(item.topic, item.payload, item.received_at)

    def exit(self, timeout: float) -> int | None:
        """The aggregator's exit code (it ends after its last round), None after ``timeout``."""
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self._sample_rss()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.05)
        return self.proc.poll()

    def _sample_rss(self) -> None:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:  # exited
            return
        self.rss_kb = parse_vm_hwm(text) or self.rss_kb  # a zombie has none: keep the last


def _start_aggregator(args: argparse.Namespace, url: str, out: Path) -> subprocess.Popen[bytes]:
    """``fedmq-aggregator`` for one round that waits for all U devices and selects them all."""
    cmd = aggregator_command(
        url,
        FEDERATION,
        *("--model", args.model, "--codec", args.codec, "--rounds", "1"),
        *("--min-clients", str(args.updates), "--fraction", "1", "--max-extensions", "0"),
        *("--round-timeout", str(args.timeout), "--wait-clients-timeout", str(args.timeout)),
        *("--metrics-file", str(out / "metrics.json"), "--no-onnx"),
    )
    if args.profile:  # python -m cProfile -o FILE -m aggregator.cli ...
        cmd = [cmd[0], "-m", "cProfile", "-o", str(out / "aggregator.prof"), *cmd[1:]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # BLAS threads: as the caller has them
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    with open(out / "aggregator.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _connect(url: str, client_id: str, subs: tuple[str, ...] = (), updates: int = 0) -> Transport:
    # The observer holds every receipt until read: room for all of them.
    limits = InboxLimits(max_messages=max(10_000, 2 * updates + 100))
    connect = mqtt_connector(url, ConnectOptions(inbox=limits))
    transport = connect(Session(client_id, subscriptions=tuple((s, 1) for s in subs)))
    transport.start()
    return transport


def _publish(
    publishers: list[Transport], messages: list[tuple[str, bytes]], retain: bool = False
) -> None:
    """Hand every message to paho at once (round-robin over the connections), then wait
    until the broker has acknowledged each connection's last one (it acknowledges in order)."""
    n = len(publishers)
    for i, (topic, payload) in enumerate(messages):
        last = i >= len(messages) - n
        publishers[i % n].publish(topic, payload, retain=retain, wait=last, timeout=600.0)


def _online(client_id: str, samples: int) -> bytes:
    status = msg.AgentStatus(client_id=client_id, state="online", num_samples=samples)
    return status.to_json()


def _samples(n: int) -> ArrayDataset:
    import numpy as np

    from aggregator.ops.datasets import load_named_dataset

    return load_named_dataset("fashion-mnist", train=True).subset(np.arange(n))


def _frames(
    ann: msg.RoundStart, model: bytes | None, data: ArrayDataset, clients: list[str]
) -> list[bytes]:
    """One update frame per client, all carrying one real delta of the announced model."""
    from edge_agent.local_training import LocalTrainer, encoder_rng

    assert model is not None
    params = decode_frame(model).tensors
    if tensors_hash(params) != ann.base_hash:
        raise BenchError("the retained global model is not the announced base model")
    local = LocalTrainer("bench").train(ann.model, params, ann.train, data, None)
    rng = encoder_rng(ann.train.seed, "bench")
    encoded = encode_tensors(local.delta, codec=ann.codec, round_id=ann.round, rng=rng)
    return [
        pack_frame(
            FrameHeader(
                kind="update",
                federation=ann.federation,
                round=ann.round,
                codec=ann.codec,
                client_id=c,
                base_hash=ann.base_hash,
                num_samples=local.num_samples,
                meta=local.meta,
            ),
            encoded,
        )
        for c in clients
    ]


def _round_metrics(path: Path) -> dict[str, Any] | None:
    try:
        rounds = json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r for r in rounds if isinstance(r, dict) and r.get("round") == 1), None)


def _write_profile(out: Path) -> None:
    prof = out / "aggregator.prof"
    if prof.exists():
        with open(out / "profile.txt", "w") as fh:
            pstats.Stats(str(prof), stream=fh).sort_stats("tottime").print_stats(40)
        print(f"    profile: {out / 'profile.txt'}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _codec(text: str) -> str:
    try:
        resolve_codec(text)
    except CodecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
