"""The aggregator's strategy settings: server optimizer, aggregation rule, clipping, DP, FedProx.

The fields live in :class:`aggregator.config.AggregatorConfig` (one settings schema: TOML,
environment and flags alike); their flags, range checks and documentation live here, next to
each other. What they compute: docs/strategies.md. No torch, no MQTT.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from aggregator.privacy import METHODS as ACCOUNTANTS
from aggregator.robust import DEFAULT_MAX_ROUND_MEMORY, RULES
from aggregator.server_opt import STRATEGIES
from shared.protocol.messages import MAX_PROXIMAL_MU

CLIP_MODES = ("none", "fixed", "adaptive")
LR_SCHEDULES = ("constant", "cosine")
ROBUST_RULES = tuple(RULES)


def dp_enabled(cfg: Any) -> bool:
    """True when client-level DP is configured (a noise multiplier or a budget ε)."""
    return cfg.dp_noise_multiplier is not None or cfg.dp_epsilon is not None


def scheduled_lr(cfg: Any, round_id: int) -> float:
    """The devices' learning rate in round ``round_id`` (1-based) of ``cfg.rounds``.

    ``cosine`` (Loshchilov & Hutter 2017, without restarts): λ = f + (1 − f)·½(1 + cos(π·(t −
    1)/T)) times ``lr``, from ``lr`` in round 1 towards f·``lr`` (f = ``lr_final``); rounds past
    T stay at f·``lr``. A pure function of the round: a resumed run announces what the
    uninterrupted one would.
    """
    if cfg.lr_schedule == "constant":
        return float(cfg.lr)
    f = cfg.lr_final
    progress = min(max(round_id - 1, 0) / cfg.rounds, 1.0)
    return float(cfg.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress))))


def strategy_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(holds, message) of every strategy setting's range; messages start with the key."""
    lr = cfg.server_lr
    checks = [
        (cfg.strategy in STRATEGIES, f"strategy must be one of: {', '.join(STRATEGIES)}"),
        (lr is None or (lr > 0 and math.isfinite(lr)), "server-lr must be positive and finite"),
        (0 <= cfg.server_momentum < 1, "server-momentum must be in [0, 1)"),
        (0 <= cfg.beta1 < 1, "beta1 must be in [0, 1)"),
        (0 <= cfg.beta2 < 1, "beta2 must be in [0, 1)"),
        (cfg.tau > 0 and math.isfinite(cfg.tau), "tau must be positive and finite"),
        (cfg.robust in RULES, f"robust must be one of: {', '.join(ROBUST_RULES)}"),
        (0 <= cfg.trim_fraction < 0.5, "trim-fraction must be in [0, 0.5)"),
        (cfg.byzantine >= 0, "byzantine must be ≥ 0"),
        (cfg.krum_keep is None or cfg.krum_keep >= 1, "krum-keep must be ≥ 1"),
        (cfg.max_round_memory > 0, "max-round-memory must be > 0"),
        (cfg.clip in CLIP_MODES, f"clip must be one of: {', '.join(CLIP_MODES)}"),
        (
            cfg.clip_bound is None or (cfg.clip_bound > 0 and math.isfinite(cfg.clip_bound)),
            "clip-bound must be positive and finite",
        ),
        (
            cfg.clip != "fixed" or cfg.clip_bound is not None or dp_enabled(cfg),
            "clip-bound is required by --clip fixed (with DP: --dp-clip)",
        ),
        (0 < cfg.clip_quantile < 1, "clip-quantile must be in (0, 1)"),
        (cfg.clip_lr > 0 and math.isfinite(cfg.clip_lr), "clip-lr must be positive and finite"),
        (
            cfg.clip_bound is None
            or cfg.max_update_norm is None
            or cfg.clip_bound <= cfg.max_update_norm,
            "clip-bound must not exceed max-update-norm (updates above it are refused anyway)",
        ),
        (
            0 <= cfg.proximal_mu <= MAX_PROXIMAL_MU,
            f"proximal-mu must be in [0, {MAX_PROXIMAL_MU:g}]",
        ),
        (
            cfg.lr_schedule in LR_SCHEDULES,
            f"lr-schedule must be one of: {', '.join(LR_SCHEDULES)}",
        ),
        (0 < cfg.lr_final <= 1, "lr-final must be in (0, 1] (a fraction of --lr)"),
    ]
    if cfg.robust in ("krum", "multi-krum"):
        need = 2 * cfg.byzantine + 3
        checks.append(
            (
                cfg.min_clients >= need,
                f"min-clients must be ≥ 2·byzantine + 3 = {need} for {cfg.robust}: a round may "
                "close with min-clients updates, and Krum needs n ≥ 2f + 3",
            )
        )
    return checks + _dp_checks(cfg)


def _dp_checks(cfg: Any) -> list[tuple[bool, str]]:
    z, eps, m = cfg.dp_noise_multiplier, cfg.dp_epsilon, cfg.dp_expected_clients
    checks = [
        (z is None or (z > 0 and math.isfinite(z)), "dp-noise-multiplier must be positive"),
        (eps is None or (eps > 0 and math.isfinite(eps)), "dp-epsilon must be positive"),
        (0 < cfg.dp_delta < 1, "dp-delta must be in (0, 1)"),
        (cfg.dp_clip > 0 and math.isfinite(cfg.dp_clip), "dp-clip must be positive and finite"),
        (m is None or (m > 0 and math.isfinite(m)), "dp-expected-clients must be positive"),
        (cfg.dp_accountant in ACCOUNTANTS, f"dp-accountant must be one of: {ACCOUNTANTS}"),
    ]
    if not dp_enabled(cfg):
        return checks
    return [
        *checks,
        (
            m is not None,
            "dp-expected-clients is required with differential privacy: m, the devices expected "
            "per round (fraction × fleet size), the fixed denominator of DP-FedAvg",
        ),
        (
            cfg.robust == "fedavg",
            "robust must be fedavg with differential privacy (DP-FedAvg sums clipped updates; "
            "median and Krum have no bounded sensitivity to add noise to)",
        ),
        (
            cfg.clip != "none",
            "clip must be fixed or adaptive with differential privacy: the noise is calibrated "
            "to the clipping bound (--dp-clip)",
        ),
        (
            cfg.clip_bound is None,
            "clip-bound is not used with differential privacy: the bound (or the adaptive "
            "bound's start) is --dp-clip",
        ),
    ]


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the server optimizer, aggregation rule, clipping, DP and FedProx."""
    g = parser.add_argument_group("strategy (docs/strategies.md)")
    g.add_argument("--strategy", choices=STRATEGIES, help="server optimizer (default fedavg)")
    g.add_argument(
        "--server-lr", type=float, help="server learning rate η (default 1; adaptive: 0.01)"
    )
    g.add_argument("--server-momentum", type=float, help="fedavgm's momentum (default 0.9)")
    g.add_argument("--beta1", type=float, help="first-moment decay, adaptive (default 0.9)")
    g.add_argument("--beta2", type=float, help="second-moment decay (default 0.99)")
    g.add_argument("--tau", type=float, help="adaptivity τ of the adaptive optimizers (1e-3)")
    g.add_argument("--robust", choices=ROBUST_RULES, help="aggregation rule (default fedavg)")
    g.add_argument("--trim-fraction", type=float, help="trimmed mean: cut per side (0.1)")
    g.add_argument("--byzantine", type=int, help="krum: updates assumed Byzantine, f (1)")
    g.add_argument("--krum-keep", type=int, help="multi-krum: updates averaged (n − f)")
    g.add_argument(
        "--max-round-memory",
        type=int,
        help=f"bytes a round-holding rule may use (default {DEFAULT_MAX_ROUND_MEMORY})",
    )
    g.add_argument("--clip", choices=CLIP_MODES, help="norm clipping of each update (adaptive)")
    g.add_argument(
        "--clip-bound",
        type=float,
        help="fixed: the bound; adaptive: its start (default: round 1's median norm)",
    )
    g.add_argument("--clip-quantile", type=float, help="adaptive: target quantile γ (0.5)")
    g.add_argument("--clip-lr", type=float, help="adaptive: the bound's log-step η_C (0.2)")
    add_dp_arguments(g)
    g.add_argument(
        "--proximal-mu", type=float, help="FedProx: μ of the devices' proximal term (default 0)"
    )
    g.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="the devices' learning rate over the rounds (default constant)",
    )
    g.add_argument(
        "--lr-final", type=float, help="cosine: the last round's lr as a fraction of --lr (0.02)"
    )


def add_dp_arguments(g: Any) -> None:
    """Flags of client-level differential privacy."""
    g.add_argument("--dp-noise-multiplier", type=float, help="DP: noise multiplier z")
    g.add_argument("--dp-epsilon", type=float, help="DP: privacy budget ε over all rounds")
    g.add_argument("--dp-delta", type=float, help="DP: δ of the budget (default 1e-5)")
    g.add_argument("--dp-clip", type=float, help="DP: clipping bound C (adaptive: C₀; 1.0)")
    g.add_argument("--dp-expected-clients", type=float, help="DP: devices expected per round m")
    g.add_argument("--dp-accountant", choices=ACCOUNTANTS, help="DP accountant (default rdp)")


# docs/configuration.md (aggregator/ops/config_docs.py) describes these settings so.
DESCRIPTIONS = {
    "strategy": "server optimizer applied to each round's aggregated delta: `fedavg`, "
    "`fedavgm` (server momentum), `fedadagrad`, `fedadam`, `fedyogi` (Reddi et al. 2021; "
    "docs/strategies.md); its state is checkpointed",
    "server_lr": "server learning rate η; none: 1 for `fedavg`/`fedavgm`, 0.01 for the "
    "adaptive optimizers (whose step is about η per coordinate: tune it)",
    "server_momentum": "`fedavgm`'s momentum μ",
    "beta1": "first-moment decay β₁ of `fedadagrad`, `fedadam`, `fedyogi`",
    "beta2": "second-moment decay β₂ of `fedadam`, `fedyogi`",
    "tau": "adaptivity τ of the adaptive optimizers (the ε of Adam)",
    "robust": "aggregation rule: `fedavg` (sample-weighted streaming mean), or the unweighted "
    "`median`, `trimmed-mean`, `krum`, `multi-krum`, which hold every update of a round in "
    "memory (bounded by `max_round_memory`)",
    "trim_fraction": "`trimmed-mean`: fraction of values cut from each side per coordinate",
    "byzantine": "`krum`/`multi-krum`: updates assumed Byzantine, f; needs `min_clients` ≥ 2f + 3",
    "krum_keep": "`multi-krum`: updates averaged (none: n − f)",
    "max_round_memory": "bytes a round-holding rule may need (updates + working space); a "
    "selection that would need more is refused with an error naming the figures",
    "clip": "norm clipping of each update before aggregation: `none`, `fixed` (at "
    "`clip_bound`) or `adaptive` (the bound tracks the `clip_quantile` of the update norms, "
    "Andrew et al. 2021; capped at `max_update_norm`); the default: docs/strategies.md",
    "clip_bound": "`fixed`: the clipping bound; `adaptive`: its start (none: round 1's updates "
    "wait until its `clip_quantile` norm is known and are clipped to it, within "
    "`max_round_memory`; the bound goes on from there)",
    "clip_quantile": "`adaptive`: fraction of the updates left unclipped at the bound's fixed "
    "point, γ",
    "clip_lr": "`adaptive`: the bound's log-step η_C per round (Cₜ₊₁ = Cₜ·exp(−η_C(b̄ − γ)))",
    "dp_noise_multiplier": "client-level DP (DP-FedAvg): noise multiplier z; none: from "
    "`dp_epsilon`; DP is off when both are none",
    "dp_epsilon": "DP budget ε over all rounds at `dp_delta`: without `dp_noise_multiplier` the "
    "smallest z that fits `rounds` is used; the aggregator refuses to start (or stops) "
    "rather than exceed it",
    "dp_delta": "δ of the DP guarantee",
    "dp_clip": "DP clipping bound C (with `clip = adaptive`, its start C₀)",
    "dp_expected_clients": "DP: m, the devices expected per round (≈ `fraction` × fleet "
    "size): the fixed denominator of the noised mean; required with DP. The accountant "
    "takes `fraction` as the sampling rate q (docs/strategies.md: an approximation)",
    "dp_accountant": "DP accountant of Google's dp-accounting: `rdp` or `pld` (tighter, slower)",
    "proximal_mu": "FedProx: μ of the proximal term μ/2·‖w − w_global‖² in the devices' "
    "local loss, sent in each round announcement; 0: plain local SGD",
    "lr_schedule": "the devices' learning rate over the rounds, sent in each round "
    "announcement: `constant` (`lr`), or `cosine`: from `lr` in round 1 down to `lr_final` × "
    "`lr` at round `rounds` (docs/strategies.md)",
    "lr_final": "`cosine`: the schedule's floor, a fraction of `lr`",
}
