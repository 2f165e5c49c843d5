"""A round below quorum at its deadline: the service's ``--on-starved`` policy carried out.

:func:`~aggregator.resume.starved_action` decides (pure); :class:`StarvedRounds` acts on the
decision: it extends the round and invites the on-line agents not yet selected, retries it
with fresh ones, or fails it, and says so on the round's decision topic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.resume import starved_action
from aggregator.roster import AgentRoster
from aggregator.round_strategy import RoundAggregate, StrategyError
from aggregator.rounds import RoundState, select_clients
from shared.clock import Clock

log = logging.getLogger("fedmq.aggregator")


class StarvedRounds:
    """Extends, retries or fails the rounds that reach their deadline below quorum."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        agents: AgentRoster,
        rng: np.random.Generator,
        clock: Clock,
        announce: Callable[[RoundState], None],
        decide: Callable[[RoundState, str, str], None],
    ) -> None:
        """``announce`` publishes a round's (new) announcement, ``decide`` its decision."""
        self.cfg, self.agents, self.rng, self.clock = cfg, agents, rng, clock
        self.announce, self.decide = announce, decide

    def at_deadline(self, state: RoundState, aggregate: RoundAggregate) -> bool:
        """Apply the --on-starved policy; False when the round has to fail."""
        cfg = self.cfg
        action = starved_action(state.extensions, cfg.on_starved, cfg.max_extensions)
        if action == "fail":
            why = f"below quorum ({len(state.accepted)}/{state.min_clients}) after "
            log.error("round %d failed: %s%d extensions", state.round_id, why, state.extensions)
            self.decide(state, "failed", why + f"{state.extensions} extensions")
            return False
        if action == "retry":
            online = [c for c in self.agents.online() if c not in state.accepted]
            fresh = select_clients(online, cfg.fraction, 1, self.rng) if online else []
            state.selected = set(state.accepted) | set(fresh) or state.selected
        self._extend(state, aggregate)
        self.decide(state, "retried" if action == "retry" else "extended", "below quorum")
        return True

    def _extend(self, state: RoundState, aggregate: RoundAggregate) -> None:
        extra = [c for c in self.agents.online() if c not in state.selected]
        try:  # a rule holding the round makes room for the newly invited agents
            aggregate.grow(len(state.selected) + len(extra))
        except StrategyError as exc:
            log.warning("round %d: no room for more agents (%s): none invited", state.round_id, exc)
            extra = []
        state.extend(self.clock.time() + self.cfg.round_timeout, extra)
        log.warning(
            "round %d below quorum at its deadline (%d/%d accepted): extended by %.0fs, "
            "%d more agents invited",
            state.round_id,
            len(state.accepted),
            state.min_clients,
            self.cfg.round_timeout,
            len(extra),
        )
        self.announce(state)
