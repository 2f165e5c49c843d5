"""``fedmq-agent``: the training agent, ``predict`` (predict files) and ``serve`` (MQTT).

``predict`` and ``serve`` need onnxruntime only: nothing here imports torch at load time.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge_agent.config import AgentConfig, add_arguments, from_args
from shared.mqtt.base import Connector, TransportError
from shared.runtime.data import DataFormatError

if TYPE_CHECKING:
    from edge_agent.inference import Predictions
    from edge_agent.serve import ServeConfig

log = logging.getLogger("fedmq.agent")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmq-agent``: the training agent, or ``predict`` / ``serve``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("predict", "serve"):
        return _inference_main(argv)
    parser = argparse.ArgumentParser(
        prog="fedmq-agent",
        description="fedmq edge agent: trains in every round it is selected for",
        epilog="on-device inference: fedmq-agent predict --help, fedmq-agent serve --help",
    )
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=_LOG_FORMAT)
    from edge_agent.agent import EdgeAgent

    try:
        cfg = from_args(args)
        agent = EdgeAgent(cfg, _mqtt(cfg))
    except (ValueError, DataFormatError, OSError, TransportError) as exc:
        log.error("%s", exc)
        return 1
    return _run_until_signalled(agent)


def _mqtt(cfg: AgentConfig | ServeConfig) -> Connector:
    """The real transport: paho-mqtt to ``cfg.broker`` (imported here, not at start-up)."""
    from shared.mqtt.connector import connector_for

    return connector_for(cfg)


def _inference_main(argv: list[str]) -> int:
    """``fedmq-agent predict ...`` and ``fedmq-agent serve ...``."""
    from edge_agent.serve import add_serve_arguments

    parser = argparse.ArgumentParser(prog="fedmq-agent", description="fedmq on-device inference")
    sub = parser.add_subparsers(dest="command", required=True)
    p_predict = sub.add_parser("predict", help="predict files with an ONNX model")
    p_predict.add_argument("--model", required=True, help=".onnx file or fedmq ONNX frame")
    p_predict.add_argument("files", nargs="+", type=Path, help=".npz, IDX, images, image dirs")
    p_predict.add_argument(
        "--task",
        choices=("classification", "regression"),
        default="classification",
        help="what a bare .onnx file predicts (a fedmq ONNX frame says it itself)",
    )
    p_predict.add_argument("--limit", type=int, help="print at most this many lines")
    p_predict.add_argument("--threads", type=int, default=1)
    p_serve = sub.add_parser("serve", help="serve predictions over MQTT with the latest model")
    add_serve_arguments(p_serve)
    for p in (p_predict, p_serve):
        p.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=_LOG_FORMAT)
    if args.command == "predict":
        return run_predict(args)
    return _run_serve(args)


def run_predict(args: argparse.Namespace) -> int:
    """``fedmq-agent predict``: one line per sample; accuracy (labels) or RMSE (targets)."""
    from edge_agent.inference import MAX_BATCH, InferenceError, OnnxModel, concat, load_inputs
    from shared.protocol.onnx_frame import OnnxFrameError

    try:
        model = OnnxModel.from_bytes(Path(args.model).read_bytes(), args.threads, args.task)
        inputs = load_inputs(list(args.files), model.input_shape)
    except (OSError, InferenceError, OnnxFrameError, DataFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    # MAX_BATCH bounds one network request; a local file of any size goes through in slices.
    pred = concat(
        [model.predict(inputs.x[i : i + MAX_BATCH]) for i in range(0, len(inputs.x), MAX_BATCH)]
    )
    elapsed = time.perf_counter() - t0
    shown = len(pred) if args.limit is None else min(args.limit, len(pred))
    for i in range(shown):
        print(f"{inputs.names[i]}\t{_prediction_text(pred, i)}")
    summary = f"{len(pred)} samples in {elapsed * 1000:.1f} ms"
    print(summary + _quality_text(pred, inputs.labels), file=sys.stderr)
    return 0


def _prediction_text(pred: Predictions, i: int) -> str:
    """One sample's prediction: ``class<TAB>confidence``, or its values comma-separated."""
    if pred.values is not None:
        return ",".join(f"{float(v):.6g}" for v in pred.values[i])
    assert pred.labels is not None and pred.confidence is not None
    return f"{int(pred.labels[i])}\t{float(pred.confidence[i]):.4f}"


def _quality_text(pred: Predictions, y: np.ndarray | None) -> str:
    """``, accuracy ...`` against labels, ``, rmse ... mae ...`` against targets, or ""."""
    if y is None:
        return ""
    if pred.values is not None and y.dtype.kind == "f":
        err = pred.values - y.reshape(len(y), -1)
        if err.shape != pred.values.shape:
            return ""
        return f", rmse {float(np.sqrt((err**2).mean())):.4f}, mae {float(np.abs(err).mean()):.4f}"
    if pred.labels is not None and y.dtype.kind in "iu":
        return f", accuracy {float((pred.labels == y).mean()):.4f}"
    return ""


def _run_serve(args: argparse.Namespace) -> int:
    from edge_agent.serve import InferenceServer, serve_config

    try:
        cfg = serve_config(args)
        server = InferenceServer(cfg, _mqtt(cfg))
    except (ValueError, OSError, TransportError) as exc:
        log.error("%s", exc)
        return 1
    return _run_until_signalled(server)


class _Stoppable(Protocol):
    def run(self) -> int: ...
    def stop(self) -> None: ...


def _run_until_signalled(worker: _Stoppable) -> int:
    """Run ``worker``; SIGTERM (systemd, the demo) or SIGINT end it cleanly (offline, then
    disconnect) instead of killing it mid-message."""
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    try:
        return worker.run()
    except TransportError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
