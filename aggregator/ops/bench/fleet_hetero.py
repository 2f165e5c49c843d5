"""``fedmq bench fleet`` on a heterogeneous fleet: slow and part-time devices, either mode.

The same settings as ``fedmq bench async`` and the agent's own flags (docs/async.md):
``--slow-fraction F`` of the devices, drawn with ``--seed`` exactly as ``fedmq bench async``
draws them (:func:`~aggregator.ops.bench.async_mode.slow_devices`: the same devices are slow in
every run of the same fleet size), train ``--slowdown X`` times as long; every device's batches
last at least ``--min-batch-ms``; with ``--online P`` every device is on-line a fraction P of
the time in random spells (``edge_agent/availability.py``, seeded by its client id). Each
agent of ``fleet_agents`` gets these through its own ``AgentConfig``, as ``fedmq-agent`` does.
``--mode async`` runs the aggregator as FedBuff (``--buffer``, ``--max-staleness``,
``--staleness-weight``): the two modes compared on the same simulated fleet.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from aggregator.ops.bench.async_mode import mode_settings, slow_devices
from aggregator.ops.strategy_presets import aggregator_flags

MODES = ("sync", "async")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The heterogeneity and mode flags of ``fedmq bench fleet``."""
    g = p.add_argument_group("heterogeneous fleet (docs/async.md)")
    g.add_argument(
        "--slow-fraction",
        type=_unit("slow-fraction", low_open=False),
        default=0.0,
        help="share of slow devices, drawn with --seed (default 0: none)",
    )
    g.add_argument(
        "--slowdown", type=_slowdown, default=5.0, help="how much slower they train (default 5)"
    )
    g.add_argument(
        "--min-batch-ms",
        type=_min_batch_ms,
        default=0.0,
        help="every device's own time per batch, at least (× --slowdown; default 0: none)",
    )
    g.add_argument(
        "--online",
        type=_unit("online", low_open=True),
        default=1.0,
        help="on-line fraction of every device, in random spells (default 1: always)",
    )
    g.add_argument(
        "--online-spell-s", type=_positive_s, default=60.0, help="mean on-line spell (default 60)"
    )
    g.add_argument("--seed", type=int, default=0, help="draws the slow devices (default 0)")
    g.add_argument("--mode", choices=MODES, default="sync", help="aggregator mode (default sync)")
    g.add_argument("--buffer", type=int, default=10, help="async: K (default 10)")
    g.add_argument("--max-staleness", type=int, default=10, help="async: S (default 10)")
    g.add_argument("--staleness-weight", default="poly:0.5", help="async: w(s) (poly:0.5)")
    g.add_argument("--server-lr", type=float, help="server learning rate η (both modes)")
    g.add_argument(
        "--round-timeout",
        type=_positive_s,
        help="the aggregator's round deadline (default: --timeout)",
    )


def slow_clients(clients: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The slow devices of a fleet: ``fedmq bench async``'s draw over the fleet's indices."""
    return {clients[i] for i in slow_devices(len(clients), fraction, seed)}


def agent_flags(args: argparse.Namespace, ids: Sequence[str], slow: set[str]) -> list[str]:
    """``fleet_agents`` flags of one process running ``ids``: which of them are slow, and
    the settings every device shares. Nothing when the fleet is homogeneous."""
    mine = [c for c in ids if c in slow]
    out = ["--slow", ",".join(mine), "--slowdown", f"{args.slowdown:g}"] if mine else []
    if args.min_batch_ms > 0:
        out += ["--min-batch-ms", f"{args.min_batch_ms:g}"]
    if args.online < 1:
        out += ["--online", f"{args.online:g}", "--online-spell-s", f"{args.online_spell_s:g}"]
    return out


def quorum(args: argparse.Namespace, n: int) -> int:
    """``--min-clients`` for a fleet of ``n``: all of it, or half of those on-line on average
    when part-time (as ``fedmq bench async``); in async mode at most K."""
    wanted = n if args.online >= 1 else max(1, round(args.online * n / 2))
    return min(args.buffer, wanted) if args.mode == "async" else wanted


def mode_flags(args: argparse.Namespace) -> list[str]:
    """The aggregator's flags of ``--mode`` (nothing extra in the default sync mode)."""
    if args.mode == "sync" and args.server_lr is None:
        return []
    return aggregator_flags(mode_settings(args, args.mode))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What ``fleet.json`` records of the fleet's heterogeneity and the aggregator's mode."""
    keys = ["mode", "slow_fraction", "slowdown", "min_batch_ms", "online", "online_spell_s"]
    keys += ["seed", "round_timeout"]
    if args.mode == "async":
        keys += ["buffer", "max_staleness", "staleness_weight"]
    return {k: getattr(args, k) for k in keys}


def label(args: argparse.Namespace) -> str:
    """The command line's heterogeneity flags that differ from the defaults."""
    parts = [] if args.mode == "sync" else ["--mode async", f"--buffer {args.buffer}"]
    if args.mode == "async":
        parts += [f"--max-staleness {args.max_staleness}"]
        parts += [f"--staleness-weight {args.staleness_weight}"]
    if args.slow_fraction > 0:
        parts += [f"--slow-fraction {args.slow_fraction:g}", f"--slowdown {args.slowdown:g}"]
        parts += [f"--seed {args.seed}"] if args.seed else []
    if args.min_batch_ms > 0:
        parts += [f"--min-batch-ms {args.min_batch_ms:g}"]
    if args.online < 1:
        parts += [f"--online {args.online:g}", f"--online-spell-s {args.online_spell_s:g}"]
    return "".join(f" {p}" for p in parts)


def _unit(name: str, low_open: bool) -> Any:
    def parse(text: str) -> float:
        x = _float(text)
        if not (0 < x <= 1 if low_open else 0 <= x <= 1):
            raise argparse.ArgumentTypeError(f"{name} must be in {'(' if low_open else '['}0, 1]")
        return x

    return parse


def _slowdown(text: str) -> float:
    x = _float(text)
    if not 1 <= x <= 1000:  # AgentConfig's own range
        raise argparse.ArgumentTypeError("slowdown must be in [1, 1000]")
    return x


def _min_batch_ms(text: str) -> float:
    x = _float(text)
    if not 0 <= x <= 60_000:
        raise argparse.ArgumentTypeError("min-batch-ms must be in [0, 60000]")
    return x


def _positive_s(text: str) -> float:
    x = _float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return x


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
