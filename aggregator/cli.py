"""``fedmq``: operator commands (demo, report)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aggregator import bench, demo


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
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run_demo(args)
    if args.command == "bench":
        return bench.run_inprocess(args)
    from aggregator.report import load_metrics, plot_metrics, summarize

    rounds = load_metrics(args.run_dir)
    png = plot_metrics(rounds, args.run_dir / "metrics.png")
    print(json.dumps(summarize(rounds), indent=1))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
