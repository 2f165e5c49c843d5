"""Named aggregator strategies: what ``fedmq bench strategies`` compares and ``fedmq demo``
runs (docs/strategies.md, "Benchmarks").

A preset is a dict of aggregator settings (``AggregatorConfig`` field → flag value); every
other setting stays at the aggregator's default.
"""

from __future__ import annotations

# Aggregator settings per named strategy; every other setting is the aggregator's default.
# "fedavg" is FedAvg without any defence (no clipping, no norm bound): what an attack does
# to an undefended federation. "default" is the aggregator's defaults.
PRESETS: dict[str, dict[str, str]] = {
    "fedavg": {"clip": "none", "max_update_norm": "inf"},
    "default": {},
    "fedavgm": {"strategy": "fedavgm", "server_lr": "1", "server_momentum": "0.5"},
    "fedavgm-cosine": {
        "strategy": "fedavgm",
        "server_lr": "1",
        "server_momentum": "0.5",
        "lr_schedule": "cosine",
    },
    "fedadam": {"strategy": "fedadam", "server_lr": "0.03"},
    "fedyogi": {"strategy": "fedyogi", "server_lr": "0.03"},
    "fedadagrad": {"strategy": "fedadagrad", "server_lr": "0.03"},
    "fedprox": {"proximal_mu": "0.01"},
    "median": {"robust": "median"},
    "trimmed-mean": {"robust": "trimmed-mean", "trim_fraction": "0.2"},
    "krum": {"robust": "krum", "byzantine": "2", "min_clients": "7"},
    "multi-krum": {"robust": "multi-krum", "byzantine": "2", "min_clients": "7"},
}


def aggregator_flags(settings: dict[str, str]) -> list[str]:
    """``--key value`` for every setting (``_`` → ``-``)."""
    flags: list[str] = []
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return flags
