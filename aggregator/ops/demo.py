"""``fedmq demo``: a whole federation on this machine, as separate processes over MQTT.

Starts a Mosquitto broker (``broker_config/``) on a free loopback port, one aggregator process
and N agent processes that talk only through the broker, after partitioning a dataset into one
``.npz`` per agent (exactly what a device would hold). Shows one line per round from the
``metrics`` topic and leaves a run directory with ``metrics.json``, ``metrics.png``, logs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from aggregator.ops.datasets import load_named_dataset, partition
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.monitor import RoundTable
from aggregator.ops.report import load_metrics, plot_metrics, summarize
from aggregator.ops.strategy_presets import PRESETS, aggregator_flags
from shared.mqtt.versions import AUTO, MQTT_VERSIONS
from shared.protocol.global_delta import DOWNLOAD_CODECS
from shared.runtime.data import ArrayDataset, save_npz

FEDERATION = "demo"


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The learning task: data, partition, model and local training (shared with ``bench``)."""
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or mnist")
    p.add_argument("--data-root", help="directory with the dataset's IDX files")
    p.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download the dataset into --data-root (needs a network)",
    )
    p.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--shards-per-client", type=int, default=2)
    p.add_argument("--samples-per-client", type=int, help="cap each client's share (quick runs)")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each client's data held out for local validation",
    )
    p.add_argument("--seed", type=int, default=0)


# The demo's task, tuned (docs/strategies.md, "Benchmarks"): local SGD at lr 0.05 instead of
# the aggregator's 0.01, and a norm bound 5× the largest honest update at that rate (19.7 in
# round 1, `fedmq bench inprocess --lr 0.05`), as the aggregator's 20 is for lr 0.01.
DEMO_LR = 0.05
DEMO_MAX_UPDATE_NORM = 100.0
DEMO_STRATEGY = "fedavgm-cosine"


def add_tuned_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's learning rate and norm bound (shared with ``bench strategies``)."""
    p.set_defaults(lr=DEMO_LR)
    p.add_argument(
        "--max-update-norm",
        type=float,
        default=DEMO_MAX_UPDATE_NORM,
        help=f"the aggregator's bound on an update's L2 norm (default {DEMO_MAX_UPDATE_NORM:g}: "
        "5× the largest honest update of the demo at lr 0.05)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq demo``."""
    add_task_arguments(p)
    add_tuned_arguments(p)
    p.add_argument("--codec", default="int8")
    p.add_argument(
        "--download-codec",
        default="int8",
        choices=DOWNLOAD_CODECS,
        help="global deltas for agents (none: the full model every round)",
    )
    p.add_argument(
        "--strategy",
        default=DEMO_STRATEGY,
        choices=PRESETS,
        help=f"the aggregator's strategy, a preset of docs/strategies.md (default {DEMO_STRATEGY}: "
        "FedAvgM η 1 μ 0.5 with a cosine lr schedule, the best of `fedmq bench strategies`; "
        "`default`: the aggregator's own defaults)",
    )
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--min-clients", type=int, help="default: all clients")
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, help="run directory (default runs/demo-<time>)")
    add_mqtt_version_argument(p)


def add_mqtt_version_argument(p: argparse.ArgumentParser) -> None:
    """``--mqtt-version``, handed to every child process (shared with ``bench``)."""
    p.add_argument(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        default=AUTO,
        help="MQTT version of the aggregator, the agents and the monitor (default auto: 5; "
        "3.1.1 runs the federation the way it runs on a 3.1.1-only broker)",
    )


def client_indices(args: argparse.Namespace, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's sample indices (sorted), from the partition flags."""
    rng = np.random.default_rng(args.seed)
    parts = partition(
        labels,
        args.clients,
        args.partition,
        rng,
        alpha=args.alpha,
        shards_per_client=args.shards_per_client,
    )
    cap = args.samples_per_client
    return [np.sort(idx[:cap] if cap else idx) for idx in parts]


def load_task_data(args: argparse.Namespace) -> tuple[ArrayDataset, ArrayDataset]:
    """The named dataset's training and test sets, from disk (or downloaded on request)."""
    kw = {"root": args.data_root, "download": args.download}
    return (
        load_named_dataset(args.dataset, train=True, **kw),
        load_named_dataset(args.dataset, train=False, **kw),
    )


def prepare_data(args: argparse.Namespace, data_dir: Path) -> tuple[list[Path], Path]:
    """Partition the training set into one .npz per client; save the test set for evaluation."""
    train, test = load_task_data(args)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(client_indices(args, train.y)):
        path = data_dir / f"client-{i:02d}.npz"
        save_npz(path, train.subset(idx))
        paths.append(path)
    test_path = data_dir / "test.npz"
    save_npz(test_path, test)
    return paths, test_path


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One BLAS/OpenMP thread per process: N agents share 2 cores without oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def agent_command(url: str, federation: str, client_id: str, data: Path, *extra: str) -> list[str]:
    """The command line of one ``fedmq-agent`` process, run with this interpreter."""
    return [
        sys.executable, "-m", "edge_agent.cli", "--broker", url, "--federation", federation,
        "--client-id", client_id, "--data", str(data), *extra,
    ]  # fmt: skip


def aggregator_command(url: str, federation: str, *extra: str) -> list[str]:
    """The command line of the ``fedmq-aggregator`` process, run with this interpreter."""
    return [
        sys.executable, "-m", "aggregator.cli", "--broker", url, "--federation", federation,
        *extra,
    ]  # fmt: skip


def start_processes(
    args: argparse.Namespace,
    url: str,
    clients: list[Path],
    test: Path,
    out: Path,
    aggregator_extra: Sequence[str] = (),
    honest: Sequence[int] | None = None,
    agent_extra: Callable[[int], Sequence[str]] | None = None,
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """Launch the aggregator and one agent per client, each logging to ``out/logs``.

    ``aggregator_extra``: more aggregator flags (a strategy); ``honest``: the indices of the
    clients to start agents for (default all: ``fedmq bench strategies`` starts the others
    as malicious devices itself); ``agent_extra``: more flags of agent ``i`` (``fedmq bench
    async``: slower and part-time devices).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    agg_cmd = aggregator_command(
        url,
        FEDERATION,
        "--model",
        args.model,
        "--rounds",
        str(args.rounds),
        "--min-clients",
        str(args.min_clients or args.clients),
        "--fraction",
        str(args.fraction),
        "--round-timeout",
        str(args.round_timeout),
        "--local-epochs",
        str(args.local_epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--seed",
        str(args.seed),
        "--codec",
        args.codec,
        "--download-codec",
        getattr(args, "download_codec", "int8"),
        "--eval-data",
        str(test),
        "--metrics-file",
        str(out / "metrics.json"),
        *child_protocol_flags(args),
        *_bound_flags(args),
        *aggregator_extra,
    )
    agents = []
    for i, path in enumerate(clients):
        if honest is not None and i not in honest:
            continue
        cmd = agent_command(
            url,
            FEDERATION,
            f"agent-{i:02d}",
            path,
            "--val-fraction",
            str(args.val_fraction),
            # Per-run device state (top-k residuals): runs must not inherit each other's.
            "--state-dir",
            str(out / "state" / f"agent-{i:02d}"),
            # Ten agents importing torch at once on one small machine would make round 1 alone
            # take tens of seconds; a real device imports it once, at its first round.
            "--warm-up",
            *child_protocol_flags(args),
            *(agent_extra(i) if agent_extra is not None else ()),
        )
        with open(logs / f"agent-{i:02d}.log", "wb") as fh:
            agents.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
    with open(logs / "aggregator.log", "wb") as fh:
        aggregator = subprocess.Popen(agg_cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return aggregator, agents


def _bound_flags(args: argparse.Namespace) -> list[str]:
    """``--max-update-norm`` when the command has it (the demo, ``bench strategies``)."""
    bound = getattr(args, "max_update_norm", None)
    return [] if bound is None else ["--max-update-norm", f"{bound:g}"]


def child_protocol_flags(args: argparse.Namespace) -> list[str]:
    """The children's ``--mqtt-version`` flag (none when the caller has no such option)."""
    version = getattr(args, "mqtt_version", AUTO)
    return [] if version == AUTO else ["--mqtt-version", version]


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM each process still running, then SIGKILL whatever outlives ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(args: argparse.Namespace) -> int:
    """Run the whole demo; return the aggregator's exit code."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"preparing {args.dataset}: {args.clients} clients, {args.partition} partition ...")
    clients, test = prepare_data(args, out / "data")
    print(f"strategy {args.strategy}: {' '.join(aggregator_flags(PRESETS[args.strategy]))}")
    with LocalBroker(out / "broker") as broker:
        print(
            f"broker {broker.url}; watch it with: mosquitto_sub -h 127.0.0.1 -p {broker.port} "
            "-v -t 'fl/#'"
        )
        print(f"dashboard (open it in a browser): {broker.dashboard_url(FEDERATION)}")
        table = RoundTable(broker.url, FEDERATION, args.rounds, args.mqtt_version)
        t0 = time.monotonic()
        strategy = aggregator_flags(PRESETS[args.strategy])
        aggregator, agents = start_processes(args, broker.url, clients, test, out, strategy)
        try:
            table.follow(until=lambda: aggregator.poll() is not None)
        finally:
            stop_processes([aggregator])
            stop_processes(agents)
        wall = time.monotonic() - t0
    code = aggregator.returncode
    if code != 0:
        print(f"aggregator exited with {code}; see {out / 'logs' / 'aggregator.log'}")
        return code or 1
    rounds = load_metrics(out)
    png = plot_metrics(
        rounds,
        out / "metrics.png",
        f"fedmq demo: {args.model}, {args.dataset}, {args.clients} clients, {args.partition}",
    )
    summary = summarize(rounds) | {"wall_time_s": wall, "clients": args.clients}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table.print_summary(summary)
    print(f"run directory: {out}  (metrics.json, {png.name}, summary.json, logs/)")
    return 0
