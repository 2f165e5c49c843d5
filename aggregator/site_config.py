"""A site aggregator's settings (docs/sites.md): their flags and range checks.

The fields live in :class:`aggregator.config.AggregatorConfig`; the role itself is
:mod:`aggregator.site_service`. No torch, no MQTT.
"""

from __future__ import annotations

import argparse
from typing import Any

from aggregator.strategy_config import dp_enabled
from shared.compression.quantize import CodecError
from shared.compression.registry import KNOWN, resolve_codec
from shared.protocol.topics import TopicError, validate_name

DESCRIPTIONS = {
    "site": "run as this site's aggregator beside its bridged site broker (docs/sites.md): one "
    "partial aggregate of the site's devices per central round; unset: the central aggregator",
    "central_key": "a site aggregator's pinned key (PEM) of the central aggregator: it follows "
    "only announcements signed by it (`broker init --site` writes it)",
    "partial_codec": "a site aggregator's codec for its partials (e.g. `fp16`, more precise "
    "than the devices' `int8` for twice its bytes); empty: each round's announced codec",
    "max_site_devices": "central aggregator: the most devices a site's status may claim "
    "(more counts as this many); a site's partial may claim at most `max_samples` per device",
    "site_margin": "share of a central round's remaining time a site keeps for its partial's "
    "trip up the bridge (the site closes its share earlier by that much)",
}


def site_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(holds, message) of every site setting; messages start with the key."""
    if cfg.max_site_devices < 1:
        return [(False, "max-site-devices must be ≥ 1")]
    if cfg.site is None:
        return [(cfg.central_key is None, "central-key is a site aggregator's: give --site too")]
    try:
        validate_name("site", cfg.site)
        name_ok, name_problem = True, ""
    except TopicError as exc:
        name_ok, name_problem = False, f"site: {exc}"
    return [
        (name_ok, name_problem),
        (0 <= cfg.site_margin < 1, "site-margin must be in [0, 1)"),
        (not cfg.partial_codec or _known(cfg.partial_codec), f"partial-codec: one of {KNOWN}"),
        (
            cfg.robust == "fedavg" and not dp_enabled(cfg),
            "site: a site sums its devices' updates with FedAvg; a robust rule or differential "
            "privacy belongs to the central aggregator (which then needs the devices flat)",
        ),
        (cfg.mode == "sync", "site: sites take part in synchronous rounds only"),
    ]


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the site aggregator role (docs/sites.md)."""
    g = parser.add_argument_group("site aggregator (docs/sites.md)")
    g.add_argument(
        "--site",
        help="run as this site's aggregator beside its bridged broker: one partial aggregate "
        "of the site's devices per central round",
    )
    g.add_argument(
        "--central-key",
        help="the central aggregator's model-signing public key (PEM): follow only "
        "announcements it signed",
    )
    g.add_argument(
        "--max-site-devices",
        type=int,
        help="central: the most devices one site may claim (default 1000)",
    )
    g.add_argument(
        "--partial-codec",
        help="codec of the site's partials (default: each round's announced codec)",
    )
    g.add_argument(
        "--site-margin",
        type=float,
        help="share of a central round's remaining time kept for the partial's trip up "
        "(default 0.2)",
    )


def _known(codec: str) -> bool:
    try:
        resolve_codec(codec)
    except CodecError:
        return False
    return True
