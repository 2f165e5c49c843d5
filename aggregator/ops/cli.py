"""``fedmq``: the operator's commands (demo, bench, report, monitor, export, broker, device).

Sub-commands import what they need when they run, so ``fedmq --help`` stays cheap (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from aggregator.ops import demo
from aggregator.ops.bench import inprocess as bench_inprocess


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmq``."""
    parser = argparse.ArgumentParser(prog="fedmq", description="federated learning over MQTT")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a local federation: broker, aggregator, agents")
    demo.add_arguments(p_demo)
    p_report = sub.add_parser("report", help="plot and summarise a run directory")
    p_report.add_argument("run_dir", type=Path)
    _add_bench_commands(sub)
    _add_model_commands(sub)
    from aggregator.ops import provision_cli  # broker init, device add

    provision_cli.add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command in ("broker", "device"):
        return provision_cli.run(args)
    if args.command == "export":
        from aggregator.ops.export import run_export

        return run_export(args)
    if args.command == "monitor":
        from aggregator.ops.monitor_view import run_monitor

        return run_monitor(args)
    if args.command == "demo":
        return demo.run_demo(args)
    if args.command == "bench":
        return _run_bench(args)
    return _run_report(args.run_dir)


def _add_bench_commands(sub: Any) -> None:
    p_bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = p_bench.add_subparsers(dest="bench", required=True)
    bench_inprocess.add_arguments(
        bench_sub.add_parser(
            "inprocess", help="the demo's federation in one process (the round-time yardstick)"
        )
    )
    from aggregator.ops.bench import (
        async_mode,
        codecs,
        compression,
        fleet,
        ingest,
        sites,
        strategies,
    )

    strategies.add_arguments(
        bench_sub.add_parser(
            "strategies",
            help="one federation per strategy, clean and under attack: accuracy per round",
        )
    )
    compression.add_arguments(
        bench_sub.add_parser(
            "compression", help="one federation per update codec: bytes vs accuracy"
        )
    )
    codecs.add_arguments(
        bench_sub.add_parser(
            "codecs-inprocess", help="update codecs in one process: bytes vs accuracy (research)"
        )
    )
    ingest.add_arguments(
        bench_sub.add_parser(
            "ingest", help="updates per second the real aggregator validates and sums"
        )
    )
    fleet.add_arguments(
        bench_sub.add_parser(
            "fleet", help="N real agents (many per process), real broker and aggregator, R rounds"
        )
    )
    async_mode.add_arguments(
        bench_sub.add_parser(
            "async",
            help="one heterogeneous federation synchronously and asynchronously (FedBuff): "
            "wall time to a target accuracy",
        )
    )
    sites.add_arguments(
        bench_sub.add_parser(
            "sites",
            help="the same devices flat and behind bridged site brokers: WAN bytes, accuracy, "
            "round time",
        )
    )


def _run_bench(args: argparse.Namespace) -> int:
    from aggregator.ops.bench import async_mode, codecs, compression, fleet, ingest, strategies

    if args.bench == "sites":
        from aggregator.ops.bench.sites import run_sites

        return run_sites(args)
    if args.bench == "async":
        return async_mode.run_async_bench(args)
    if args.bench == "strategies":
        return strategies.run_strategies(args)
    if args.bench == "compression":
        return compression.run_compression(args)
    if args.bench == "ingest":
        return ingest.run_ingest(args)
    if args.bench == "fleet":
        return fleet.run_fleet(args)
    if args.bench == "codecs-inprocess":
        return codecs.run(args)
    return bench_inprocess.run_inprocess(args)


def _add_model_commands(sub: Any) -> None:
    """``fedmq export`` and ``fedmq monitor`` (their heavy imports wait until they run)."""
    from aggregator.ops.monitor_view import add_monitor_arguments

    p_export = sub.add_parser("export", help="export a saved global model (.fmq) to ONNX")
    p_export.add_argument("model_file", help="a saved global-model frame (global_model.fmq)")
    p_export.add_argument("--out", required=True, help="where to write the .onnx")
    p_export.add_argument("--model", help="architecture, when the frame does not name it")
    p_export.add_argument("--input-shape", help="C,H,W, when the frame does not name it")
    p_export.add_argument("--num-classes", type=int, help="when the frame does not name it")
    p_export.add_argument("--eval-data", help="held-out data for the parity check")
    p_export.add_argument("--frame", action="store_true", help="write a fedmq ONNX frame")
    p_monitor = sub.add_parser("monitor", help="live view of a federation from its MQTT topics")
    add_monitor_arguments(p_monitor)


def _run_report(run_dir: Path) -> int:
    from aggregator.ops.report import load_metrics, plot_metrics, print_summary, summarize

    rounds = load_metrics(run_dir)
    png = plot_metrics(rounds, run_dir / "metrics.png")
    print_summary(summarize(rounds), rounds)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
