"""``fedmq bench compression``: the same federation once per update codec, over real MQTT.

For each codec: a fresh Mosquitto, one aggregator and N agent processes (the ``fedmq demo``
machinery), same data partition, seeds and rounds. From each run's ``metrics.json``: bytes up
and down per client-round and the final test accuracy; plus a micro-benchmark of the codec's
encode/decode throughput on the model's real tensor shapes. Writes ``compression.md``,
``compression.json`` and ``compression.png`` into the output directory. Every run except the
``fp32`` baseline downloads global deltas with ``--download-codec`` (default int8); the
``fp32`` row is the uncompressed (Flower-like) baseline both ways: full models down.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.ops.demo import (
    add_mqtt_version_argument,
    add_task_arguments,
    prepare_data,
    start_processes,
    stop_processes,
)
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.report import load_metrics
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame
from shared.protocol.global_delta import DOWNLOAD_CODECS

# Per model: the codecs compared by default, and rounds × samples per client sized for
# ≤ ~30 minutes on a 2-core machine (10 agents share the cores). The rank / density of the
# compressed codecs is chosen for ≥ 100× fewer upload bytes than fp32 on that model.
SIZING: dict[str, dict[str, Any]] = {
    "lenet5": {
        "rounds": 10,
        "samples": 2000,
        "codecs": "fp32,int8,topk1:0.025@warmup1,lowrank:4+int4",
    },
    "cnn": {"rounds": 10, "samples": 1000, "codecs": "fp32,lowrank:16+int4"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags: the demo's task flags plus the codecs to compare."""
    add_task_arguments(p)
    p.set_defaults(rounds=None)
    p.add_argument(
        "--codecs",
        help="comma-separated codec names (default per model: "
        + "; ".join(f"{m}: {v['codecs']}" for m, v in SIZING.items())
        + ")",
    )
    p.add_argument(
        "--download-codec",
        default="int8",
        choices=DOWNLOAD_CODECS,
        help="global deltas for every run except the fp32 baseline, which always downloads "
        "the full model (default int8)",
    )
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per codec run")
    p.add_argument("--out", type=Path, help="output directory (default runs/compression-<time>)")
    add_mqtt_version_argument(p)


def run_compression(args: argparse.Namespace) -> int:
    """Run every codec, then write the table and plot; return 0 when every run finished."""
    sizing = SIZING.get(args.model, SIZING["lenet5"])
    args.rounds = args.rounds or sizing["rounds"]
    if args.samples_per_client is None:
        args.samples_per_client = sizing["samples"]
    args.codecs = args.codecs or sizing["codecs"]
    args.samples_per_client = args.samples_per_client or None  # 0: each client's whole share
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    out: Path = args.out or Path("runs") / datetime.now().strftime("compression-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"preparing {args.dataset}: {args.clients} clients, {args.partition} α={args.alpha}")
    clients, test = prepare_data(args, out / "data")
    rows = []
    for codec in codecs:
        print(f"--- {codec}: {args.rounds} rounds, {args.model} ...", flush=True)
        row = _run_one(args, codec, clients, test, out / _slug(codec))
        row.update(_throughput(args, codec))
        rows.append(row)
        print(f"    {json.dumps(row)}", flush=True)
    _relative_to_fp32(rows, _raw_fp32_bytes(args.model))
    command = "fedmq bench compression " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (
            ("model", args.model),
            ("rounds", args.rounds),
            ("samples_per_client", args.samples_per_client or 0),
            ("clients", args.clients),
            ("codecs", args.codecs),
            ("download_codec", args.download_codec),
        )
    )
    result = {"command": command, "task": _task(args), "rows": rows}
    (out / "compression.json").write_text(json.dumps(result, indent=1))
    (out / "compression.md").write_text(markdown_table(rows, command))
    _plot(
        rows, out / "compression.png", f"{args.model}, {args.clients} clients, {args.rounds} rounds"
    )
    print(markdown_table(rows, command))
    print(f"written: {out / 'compression.md'}, compression.json, compression.png")
    return 0 if all(r["finished"] for r in rows) else 1


def _run_one(
    args: argparse.Namespace, codec: str, clients: list[Path], test: Path, out: Path
) -> dict[str, Any]:
    run_args = copy.copy(args)
    run_args.codec, run_args.fraction, run_args.min_clients = codec, 1.0, args.clients
    # The fp32 row is the uncompressed (Flower-like) baseline: full models down as well.
    run_args.download_codec = download_codec(codec, args.download_codec)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with LocalBroker(out / "broker") as broker:
        aggregator, agents = start_processes(run_args, broker.url, clients, test, out)
        try:
            aggregator.wait(args.timeout)
        except subprocess.TimeoutExpired:
            print(f"    {codec}: no result after {args.timeout:.0f}s, stopping it")
        finally:
            stop_processes([aggregator])
            stop_processes(agents)
    wall = time.monotonic() - t0
    rounds = load_metrics(out) if (out / "metrics.json").exists() else []
    updates = sum(int(r["accepted"]) for r in rounds) or 1
    last = rounds[-1] if rounds else {}
    return {
        "codec": codec,
        "download_codec": run_args.download_codec,
        "finished": aggregator.returncode == 0 and len(rounds) == args.rounds,
        "rounds": len(rounds),
        # The accepted update frames (what a codec costs). Under load agents re-send updates
        # whose receipt is late; those re-sends are in bytes_up, not in this figure.
        "bytes_up_per_client_round": sum(
            int(r.get("update_bytes") or r["bytes_up"]) for r in rounds
        )
        / updates,
        "bytes_received_per_client_round": sum(int(r["bytes_up"]) for r in rounds) / updates,
        # Measured: what the agents report having downloaded (models and deltas, round 1's
        # full initial model included), per accepted update.
        "bytes_down_per_client_round": sum(int(r["bytes_down"]) for r in rounds) / updates,
        # From round 2 on, agents that follow the federation hold the previous model.
        "bytes_down_per_client_round_after_1": (
            sum(int(r["bytes_down"]) for r in rounds[1:])
            / (sum(int(r["accepted"]) for r in rounds[1:]) or 1)
        ),
        "model_frame_bytes": last.get("model_bytes", 0),
        "delta_frame_bytes_mean": (
            sum(int(r.get("delta_bytes", 0)) for r in rounds) / len(rounds) if rounds else 0
        ),
        "final_test_accuracy": last.get("test_accuracy"),
        "accuracy_per_round": [r.get("test_accuracy") for r in rounds],
        "wall_time_s": round(wall, 1),
    }


def download_codec(codec: str, requested: str) -> str:
    """The download codec of a codec's run: ``none`` for the fp32 baseline."""
    return "none" if codec == "fp32" else requested


@functools.cache
def _model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``model`` on 28×28 inputs, 10 classes (built once per process)."""
    from shared.runtime.modelio import param_shapes
    from shared.runtime.models import build_model

    return {n: tuple(s) for n, s in param_shapes(build_model(model, (1, 28, 28), 10)).items()}


def _raw_fp32_bytes(model: str) -> int:
    """4 bytes per parameter: what an uncompressed fp32 update carries (Flower sends this)."""
    return 4 * sum(int(np.prod(s)) for s in _model_shapes(model).values())


def _throughput(args: argparse.Namespace, codec: str, repeats: int = 5) -> dict[str, float]:
    """Encode/decode MB/s (fp32-equivalent) of one update frame on the model's real shapes."""
    shapes = _model_shapes(args.model)
    rng = np.random.default_rng(args.seed)
    # A trained delta is roughly Gaussian per tensor; scale matters little to the codecs.
    delta = {n: rng.normal(0, 0.01, size=s).astype(np.float32) for n, s in shapes.items()}
    mb = 4 * sum(v.size for v in delta.values()) / 1e6
    # A late round: codecs with a warm-up schedule are timed at their steady-state density.
    header = FrameHeader(
        kind="update", federation="bench", round=10_000, codec=codec, client_id="c", num_samples=1
    )
    encode_s, decode_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        frame = encode_frame(header, delta, rng=rng).payload
        encode_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode_frame(frame)
        decode_s.append(time.perf_counter() - t)
    return {
        "encode_mb_s": round(mb / min(encode_s), 1),
        "decode_mb_s": round(mb / min(decode_s), 1),
    }


def _relative_to_fp32(rows: list[dict[str, Any]], raw_fp32: int) -> None:
    """Ratios against the fp32 run's frames (zstd'd) and against raw fp32 (4 bytes/param)."""
    base = next((r for r in rows if r["codec"] == "fp32"), None)
    for r in rows:
        up = r["bytes_up_per_client_round"]
        r["ratio_vs_fp32"] = (base["bytes_up_per_client_round"] / up) if base and up else None
        r["raw_fp32_bytes"] = raw_fp32
        r["ratio_vs_raw_fp32"] = raw_fp32 / up if up else None
        down = r["bytes_down_per_client_round"]
        r["down_ratio_vs_fp32"] = (
            (base["bytes_down_per_client_round"] / down) if base and down else None
        )
        acc, ref = r["final_test_accuracy"], base and base["final_test_accuracy"]
        r["accuracy_diff_vs_fp32"] = (acc - ref) if acc is not None and ref is not None else None


def markdown_table(rows: list[dict[str, Any]], command: str) -> str:
    """The comparison as a markdown table."""
    lines = [
        f"`{command}`",
        "",
        "| codec | download | bytes up / client-round | bytes down / client-round "
        "| bytes down, rounds ≥ 2 | up ratio vs fp32 frames | up ratio vs raw fp32 "
        "| down ratio vs fp32 | final test acc | Δacc vs fp32 (points) | encode MB/s "
        "| decode MB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio_vs_fp32']:.1f}×" if r.get("ratio_vs_fp32") else "–"
        raw = f"{r['ratio_vs_raw_fp32']:.1f}×" if r.get("ratio_vs_raw_fp32") else "–"
        down_ratio = f"{r['down_ratio_vs_fp32']:.1f}×" if r.get("down_ratio_vs_fp32") else "–"
        acc = r["final_test_accuracy"]
        diff = r.get("accuracy_diff_vs_fp32")
        lines.append(
            f"| `{r['codec']}` | `{r.get('download_codec', 'none')}` "
            f"| {r['bytes_up_per_client_round']:,.0f} "
            f"| {r['bytes_down_per_client_round']:,.0f} "
            f"| {r.get('bytes_down_per_client_round_after_1', 0):,.0f} | {ratio} | {raw} "
            f"| {down_ratio} "
            f"| {'–' if acc is None else f'{100 * acc:.2f}%'} "
            f"| {'–' if diff is None else f'{100 * diff:+.2f}'} "
            f"| {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |"
            + ("" if r["finished"] else " (unfinished)")
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_a) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["codec"] for r in rows]
    ax_b.bar(names, [r["bytes_up_per_client_round"] / 1e3 for r in rows])
    ax_b.set(yscale="log", ylabel="kB up per client-round (log)", title="upload size")
    for r in rows:
        accs = [100 * a for a in r["accuracy_per_round"] if a is not None]
        ax_a.plot(range(1, len(accs) + 1), accs, "o-", label=r["codec"])
    ax_a.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    ax_b.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _task(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("dataset", "model", "clients", "partition", "alpha", "rounds", "samples_per_client")
    return {k: getattr(args, k) for k in keys} | {"local_epochs": args.local_epochs}


def _slug(codec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", codec)
