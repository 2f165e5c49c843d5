"""Operator sub-commands of ``fedmq`` kept out of :mod:`aggregator.cli`: export, monitor."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("export", "monitor")


def add_commands(sub: Any) -> None:
    """Register ``fedmq export`` and ``fedmq monitor`` on ``fedmq``'s sub-parsers."""
    from aggregator.monitor_view import add_monitor_arguments

    p_export = sub.add_parser("export", help="export a saved global model (.fmq) to ONNX")
    # Importing onnx_export pulls in torch: its flags are declared here, cheaply.
    p_export.add_argument("model_file", help="a saved global-model frame (global_model.fmq)")
    p_export.add_argument("--out", required=True, help="where to write the .onnx")
    p_export.add_argument("--model", help="architecture, when the frame does not name it")
    p_export.add_argument("--input-shape", help="C,H,W, when the frame does not name it")
    p_export.add_argument("--num-classes", type=int, help="when the frame does not name it")
    p_export.add_argument("--eval-data", help="held-out data for the parity check")
    p_export.add_argument("--frame", action="store_true", help="write a fedmq ONNX frame")
    p_monitor = sub.add_parser("monitor", help="live view of a federation from its MQTT topics")
    add_monitor_arguments(p_monitor)


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`."""
    if args.command == "export":
        from aggregator.onnx_export import run_export

        return run_export(args)
    from aggregator.monitor_view import run_monitor

    return run_monitor(args)
