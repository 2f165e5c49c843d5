"""The asynchronous mode's settings (FedBuff): their flags, range checks and documentation.

The fields live in :class:`aggregator.config.AggregatorConfig`; what they compute is in
:mod:`aggregator.async_rounds` and docs/async.md. No torch, no MQTT.
"""

from __future__ import annotations

import argparse
from typing import Any

from aggregator.async_rounds import MODES, AsyncConfigError, AsyncSettings, StalenessWeight
from aggregator.strategy_config import dp_enabled
from shared.protocol.messages import MAX_STALENESS


def async_settings(cfg: Any) -> AsyncSettings | None:
    """K, S and w of ``cfg`` (an AggregatorConfig) in async mode; None in sync mode."""
    if cfg.mode != "async":
        return None
    return AsyncSettings(cfg.buffer, cfg.max_staleness, StalenessWeight.parse(cfg.staleness_weight))


def async_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(holds, message) of every asynchronous setting; messages start with the key."""
    try:
        StalenessWeight.parse(cfg.staleness_weight)
        weight_ok, weight_problem = True, ""
    except AsyncConfigError as exc:
        weight_ok, weight_problem = False, str(exc)
    return [
        (cfg.mode in MODES, f"mode must be one of: {', '.join(MODES)}"),
        (cfg.buffer >= 1, "buffer must be ≥ 1"),
        (
            0 <= cfg.max_staleness <= MAX_STALENESS,
            f"max-staleness must be in [0, {MAX_STALENESS}]",
        ),
        (weight_ok, weight_problem),
        (
            cfg.mode != "async" or not dp_enabled(cfg),
            "mode async does not support differential privacy (its accountant assumes "
            "sampled rounds)",
        ),
        (
            cfg.mode != "async" or cfg.min_clients <= cfg.buffer,
            "min-clients must be ≤ buffer in mode async (a window applies at K updates)",
        ),
    ]


def add_async_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the asynchronous mode (docs/async.md)."""
    g = parser.add_argument_group("asynchronous mode (docs/async.md)")
    g.add_argument("--mode", choices=MODES, help="sync rounds (default) or async (FedBuff)")
    g.add_argument("--buffer", type=int, help="async: accepted updates per new version, K")
    g.add_argument("--max-staleness", type=int, help="async: versions an update may lag behind, S")
    g.add_argument(
        "--staleness-weight",
        help="async: w(s) = const | poly:<a> ((1+s)^-a) | hinge:<a>,<b> (default poly:0.5)",
    )


# docs/configuration.md (aggregator/ops/config_docs.py) describes these settings so.
DESCRIPTIONS = {
    "mode": "`sync`: rounds of selected devices (FedAvg); `async`: buffered asynchronous "
    "aggregation (FedBuff): every device trains on the newest model it holds, a new version "
    "every `buffer` accepted updates (docs/async.md)",
    "buffer": "`async`: K, the accepted updates that make a new model version",
    "max_staleness": "`async`: S, the versions an update's base may lag behind the current "
    "one; staler updates get a `stale` receipt",
    "staleness_weight": "`async`: w(s), the factor of an update s versions stale (weighted "
    "n·w(s)): `const` (1), `poly:<a>` ((1+s)^−a), `hinge:<a>,<b>` (1 for s ≤ b, else "
    "1/(a(s−b)+1))",
}
