"""``fedmq-sensor-example``: the sensor example end to end, over a real Mosquitto.

1. Converts a dataset bundled with sktime (:mod:`sensor_cnn.datasets`) into what devices
   would record: per-device directories of timestamped CSV files, split non-IID
   (:mod:`sensor_cnn.devices`), and the held-out split as the aggregator's evaluation
   windows (cut and standardised as a device does).
2. Starts a Mosquitto on a free loopback port, one ``fedmq-aggregator`` process and one
   ``fedmq-agent`` process per device, all configured by the dataset's TOML file; the
   model is the plugin of this package (resolved from its installed entry point, by every
   process). Prints one line per round from the ``metrics`` topic.
3. Trains the same model centrally on the union of the devices' windows for the same
   number of epochs (:mod:`sensor_cnn.centralised`) and prints both accuracies per round.

Leaves ``metrics.json``, ``summary.json``, the data and every process's log in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.ops.demo import agent_command, aggregator_command, stop_processes
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.monitor import RoundTable
from aggregator.ops.report import load_metrics
from edge_agent.config import AgentConfig
from sensor_cnn import centralised, datasets, devices
from shared.runtime.data import save_npz
from shared.settings import load_toml

FEDERATION = "sensors"
EXAMPLE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DEVICES = {"japanese-vowels": 6, "basic-motions": 4}
# Recordings every device holds at least (Dirichlet splits are redrawn until they do).
MIN_RECORDINGS = {"japanese-vowels": 10, "basic-motions": 4}
RECORDED_FROM = datetime(2024, 5, 6, 9, 0, 0)


@dataclass(frozen=True)
class Prepared:
    """The files of one run: each device's directory, and the evaluation windows."""

    devices: list[tuple[str, Path]]
    eval_data: Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The example's flags; the dataset's TOML file says the rest."""
    p = argparse.ArgumentParser(prog="fedmq-sensor-example", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(datasets.DATASETS), default="japanese-vowels")
    p.add_argument("--devices", type=int, help="default: 6 (japanese-vowels), 4 (basic-motions)")
    p.add_argument("--rounds", type=int, help="default: the config file's")
    p.add_argument("--local-epochs", type=int, help="default: the config file's")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller: more)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--config", type=Path, help="default: <dataset>.toml beside this package")
    p.add_argument("--out", type=Path, help="run directory (default runs/sensors-<time>)")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> tuple[Path, AggregatorConfig, dict[str, Any]]:
    """The config file, its aggregator settings (with this run's overrides) and its
    ``[agent]`` table."""
    path = args.config or EXAMPLE_DIR / f"{args.dataset}.toml"
    if not path.is_file():
        raise SystemExit(f"{path}: no such config file (--config names one)")
    table = load_toml(AggregatorConfig, path, "aggregator")
    table.update(
        {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs)) if v}
    )
    return path, AggregatorConfig(**table), load_toml(AgentConfig, path, "agent")


def prepare(args: argparse.Namespace, agent: dict[str, Any], data_dir: Path) -> Prepared:
    """Write each device's recordings and the evaluation windows; print the split."""
    source = AgentConfig(client_id="-", data="-", **agent).source()
    train, test = datasets.load(args.dataset, "train"), datasets.load(args.dataset, "test")
    count = args.devices or DEFAULT_DEVICES[args.dataset]
    parts = devices.split_non_iid(
        train.labels, count, args.alpha, args.seed, MIN_RECORDINGS[args.dataset]
    )
    placed = []
    for i, part in enumerate(parts):
        directory = data_dir / f"pi-{i:02d}"
        devices.write_recordings(directory, train, part, source.label_column, RECORDED_FROM)
        placed.append((f"pi-{i:02d}", directory))
    held_out = data_dir / "held-out"
    devices.write_recordings(
        held_out, test, np.arange(len(test.series)), source.label_column, RECORDED_FROM
    )
    eval_path = data_dir / "eval.npz"
    windows = devices.held_out_windows(held_out, source)
    save_npz(eval_path, windows)
    print(
        f"{args.dataset}: {len(train.series)} training recordings on {count} devices "
        f"(non-IID: Dirichlet alpha={args.alpha}), {len(test.series)} held-out recordings "
        f"({len(windows)} windows) for evaluation"
    )
    counts = devices.label_counts(train.labels, parts, len(train.class_names))
    print("recordings per class on each device (" + ", ".join(train.class_names) + "):")
    for (name, _), row in zip(placed, counts, strict=True):
        print(f"  {name}: {' '.join(f'{c:3d}' for c in row)}")
    return Prepared(placed, eval_path)


def _child_env() -> dict[str, str]:
    # One BLAS/OpenMP thread per process: several agents share a small machine's cores.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start_processes(
    url: str, config: Path, cfg: AggregatorConfig, prepared: Prepared, out: Path
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """One aggregator and one agent per device, each logging to ``out/logs``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for client_id, data in prepared.devices:
        cmd = agent_command(
            url, FEDERATION, client_id, data, "--config", str(config),
            "--state-dir", str(out / "state" / client_id), "--warm-up",
        )  # fmt: skip
        with open(logs / f"{client_id}.log", "wb") as fh:
            agents.append(
                subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env())
            )
    cmd = aggregator_command(
        url, FEDERATION, "--config", str(config),
        "--rounds", str(cfg.rounds), "--local-epochs", str(cfg.local_epochs),
        "--min-clients", str(len(prepared.devices)), "--wait-clients-timeout", "300",
        "--eval-data", str(prepared.eval_data), "--metrics-file", str(out / "metrics.json"),
    )  # fmt: skip
    with open(logs / "aggregator.log", "wb") as fh:
        aggregator = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env())
    return aggregator, agents


def run_federation(config: Path, cfg: AggregatorConfig, prepared: Prepared, out: Path) -> int:
    """The federation over a local Mosquitto; the aggregator's exit code."""
    with LocalBroker(out / "broker") as broker:
        print(f"broker {broker.url}; watch: mosquitto_sub -p {broker.port} -v -t 'fl/#'")
        table = RoundTable(broker.url, FEDERATION, cfg.rounds)
        aggregator, agents = start_processes(broker.url, config, cfg, prepared, out)
        try:
            table.follow(until=lambda: aggregator.poll() is not None)
        finally:
            stop_processes([aggregator])
            stop_processes(agents)
    if aggregator.returncode:
        print(f"the aggregator exited with {aggregator.returncode}: {out / 'logs'}")
    return aggregator.returncode or 0


def compare(
    federated: list[float], baseline: centralised.Baseline, cfg: AggregatorConfig
) -> dict[str, Any]:
    """Print both accuracies per round and the final gap; the summary."""
    print(f"\nheld-out accuracy, federated vs centralised ({cfg.local_epochs} epoch(s) per round):")
    print(f"{'round':>6} {'federated':>10} {'centralised':>12}")
    for r, (fed, cen) in enumerate(zip(federated, baseline.accuracy, strict=True), start=1):
        print(f"{r:>6} {100 * fed:>9.2f}% {100 * cen:>11.2f}%")
    gap = 100 * (baseline.accuracy[-1] - federated[-1])
    last = min(5, len(federated))  # single rounds wobble by a point: their mean too
    fed_mean = 100 * sum(federated[-last:]) / last
    cen_mean = 100 * sum(baseline.accuracy[-last:]) / last
    print(
        f"after {len(federated)} rounds: federated {100 * federated[-1]:.2f}%, centralised "
        f"{100 * baseline.accuracy[-1]:.2f}% ({baseline.samples} windows pooled): "
        f"the federation is {abs(gap):.2f} points {'below' if gap >= 0 else 'above'} it"
    )
    print(f"mean of the last {last} rounds: federated {fed_mean:.2f}%, centralised {cen_mean:.2f}%")
    return {
        "rounds": len(federated),
        "local_epochs": cfg.local_epochs,
        "federated_accuracy": federated,
        "centralised_accuracy": baseline.accuracy,
        "gap_points": gap,
        "federated_last_mean": fed_mean / 100,
        "centralised_last_mean": cen_mean / 100,
        "centralised_windows": baseline.samples,
        "centralised_train_s": baseline.train_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Prepare the data, run the federation, train the baseline, compare."""
    args = parse_args(argv)
    config, cfg, agent = load_config(args)
    out: Path = args.out or Path("runs") / datetime.now().strftime("sensors-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args, agent, out / "data")
    t0 = time.monotonic()
    code = run_federation(config, cfg, prepared, out)
    if code:
        return code
    wall = time.monotonic() - t0
    federated = [float(r["test_accuracy"]) for r in load_metrics(out)]
    print("\ncentralised: the same model on the union of the devices' windows ...")
    parts = centralised.device_windows(agent, prepared.devices)
    baseline = centralised.train_centralised(cfg, parts, prepared.eval_data, len(federated))
    summary = compare(federated, baseline, cfg) | {
        "dataset": args.dataset,
        "devices": len(prepared.devices),
        "alpha": args.alpha,
        "federation_wall_s": wall,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"run directory: {out} (metrics.json, summary.json, data/, logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
