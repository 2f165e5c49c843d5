"""``fedmq bench async``: the same heterogeneous federation synchronously and asynchronously.

One dataset partition (Fashion-MNIST, Dirichlet α = 0.5 by default), one model (LeNet-5), the
same seeds and the same devices: ``--slow-fraction`` of them (chosen by the seed) train
``--slowdown`` times slower (``fedmq-agent --slowdown``: real extra wall time after each
batch), and with ``--online F`` every device is on-line a fraction F of the time in random
spells. Each mode gets a fresh Mosquitto, one aggregator process and one agent process per
device (the ``fedmq demo`` machinery), and the same deadline (``--round-timeout``).

The synchronous federation runs ``--rounds`` rounds; the asynchronous one (``--buffer``,
``--max-staleness``, ``--staleness-weight``) then runs for the same wall time. From each
run's ``metrics.json`` (:mod:`aggregator.ops.bench.async_report`): wall time to
``--target-accuracy``, accuracy over wall time, models published, updates applied, the
staleness histogram and bytes. Writes ``async.json``, ``async.md`` and ``async.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.ops.bench import async_report
from aggregator.ops.bench.strategies import aggregator_flags
from aggregator.ops.demo import (
    add_mqtt_version_argument,
    add_task_arguments,
    add_tuned_arguments,
    prepare_data,
    start_processes,
    stop_processes,
)
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.report import load_metrics

# How often the runner reads the asynchronous run's metrics to stop it at sync's wall time.
POLL_S = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags: the demo's task (20 devices), the fleet's heterogeneity, the async settings."""
    add_task_arguments(p)
    add_tuned_arguments(p)
    p.set_defaults(clients=20, rounds=30)
    p.add_argument("--agents", dest="clients", type=int, help="devices (default 20)")
    p.add_argument("--slow-fraction", type=float, default=0.3, help="share of slow devices")
    p.add_argument("--slowdown", type=float, default=5.0, help="how much slower they train")
    p.add_argument(
        "--min-batch-ms",
        type=float,
        default=0.0,
        help="every device's own time per batch, at least (× --slowdown): device speeds that "
        "do not depend on how many devices share this machine's cores (default 0: none)",
    )
    p.add_argument("--online", type=float, default=1.0, help="on-line fraction of every device")
    p.add_argument("--online-spell-s", type=float, default=60.0, help="mean on-line spell")
    p.add_argument("--target-accuracy", type=float, default=0.85, help="(default 0.85)")
    p.add_argument("--buffer", type=int, default=10, help="async: K (default 10)")
    p.add_argument("--max-staleness", type=int, default=10, help="async: S (default 10)")
    p.add_argument("--staleness-weight", default="poly:0.5", help="async: w(s) (poly:0.5)")
    p.add_argument("--server-lr", type=float, help="server learning rate η (both modes)")
    p.add_argument("--codec", default="int8", help="update codec (default int8)")
    p.add_argument("--round-timeout", type=float, default=300.0, help="deadline (both modes)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per federation")
    p.add_argument("--out", type=Path, help="output directory (default runs/async-<time>)")
    add_mqtt_version_argument(p)


def slow_devices(clients: int, fraction: float, seed: int) -> list[int]:
    """The indices of the slow devices: round(fraction × clients), drawn with ``seed``."""
    count = round(fraction * clients)
    picked = np.random.default_rng([seed, 0x510]).choice(clients, size=count, replace=False)
    return sorted(int(i) for i in picked)


def device_flags(args: argparse.Namespace, slow: Sequence[int]) -> Callable[[int], list[str]]:
    """``fedmq-agent`` flags of device ``i``: its slowdown and availability."""

    def flags(i: int) -> list[str]:
        out = ["--slowdown", f"{args.slowdown:g}"] if i in slow else []
        if args.min_batch_ms > 0:
            out += ["--min-batch-ms", f"{args.min_batch_ms:g}"]
        if args.online < 1:
            out += ["--online", f"{args.online:g}", "--online-spell-s", f"{args.online_spell_s:g}"]
        return out

    return flags


def mode_settings(args: argparse.Namespace, mode: str) -> dict[str, str]:
    """The aggregator's settings of ``mode`` beyond the shared task."""
    settings = {"mode": mode}
    if args.server_lr is not None:
        settings["server_lr"] = f"{args.server_lr:g}"
    if mode == "async":
        settings.update(
            buffer=str(args.buffer),
            max_staleness=str(args.max_staleness),
            staleness_weight=args.staleness_weight,
        )
    return settings


def run_async_bench(args: argparse.Namespace) -> int:
    """Both modes, then the table, the JSON and the plot; 0 when both runs produced models."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("async-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    args.samples_per_client = args.samples_per_client or None
    slow = slow_devices(args.clients, args.slow_fraction, args.seed)
    print(f"preparing {args.dataset}: {args.clients} devices, {args.partition} α={args.alpha}; "
          f"slow ({args.slowdown:g}×): {slow}", flush=True)  # fmt: skip
    clients, test = prepare_data(args, out / "data")
    print(f"--- sync: {args.rounds} rounds ...", flush=True)
    sync_entries = _run(args, "sync", clients, test, out / "sync", slow, budget_s=None)
    sync = async_report.summarize("sync", sync_entries, args.target_accuracy)
    print(f"    {_line(sync)}", flush=True)
    budget = sync["wall_time_s"] or args.timeout
    print(f"--- async: for the same {budget:.0f} s ...", flush=True)
    async_entries = _run(args, "async", clients, test, out / "async", slow, budget_s=budget)
    asyn = async_report.summarize("async", async_entries, args.target_accuracy)
    print(f"    {_line(asyn)}", flush=True)
    command = "fedmq bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "(see args)"
    result = {
        "command": command,
        "title": f"{args.model}, {args.clients} devices ({len(slow)} {args.slowdown:g}× slower, "
        f"on-line {100 * args.online:.0f} %{_pace(args)}), {args.partition} α={args.alpha}",
        "task": _task(args),
        "slow_devices": slow,
        "sync": sync,
        "async": asyn,
        "compare": async_report.compare(sync, asyn, args.target_accuracy),
    }
    (out / "async.json").write_text(json.dumps(result, indent=1))
    table = async_report.markdown(result)
    (out / "async.md").write_text(table)
    async_report.plot(result, out / "async.png")
    print(table)
    print(f"written: {out / 'async.md'}, async.json, async.png")
    return 0 if sync_entries and async_entries else 1


def _run(
    args: argparse.Namespace,
    mode: str,
    clients: list[Path],
    test: Path,
    out: Path,
    slow: Sequence[int],
    budget_s: float | None,
) -> list[dict[str, Any]]:
    """One federation in ``mode``; async stops once its models cover ``budget_s`` seconds."""
    run_args = copy.copy(args)
    run_args.fraction = 1.0
    # Sync: every device (half of those on-line on average when part-time) is the quorum at
    # the deadline. Async: K; it starts once K devices are on-line, the others join later.
    run_args.min_clients = (
        args.clients if args.online >= 1 else max(1, round(args.online * args.clients / 2))
    )
    if mode == "async":  # versions: far more than it can publish in the time it gets
        run_args.rounds = args.rounds * max(1, args.clients // args.buffer) * 4
        run_args.min_clients = min(args.buffer, run_args.min_clients)
    out.mkdir(parents=True, exist_ok=True)
    flags = aggregator_flags(mode_settings(args, mode))
    with LocalBroker(out / "broker") as broker:
        aggregator, agents = start_processes(
            run_args, broker.url, clients, test, out, flags, agent_extra=device_flags(args, slow)
        )
        try:
            _wait(aggregator, out, args.timeout, budget_s)
        finally:
            stop_processes([aggregator])
            stop_processes(agents)
    return load_metrics(out) if (out / "metrics.json").exists() else []


def _wait(
    aggregator: subprocess.Popen[bytes], out: Path, timeout: float, budget_s: float | None
) -> None:
    """Until the aggregator exits, ``timeout`` passes, or its models cover ``budget_s``."""
    end = time.monotonic() + timeout
    while aggregator.poll() is None and time.monotonic() < end:
        if budget_s is not None and (out / "metrics.json").exists():
            try:
                points = async_report.timeline(load_metrics(out))
            except (ValueError, OSError):  # being rewritten: read it next time
                points = []
            if points and points[-1][0] >= budget_s:
                return
        time.sleep(POLL_S)
    if aggregator.poll() is None and time.monotonic() >= end:
        print(f"    no result after {timeout:.0f}s, stopping it", flush=True)


def _pace(args: argparse.Namespace) -> str:
    return f", batches ≥ {args.min_batch_ms:g} ms" if args.min_batch_ms > 0 else ""


def _line(run: dict[str, Any]) -> str:
    acc = run["final_accuracy"]
    to = run["time_to_target_s"]
    return (
        f"{run['mode']}: {run['versions']} models in {run['wall_time_s']:.0f} s, final "
        f"{'–' if acc is None else f'{100 * acc:.2f} %'}, target "
        f"{'not reached' if to is None else f'at {to:.0f} s'}"
    )


def _task(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "dataset", "model", "clients", "partition", "alpha", "rounds", "samples_per_client",
        "local_epochs", "batch_size", "lr", "momentum", "seed", "codec", "slow_fraction",
        "slowdown", "min_batch_ms", "online", "online_spell_s", "buffer", "max_staleness",
        "staleness_weight", "server_lr", "round_timeout",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys}
