"""``fedmq-aggregator``: run the aggregator service against a real broker.

With ``--site NAME``, the site aggregator instead (:mod:`aggregator.site_service`). The service
(:mod:`aggregator.service`) takes its transport and clock from here: paho-mqtt to
``--broker`` and the system clock.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aggregator.config import AggregatorConfig, add_arguments, from_args
from aggregator.service import AggregatorService
from aggregator.site_service import SiteAggregator
from shared.clock import SystemClock
from shared.mqtt.base import Connector, TransportError
from shared.mqtt.reassembly import ReassemblyLimits
from shared.protocol.topics import Topics

log = logging.getLogger("fedmq.aggregator")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmq-aggregator``."""
    parser = argparse.ArgumentParser(
        prog="fedmq-aggregator", description="fedmq aggregator service"
    )
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = from_args(args)
        if cfg.site is not None:  # a site's aggregator (docs/sites.md)
            return SiteAggregator(cfg, _mqtt(cfg), SystemClock()).run()
        return AggregatorService(cfg, _mqtt(cfg), SystemClock()).run()
    except (ValueError, OSError, TransportError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


def _mqtt(cfg: AggregatorConfig) -> Connector:
    """The real transport: paho-mqtt to ``cfg.broker`` (imported here, not at start-up).

    Chunked updates are reassembled within one update's bytes per device (a device cannot
    starve the others or exhaust memory), and retained updates are cleared from the broker.
    """
    from shared.mqtt.connector import connector_for

    return connector_for(
        cfg,
        reassembly=ReassemblyLimits.one_update_per_sender(cfg.max_update_bytes),
        unretained=(Topics(cfg.federation).update_any,),
    )


if __name__ == "__main__":
    sys.exit(main())
