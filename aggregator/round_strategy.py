"""One round's aggregation, assembled from the configured strategy, and the state it carries.

Per round (docs/strategies.md, "One round, end to end")::

    accepted update ─► clip (none | fixed | adaptive) ─► rule: streaming FedAvg
                                                           | every update held (median, …)
                       DP: clip to C, unweighted sum ─────► | noise, ÷ m
    aggregated delta Δ ─► server optimizer step ─► new global model

:class:`RoundStrategy` lives as long as the service: it holds what is carried between rounds
(the optimizer's moments, the clipping bound, the DP generator and the rounds it noised) and
opens one :class:`RoundAggregate` per round, which the intake feeds and
:func:`aggregator.model_check.next_global_model` applies. A round's new optimizer and clipping
states are kept only when its model is applied (:meth:`RoundStrategy.close`); a DP round
counts against the budget whether or not it is applied. :meth:`RoundStrategy.state` /
:meth:`RoundStrategy.load_state` carry all of it through the checkpoint, so a resumed
aggregator continues bit for bit. No MQTT, no files, no clock here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.clipping import (
    MIN_BOUND,
    AdaptiveClipConfig,
    ClipError,
    ClipState,
    RoundClipper,
    adapt_bound,
)
from aggregator.dp import DPConfig, DPConfigError, DPFedAvgRound
from aggregator.privacy import (
    PrivacyBudget,
    budget_status,
    epsilon_spent,
    max_rounds,
    noise_multiplier_for,
)
from aggregator.robust import (
    DEFAULT_MAX_ROUND_MEMORY,
    RobustConfig,
    RobustConfigError,
    RoundUpdates,
    check_krum,
    check_round_memory,
)
from aggregator.server_opt import ServerOptConfig, ServerOptimizer, ServerOptState
from aggregator.strategy import AggregationError, StreamingFedAvg, check_delta
from aggregator.strategy_config import dp_enabled
from aggregator.update_bounds import update_l2_norm

Tensors = dict[str, np.ndarray]


class StrategyError(ValueError):
    """A strategy that cannot run as configured, or saved state that does not fit it."""


@dataclass(frozen=True)
class DPSettings:
    """DP-FedAvg as configured: the mechanism, the accountant's inputs, the budget."""

    config: DPConfig
    sampling_rate: float  # q: the selection fraction (docs/strategies.md: an approximation)
    delta: float
    accountant: str
    budget: PrivacyBudget | None  # None: ε reported, no limit


@dataclass(frozen=True)
class StrategySettings:
    """Everything :class:`RoundStrategy` needs, validated."""

    opt: ServerOptConfig
    robust: RobustConfig | None  # None: the streaming sample-weighted FedAvg
    clip: str  # none | fixed | adaptive (DP: the DP mechanism's own clipping)
    fixed_bound: float | None
    adaptive: AdaptiveClipConfig | None  # without DP
    bootstrap: bool  # adaptive without a C₀: round 1 is clipped to its own γ-quantile norm
    max_share: float
    dp: DPSettings | None
    max_round_memory: int = DEFAULT_MAX_ROUND_MEMORY  # bytes round 1 may hold (bootstrap)


def strategy_settings(cfg: Any) -> StrategySettings:
    """The settings of ``cfg`` (an AggregatorConfig); StrategyError when they cannot run.

    With DP and no noise multiplier, z is the smallest that keeps ``cfg.rounds`` rounds within
    ε; with both, the aggregator refuses to start unless those rounds fit the budget.
    """
    opt = ServerOptConfig(
        cfg.strategy, cfg.server_lr, cfg.server_momentum, cfg.beta1, cfg.beta2, cfg.tau
    )
    robust = None
    if cfg.robust != "fedavg":
        robust = RobustConfig(
            cfg.robust, cfg.trim_fraction, cfg.byzantine, cfg.krum_keep, cfg.max_round_memory
        )
    hard = _finite(cfg.max_update_norm)
    adaptive, bootstrap = None, False
    if cfg.clip == "adaptive" and not dp_enabled(cfg):
        bootstrap = cfg.clip_bound is None
        start = cfg.clip_bound if cfg.clip_bound is not None else (hard or 1.0)
        adaptive = AdaptiveClipConfig(
            start, cfg.clip_quantile, cfg.clip_lr, 0.0, hard if hard and hard >= start else None
        )
    fixed = cfg.clip_bound if cfg.clip == "fixed" else None
    dp = _dp_settings(cfg, hard) if dp_enabled(cfg) else None
    return StrategySettings(
        opt, robust, cfg.clip, fixed, adaptive, bootstrap, cfg.max_weight_share, dp,
        cfg.max_round_memory,
    )  # fmt: skip


def _finite(bound: float | None) -> float | None:
    return bound if bound is not None and math.isfinite(bound) else None


def _dp_settings(cfg: Any, hard: float | None) -> DPSettings:
    q, delta, method = cfg.fraction, cfg.dp_delta, cfg.dp_accountant
    budget = PrivacyBudget(cfg.dp_epsilon, delta) if cfg.dp_epsilon is not None else None
    z = cfg.dp_noise_multiplier
    if z is None:
        assert budget is not None  # dp_enabled: one of the two is set
        z = noise_multiplier_for(budget.epsilon, delta, q, cfg.rounds, method)
    elif budget is not None and max_rounds(budget, q, z, method, ceiling=cfg.rounds) < cfg.rounds:
        fits = max_rounds(budget, q, z, method, ceiling=cfg.rounds)
        raise StrategyError(
            f"the privacy budget ε = {budget.epsilon} (δ = {delta}) allows {fits} rounds at "
            f"noise multiplier {z} and sampling rate {q}, not {cfg.rounds}: fewer rounds, a "
            "larger ε, or omit --dp-noise-multiplier to derive it from the budget"
        )
    m = cfg.dp_expected_clients
    adaptive = None
    if cfg.clip == "adaptive":
        cap = hard if hard and hard >= cfg.dp_clip else None
        # σ_b: Andrew et al.'s m/20, but at least 2z, so that the update's noise multiplier
        # stays within 3.3 % of z (z_Δ = z·(1 − 1/16)^−½) when m is small.
        count_stddev = max(m / 20, 2 * z)
        adaptive = AdaptiveClipConfig(
            cfg.dp_clip, cfg.clip_quantile, cfg.clip_lr, count_stddev, cap
        )
    try:
        config = DPConfig(z, m, cfg.dp_clip, adaptive)
    except DPConfigError as exc:
        raise StrategyError(f"{exc} (or use --clip fixed with differential privacy)") from exc
    return DPSettings(config, q, delta, method, budget)


@dataclass(frozen=True)
class StrategyFigures:
    """A round's strategy figures for its metrics."""

    clip_bound: float | None = None  # the bound the round clipped to (None: not clipped)
    clipped: int = 0  # updates shortened
    dp_epsilon: float | None = None  # ε spent after the round (None: no DP)
    dp_delta: float | None = None


class RoundAggregate:
    """One round's updates: clipped, then summed, held for a robust rule, or summed for DP."""

    def __init__(self, strategy: RoundStrategy, capacity: int) -> None:
        s = strategy.settings
        self.strategy = strategy
        self.shapes = dict(strategy.shapes)
        self.max_share = s.max_share
        self.bound = strategy.round_bound()
        self.norms: list[float] = []  # every counted update's norm before clipping
        self._dp = None
        if s.dp is not None:
            assert strategy.clip is not None  # DP always clips
            self._dp = DPFedAvgRound(s.dp.config, self.shapes, strategy.clip)
        self._clipper = RoundClipper(self.bound) if self.bound and not s.dp else None
        self._held = RoundUpdates(s.robust, self.shapes, capacity) if s.robust else None
        self._sum = StreamingFedAvg(self.shapes, s.max_share)
        # Round 1 of the adaptive bound without a start: its updates wait, unclipped, until
        # the round's γ-quantile norm is known (then clipped to it and counted in order).
        self._first: list[tuple[Tensors, int, str, float]] | None = None
        if strategy.bootstraps():
            self._first = []
            self._first_capacity = strategy.first_round_room(capacity)
        self.partials = 0  # sites' partial aggregates counted (add_partial)
        self.noised = False  # DP: the noise was drawn (the round counts against ε)
        self.next_opt: ServerOptState | None = None
        self.next_clip: ClipState | None = None

    @property
    def count(self) -> int:
        """Updates (devices' and sites' partials) added this round."""
        return len(self.norms) + self.partials

    @property
    def clipped(self) -> int:
        """Updates shortened by clipping this round."""
        if self._dp is not None:
            return self._dp.clipper.count - self._dp.clipper.unclipped
        return 0 if self._clipper is None else self._clipper.count - self._clipper.unclipped

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` updates (an extended selection); StrategyError if over the
        memory limit, the round keeping the room it had."""
        if self._first is not None and capacity > self._first_capacity:
            self._first_capacity = self.strategy.first_round_room(capacity)
        held = self._held
        if held is None or capacity <= held.capacity:
            return
        sizes = [math.prod(s) for s in self.shapes.values()]
        try:
            held.bytes_needed = check_round_memory(held.config, sum(sizes), capacity, max(sizes))
        except RobustConfigError as exc:
            raise StrategyError(str(exc)) from exc
        held.capacity = capacity

    def add(
        self,
        delta: Mapping[str, np.ndarray],
        num_samples: int,
        client_id: str = "",
        weight: float = 1.0,
    ) -> None:
        """Clip and count one update; AggregationError (nothing counted) when it cannot be.

        ``weight`` scales the clipped delta (the asynchronous mode's staleness weight w(s),
        aggregator/async_rounds.py: the sum becomes Σ n·w·Δ / Σ n); DP takes none.
        """
        if num_samples <= 0:
            raise AggregationError(f"num_samples must be positive, got {num_samples}")
        if not 0 < weight <= 1:
            raise AggregationError(f"weight must be in (0, 1], got {weight}")
        check_delta(self.shapes, delta)
        if self._dp is not None:
            if weight != 1.0:
                raise AggregationError("differential privacy takes no staleness weight")
            self.norms.append(self._dp.add(delta))
            return
        if self._first is not None:
            if len(self._first) >= self._first_capacity:
                raise AggregationError(f"round holds at most {self._first_capacity} updates")
            self._first.append(({n: np.array(delta[n], np.float32) for n in self.shapes},
                                num_samples, client_id, weight))  # fmt: skip
            self.norms.append(update_l2_norm(delta))
            return
        self.norms.append(self._count(delta, num_samples, client_id, weight))

    def add_partial(self, delta: Mapping[str, np.ndarray], num_samples: int, site: str) -> None:
        """Count a site's partial (docs/sites.md): its devices' mean update, weighted by their
        samples. Not clipped or capped again (its devices were, at the site), not in the
        adaptive bound's norms: flat FedAvg up to codec error. A robust rule or DP needs each
        device's update: AggregationError, nothing counted."""
        if num_samples <= 0:
            raise AggregationError(f"num_samples must be positive, got {num_samples}")
        if self._dp is not None or self._held is not None:
            rule = "differential privacy" if self._dp is not None else "a robust rule"
            raise AggregationError(
                f"this federation runs {rule}, which needs each device's update: a site's "
                "partial aggregate cannot be counted (run that site's devices flat)"
            )
        self._sum.add_uncapped(delta, num_samples, site)
        self.partials += 1

    def partial(self) -> Tensors:
        """A site's round: the rule's Δ without a server step (the central aggregator takes
        it on); the clipping state it leads to waits in ``next_clip`` for
        :meth:`RoundStrategy.close`."""
        delta = self.mean_delta()
        self.next_clip = self.strategy.next_clip(self._clipper, self.norms)
        self.next_opt = self.strategy.opt_state
        return delta

    def _count(
        self,
        delta: Mapping[str, np.ndarray],
        num_samples: int,
        client_id: str,
        weight: float = 1.0,
    ) -> float:
        """Clip (when this round clips), weight, and fold into the rule; the norm before
        clipping."""
        if self._clipper is None:
            clipped, norm = delta, update_l2_norm(delta)
        else:
            try:
                clipped, norm = self._clipper.clip(delta)
            except ClipError as exc:  # not finite: check_delta refused it already
                raise AggregationError(str(exc)) from exc
        if weight != 1.0:  # after clipping: a stale update moves the model w(s)× its bound
            w = np.float32(weight)
            clipped = {n: np.asarray(v, np.float32) * w for n, v in clipped.items()}
        if self._held is not None:
            self._held.add(clipped, num_samples, client_id)
        else:
            self._sum.add(clipped, num_samples, client_id)
        return norm

    def _count_first_round(self) -> None:
        """Round 1 of the bootstrap: clip every held update to the round's γ-quantile norm."""
        held, self._first = self._first or [], None
        if not held:
            return
        self.bound = self.strategy.first_bound(self.norms)
        self._clipper = RoundClipper(self.bound)
        for delta, num_samples, client_id, weight in held:
            self._count(delta, num_samples, client_id, weight)

    def capped(self) -> list[tuple[str, int, float]]:
        """Clients whose weight the share cap lowers (streaming FedAvg only)."""
        if self._dp is None and self.count:
            self._count_first_round()
        return self._sum.capped() if self._held is None and self._dp is None else []

    def mean_delta(self) -> Tensors:
        """The rule's aggregated delta Δ (DP: draws the round's noise)."""
        if self._dp is not None:
            self.noised = True
            delta, self.next_clip = self._dp.finish(self.strategy.dp_rng)
            return delta
        if self.count == 0:
            raise AggregationError("no update was added")
        self._count_first_round()
        if self._held is not None:
            return self._held.aggregate()[0]
        return self._sum.mean_delta()

    def apply(self, params: Mapping[str, np.ndarray]) -> Tensors:
        """The new global model: Δ, then one server-optimizer step (AggregationError when not
        finite). The states it leads to wait in ``next_opt`` / ``next_clip`` for
        :meth:`RoundStrategy.close`."""
        delta = self.mean_delta()
        if self._dp is None:
            self.next_clip = self.strategy.next_clip(self._clipper, self.norms)
        out, self.next_opt = self.strategy.optimizer.step(self.strategy.opt_state, params, delta)
        return out


class RoundStrategy:
    """The configured strategy and the state it carries from round to round."""

    def __init__(
        self,
        settings: StrategySettings,
        shapes: Mapping[str, tuple[int, ...]],
        dp_rng: np.random.Generator | None = None,
    ) -> None:
        """``dp_rng``: the DP noise generator (default: seeded from the OS's entropy)."""
        self.settings = settings
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.optimizer = ServerOptimizer(settings.opt, self.shapes)
        self.opt_state = self.optimizer.initial_state()
        self.clip = self._initial_clip()
        self.dp_rng = dp_rng if dp_rng is not None else np.random.default_rng()
        self.dp_rounds = 0  # rounds whose noised aggregate was computed

    def _initial_clip(self) -> ClipState | None:
        s = self.settings
        if s.dp is not None:
            return s.dp.config.initial_clip()
        if s.fixed_bound is not None:
            return ClipState(s.fixed_bound)
        if s.adaptive is not None and not s.bootstrap:
            return ClipState(s.adaptive.initial_bound)
        return None  # no clipping, or adaptive before round 1 has set its bound

    def bootstraps(self) -> bool:
        """True while the adaptive bound waits for round 1's norms (no DP, no C₀ given)."""
        s = self.settings
        return self.clip is None and s.adaptive is not None and s.bootstrap

    def first_round_room(self, capacity: int) -> int:
        """How many updates round 1 may hold: ``capacity``, StrategyError if their fp32 copies
        would exceed ``max_round_memory`` (a selection that large needs ``--clip-bound``)."""
        need = capacity * 4 * sum(math.prod(s) for s in self.shapes.values())
        if need > self.settings.max_round_memory:
            raise StrategyError(
                f"round 1 of the adaptive clipping bound holds its {capacity} updates until "
                f"their median norm is known: {need / 2**20:,.1f} MiB, over "
                f"--max-round-memory ({self.settings.max_round_memory / 2**20:,.1f} MiB); give "
                "the bound a start with --clip-bound, or raise --max-round-memory"
            )
        return capacity

    def first_bound(self, norms: list[float]) -> float:
        """Round 1's bound: the γ-quantile of its norms (never above the hard bound)."""
        adaptive = self.settings.adaptive
        assert adaptive is not None
        bound = float(np.quantile(norms, adaptive.target_quantile))
        cap = adaptive.max_bound
        return max(min(bound, cap) if cap else bound, MIN_BOUND)

    def round_bound(self) -> float | None:
        """The bound this round clips to (None: not clipped)."""
        return None if self.clip is None else self.clip.bound

    def check_capacity(self, capacity: int) -> None:
        """StrategyError when a round of ``capacity`` updates cannot be held (memory, Krum's
        n ≥ 2f + 3). Streaming rules take any number."""
        robust = self.settings.robust
        if robust is None:
            return
        sizes = [math.prod(s) for s in self.shapes.values()]
        try:
            check_round_memory(robust, sum(sizes), capacity, max(sizes, default=0))
            if robust.rule in ("krum", "multi-krum"):
                check_krum(capacity, robust.byzantine)
        except RobustConfigError as exc:
            raise StrategyError(str(exc)) from exc

    def open_round(self, capacity: int) -> RoundAggregate:
        """A new round for at most ``capacity`` updates (its selection)."""
        self.check_capacity(capacity)
        return RoundAggregate(self, capacity)

    def next_clip(self, clipper: RoundClipper | None, norms: list[float]) -> ClipState | None:
        """The bound after a round without DP that clipped with ``clipper``."""
        s = self.settings
        if s.adaptive is None:
            return self.clip
        if self.clip is None:  # bootstrap: round 1 was clipped to its γ-quantile norm
            return ClipState(self.first_bound(norms), 1) if norms else None
        assert clipper is not None
        return adapt_bound(s.adaptive, self.clip, clipper.unclipped, clipper.count)

    def close(self, agg: RoundAggregate, applied: bool) -> None:
        """Keep the round's new optimizer and clipping states if its model was applied; a DP
        round whose noise was drawn counts against the budget either way."""
        self.dp_rounds += int(agg.noised)
        if applied and agg.next_opt is not None:
            self.opt_state, self.clip = agg.next_opt, agg.next_clip

    def figures(self, agg: RoundAggregate) -> StrategyFigures:
        """What the round's metrics report of the strategy (after :meth:`close`)."""
        dp = self.settings.dp
        return StrategyFigures(
            clip_bound=agg.bound,
            clipped=agg.clipped,
            dp_epsilon=self.epsilon(),
            dp_delta=None if dp is None else dp.delta,
        )

    # --- privacy -------------------------------------------------------------------------
    def epsilon(self) -> float | None:
        """ε spent so far at the configured δ (None without DP)."""
        dp = self.settings.dp
        if dp is None:
            return None
        z = dp.config.noise_multiplier
        return epsilon_spent(dp.sampling_rate, z, self.dp_rounds, dp.delta, dp.accountant)

    def budget_refusal(self) -> str | None:
        """Why one more round would exceed the privacy budget (None: it fits, or no budget)."""
        dp = self.settings.dp
        if dp is None or dp.budget is None:
            return None
        z = dp.config.noise_multiplier
        status = budget_status(dp.budget, dp.sampling_rate, z, self.dp_rounds, dp.accountant)
        if status.allows_next:
            return None
        return (
            f"privacy budget: round {self.dp_rounds + 1} would spend ε = "
            f"{status.next_epsilon:.4g} > {dp.budget.epsilon} (δ = {dp.delta})"
        )

    # --- checkpoint ----------------------------------------------------------------------
    def state(self) -> tuple[Tensors, dict[str, Any]]:
        """(optimizer tensors ``m/<name>``, ``v/<name>``; JSON-able scalars) to checkpoint."""
        tensors, opt = self.opt_state.to_dict()
        doc: dict[str, Any] = {
            "optimizer": opt,
            "clip": None if self.clip is None else self.clip.to_dict(),
            "dp_rounds": self.dp_rounds,
        }
        if self.settings.dp is not None:
            doc["dp_rng"] = dict(self.dp_rng.bit_generator.state)
        return tensors, doc

    def load_state(self, tensors: Mapping[str, np.ndarray], doc: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state`'s output; ``doc`` None: a checkpoint written before
        strategies (only a stateless optimizer resumes from it). StrategyError if it does not
        fit this strategy."""
        try:
            if doc is None:
                if self.settings.opt.strategy != "fedavg":
                    raise StrategyError("the checkpoint holds no server-optimizer state")
                return
            self.opt_state = self.optimizer.state_from_dict(tensors, doc["optimizer"])
            clip = doc.get("clip")
            self.clip = None if clip is None else ClipState.from_dict(clip)
            self.dp_rounds = int(doc.get("dp_rounds", 0))
            if self.settings.dp is not None:
                self.dp_rng.bit_generator.state = dict(doc["dp_rng"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StrategyError(f"saved strategy state unusable: {exc}") from exc
