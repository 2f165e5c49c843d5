"""``fedmq``: operator commands (demo, report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aggregator import bench, demo, ops_cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmq``."""
    parser = argparse.ArgumentParser(prog="fedmq", description="federated learning over MQTT")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a local federation: broker, aggregator, agents")
    demo.add_arguments(p_demo)
    p_report = sub.add_parser("report", help="plot and summarise a run directory")
    p_report.add_argument("run_dir", type=Path)
    p_bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = p_bench.add_subparsers(dest="bench", required=True)
    p_inproc = bench_sub.add_parser(
        "inprocess", help="the demo's federation in one process (the round-time yardstick)"
    )
    bench.add_arguments(p_inproc)
    from aggregator import bench_compression

    bench_compression.add_arguments(
        bench_sub.add_parser(
            "compression", help="one federation per update codec: bytes vs accuracy"
        )
    )
    from aggregator import bench_codecs_inprocess

    bench_codecs_inprocess.add_arguments(
        bench_sub.add_parser(
            "codecs-inprocess", help="update codecs in one process: bytes vs accuracy (research)"
        )
    )
    ops_cli.add_commands(sub)
    from aggregator import provision  # broker init, device add

    provision.add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command in ("broker", "device"):
        return provision.run(args)
    if args.command in ops_cli.COMMANDS:
        return ops_cli.run(args)
    if args.command == "demo":
        return demo.run_demo(args)
    if args.command == "bench" and args.bench == "compression":
        return bench_compression.run_compression(args)
    if args.command == "bench" and args.bench == "codecs-inprocess":
        return bench_codecs_inprocess.run(args)
    if args.command == "bench":
        return bench.run_inprocess(args)
    from aggregator.report import load_metrics, plot_metrics, print_summary, summarize

    rounds = load_metrics(args.run_dir)
    png = plot_metrics(rounds, args.run_dir / "metrics.png")
    print_summary(summarize(rounds), rounds)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
