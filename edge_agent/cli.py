"""``fedmq-agent``: run a device's agent."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from edge_agent.config import add_arguments, from_args
from shared.data import DataFormatError
from shared.transport import TransportError

log = logging.getLogger("fedmq.agent")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmq-agent``: the training agent, or ``predict`` / ``serve``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("predict", "serve"):
        # Inference-only devices: onnxruntime, no torch (edge_agent.inference).
        from edge_agent.inference import main as inference_main

        return inference_main(argv)
    parser = argparse.ArgumentParser(prog="fedmq-agent", description="fedmq edge agent")
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from edge_agent.agent import EdgeAgent

    try:
        agent = EdgeAgent(from_args(args))
    except (ValueError, DataFormatError, OSError) as exc:
        log.error("%s", exc)
        return 1
    # SIGTERM (systemd, the demo) ends the agent cleanly: offline status, then disconnect.
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        return agent.run()
    except TransportError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        agent.stop()
        return 130


if __name__ == "__main__":
    sys.exit(main())
