"""The aggregator service: announces rounds, averages deltas, publishes global models.

Wiring only: transport ⇄ round state machine (:mod:`aggregator.rounds`) ⇄ streaming FedAvg
(:mod:`aggregator.strategy`). The service receives its transport (a
:data:`~shared.mqtt.base.Connector`) and its :class:`~shared.clock.Clock`:
:mod:`aggregator.cli` gives it paho and the system clock, unit tests an in-memory broker and
a manual clock. All work happens on the thread that calls :meth:`run`; the network thread
only enqueues.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from aggregator.async_config import async_settings
from aggregator.async_rounds import AsyncIntake, VersionWindow
from aggregator.config import AggregatorConfig
from aggregator.downloads import GlobalDownloads, bytes_down
from aggregator.evaluation import Evaluator
from aggregator.intake import UpdateIntake, receipt_for
from aggregator.metrics_log import MetricsLog
from aggregator.model_check import next_global_model
from aggregator.onnx_export import RoundExporter, state_dir_of
from aggregator.publisher import RetainedPublisher
from aggregator.resume import (
    EXIT_BUDGET,
    EXIT_STARVED,
    Durability,
    new_run_epoch,
    resolve_run,
)
from aggregator.roster import AgentRoster
from aggregator.round_records import (
    ClosedRound,
    OpenRound,
    log_latency,
    round_decision,
    round_start,
)
from aggregator.round_report import RoundReporter
from aggregator.round_strategy import (
    RoundAggregate,
    RoundStrategy,
    StrategyError,
    strategy_settings,
)
from aggregator.rounds import RoundPhase, RoundState, Verdict, select_clients, without_open_round
from aggregator.service_restore import restore
from aggregator.starved_rounds import StarvedRounds
from aggregator.update_bounds import model_headroom
from aggregator.update_budget import IntakeGuard
from aggregator.windows import VersionWindows
from shared.clock import Clock, SystemClock
from shared.mqtt.base import Connector, Inbound, Outbound, Session
from shared.protocol import messages as msg
from shared.protocol import topics
from shared.protocol.claims import sign_round_start, sign_status
from shared.protocol.frames import tensors_hash
from shared.protocol.signing import load_private_key

log = logging.getLogger("fedmq.aggregator")

Tensors = dict[str, np.ndarray]
# One warning line per sender per interval (with a count): a flood is not a log flood.
WARN_INTERVAL_S = 10.0


def _aggregate(intake: UpdateIntake) -> RoundAggregate:
    """The strategy's round behind the service's intake (it always builds one)."""
    assert isinstance(intake.acc, RoundAggregate)
    return intake.acc


def model_spec(cfg: AggregatorConfig) -> msg.ModelSpec:
    """What the federation trains, as announced: architecture, sample shape and task."""
    return msg.ModelSpec(
        arch=cfg.model,
        input_shape=tuple(cfg.input_shape),
        num_classes=cfg.num_classes,
        task=cfg.task,  # type: ignore[arg-type]  # checked by AggregatorConfig
        num_outputs=cfg.num_outputs,
    )


class AggregatorService:
    """Runs one federation from the initial model to the final one."""

    def __init__(
        self, cfg: AggregatorConfig, connect: Connector, clock: Clock | None = None
    ) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.topics = topics.Topics(cfg.federation)
        self.spec = model_spec(cfg)
        self.evaluator = Evaluator(
            self.spec, cfg.eval_data, cfg.seed, cfg.threads, cfg.regression_loss
        )
        self.signing_key = load_private_key(cfg.signing_key) if cfg.signing_key else None
        # Checkpoint + journal only with an explicit --state-dir: resuming is opt-in.
        self.durable = Durability(Path(cfg.state_dir), cfg) if cfg.state_dir else None
        # This run's epoch (a resumed one is set again by restore): agents follow the largest.
        self.run_epoch = resolve_run(cfg.run, None, new_run_epoch(self.clock.time()))
        self.exporter = RoundExporter(
            self.spec,
            cfg.federation,
            onnx=cfg.onnx,
            state_dir=state_dir_of(cfg.state_dir, cfg.metrics_file),
            holdout=self.evaluator.data,
            seed=cfg.seed,
            signing_key=self.signing_key,
            run=self.run_epoch,
        )
        self.params: Tensors = self.evaluator.initial_params()
        self.shapes = {n: tuple(v.shape) for n, v in self.params.items()}
        self.model_hash = tensors_hash(self.params)
        # The asynchronous mode (None: synchronous rounds): docs/async.md.
        self.async_mode = async_settings(cfg)
        self.initial_hash = self.model_hash  # version 0, round 1's base
        self.windows = VersionWindows(
            self.async_mode, cfg.min_clients, self.initial_hash, self.durable
        )
        # Optimizer, clipping, rule and DP (ValueError when they cannot run: exit 1).
        self.strategy = RoundStrategy(strategy_settings(cfg), self.shapes)
        self.strategy.check_capacity(cfg.min_clients)
        self.downloads = GlobalDownloads(
            cfg.federation,
            self.spec,
            cfg.download_codec,
            cfg.seed,
            self.signing_key,
            run=self.run_epoch,
        )
        self.agents = AgentRoster(self._warn, cfg.max_site_devices)
        self.guard = IntakeGuard(log, WARN_INTERVAL_S, cfg.update_burst, cfg.update_rate)
        self.rng = np.random.default_rng(cfg.seed)
        self.metrics = MetricsLog(cfg.metrics_file)
        self.round_id = 0
        self.transport = connect(
            Session(
                cfg.client_id,
                subscriptions=(
                    (self.topics.update_any, 1),
                    (self.topics.agent_status_any, 1),
                    # Sites (docs/sites.md): a site aggregator is one contributor.
                    (self.topics.site_partial_any, 1),
                    (self.topics.site_status_any, 1),
                    (self.topics.site_bridge_any, 1),
                ),
                will=Outbound(self.topics.aggregator_status, self._status("offline"), retain=True),
            )
        )
        # What the broker must hold (retained), re-published after every reconnect.
        self.publisher = RetainedPublisher(self.transport, f"{self.topics.root}/agents/")
        self.reporter = RoundReporter(
            cfg, self.spec, self.evaluator, self.exporter, self.metrics, self.publisher.publish,
            self.topics.metrics,
        )  # fmt: skip
        self.starved = StarvedRounds(
            cfg, self.agents, self.rng, self.clock, self._announce, self._decide
        )

    # --- life cycle --------------------------------------------------------------------
    def run(self) -> int:
        """Run every round; return the process exit code."""
        cfg = self.cfg
        self.transport.start()
        self.publisher.started()
        resumed = restore(self)
        log.info(
            "federation %s, run %d (agents follow the latest run)", cfg.federation, self.run_epoch
        )
        self.publisher.publish(self.topics.aggregator_status, self._status("running"), retain=True)
        self._publish_model(final=self.round_id >= cfg.rounds)
        current = resumed or self._open_round(self.round_id + 1)
        while current is not None:
            closed = self._close_round(current)
            if closed is None:
                self._finish("offline")
                return EXIT_STARVED
            # The next round starts before this one is evaluated, so held-out evaluation
            # overlaps with the agents' training instead of adding to every round.
            nxt = self._open_round(current.state.round_id + 1)
            self.reporter.report(closed)
            if nxt is None and current.state.round_id < cfg.rounds:
                return self._stop_early()
            current = nxt
        if self.round_id < cfg.rounds:  # no round could be opened at all
            return self._stop_early()
        self._finish("finished")
        log.info("federation %s finished after %d rounds", cfg.federation, cfg.rounds)
        return 0

    def _stop_early(self) -> int:
        """No further round could be opened: the privacy budget is spent (the model is final:
        exit 4), or no quorum or no room for the round (exit 2)."""
        refusal = self.strategy.budget_refusal()
        if refusal is not None:
            log.error("stopping after round %d: %s", self.round_id, refusal)
            self._finish("finished")
            return EXIT_BUDGET
        self._finish("offline")
        return 2

    def _finish(self, state: str) -> None:
        self.guard.close()
        if state == "finished":
            self._publish_model(final=True)
        self.transport.stop(
            [Outbound(self.topics.aggregator_status, self._status(state), retain=True)]
        )

    # --- one round ---------------------------------------------------------------------
    def _open_round(self, r: int) -> OpenRound | None:
        """Select agents and announce round ``r``; None after the last round or without quorum."""
        cfg = self.cfg
        if r > cfg.rounds or self.strategy.budget_refusal() is not None:
            return None
        if not self._wait_for_agents(cfg.min_clients, cfg.wait_clients_timeout):
            log.error(
                "fewer than %d agents online after %.0fs", cfg.min_clients, cfg.wait_clients_timeout
            )
            return None
        started = self.clock.time()
        state: RoundState
        if self.async_mode is not None:  # every device may contribute: none selected
            state = self.windows.next(r, self.model_hash, started + cfg.round_timeout, started)
        else:
            selected = select_clients(self.agents.online(), cfg.fraction, cfg.min_clients, self.rng)
            state = RoundState(
                r, self.model_hash, set(selected), cfg.min_clients,
                started + cfg.round_timeout, started,
            )  # fmt: skip
        try:
            intake = self._intake(state)  # before the announcement: can the round be held?
        except StrategyError as exc:
            log.error("round %d cannot be held: %s", r, exc)
            return None
        self._announce(state)
        return OpenRound(state, intake, started)

    def _intake(self, state: RoundState) -> UpdateIntake:
        cfg = self.cfg
        self.guard.new_round()
        capacity = len(state.selected)
        intake_type = UpdateIntake
        if isinstance(state, VersionWindow):
            capacity, intake_type = state.buffer, AsyncIntake
        aggregate = self.strategy.open_round(capacity)
        intake = intake_type(
            cfg.federation,
            state,
            aggregate,
            cfg.max_update_bytes,
            cfg.max_update_norm,
            max_samples=cfg.max_samples,
            declared=self.agents.declared_samples,
            headroom=model_headroom(self.params),
            fingerprint=self.evaluator.fingerprint,
            site_devices=self.agents.site_devices,
        )
        if isinstance(intake, AsyncIntake):
            assert isinstance(state, VersionWindow)
            intake.bind(state, aggregate)
        return intake

    def _close_round(self, rnd: OpenRound) -> ClosedRound | None:
        """Collect updates until the round may be applied; apply it and publish the model.

        None when the round stayed below quorum after every extension (the federation fails).
        """
        state, intake = rnd.state, rnd.intake
        last_update_at = self.clock.monotonic()
        for waiting in self.windows.release(
            lambda: state.phase(self.clock.time()) is RoundPhase.OPEN
        ):
            self._handle(waiting, intake)
        while (phase := state.phase(self.clock.time())) in (RoundPhase.OPEN, RoundPhase.STARVED):
            if phase is RoundPhase.STARVED:
                if not self.starved.at_deadline(state, _aggregate(intake)):
                    return None
                continue
            self.publisher.after_reconnect()
            item = self._next(timeout=min(1.0, max(0.01, state.deadline - self.clock.time())))
            if item is not None and self._handle(item, intake):
                last_update_at = item.received_at
        state.close()
        closed_at = self.clock.monotonic()
        target, unusable = next_global_model(
            intake.acc, self.params, self.evaluator.unusable, state.round_id
        )
        self.strategy.close(_aggregate(intake), applied=target is not None)
        if target is not None:
            # With a download codec: the quantized path agents can follow from the global delta.
            self.params, self.model_hash = self.downloads.advance(
                self.params, self.model_hash, self.round_id, target, state.round_id
            )
        self.round_id = state.round_id
        if self.durable is not None:
            residual = self.downloads.residual
            window = state.history_entry() if isinstance(state, VersionWindow) else None
            self.durable.applied(
                state, self.params, self.model_hash, self.rng, residual, self.strategy.state(),
                window,
            )  # fmt: skip
        if target is None:
            self._decide(state, "discarded", unusable)
        else:
            self._decide(state, "applied", f"{phase.value}: {len(state.accepted)} updates")
        computed_at = self.clock.monotonic()
        self._publish_model(final=False)
        published_at = self.clock.monotonic()
        latency_ms = log_latency(
            state.round_id, last_update_at, closed_at, computed_at, published_at
        )
        self.publisher.publish(self.topics.round_start(state.round_id), b"", retain=True)
        dl = self.downloads
        return ClosedRound(
            rnd,
            self.clock.time() - rnd.started,
            latency_ms,
            dict(self.params),
            self.model_hash,
            bytes_down(intake.download_reports(), len(dl.model_frame), len(self.agents.online())),
            dl.model_frame,
            dl.delta_bytes(state.round_id),
            self.strategy.figures(_aggregate(intake)),
        )

    def _announce(self, state: RoundState) -> None:
        cfg = self.cfg
        if self.durable is not None:  # journaled first: a restart re-announces the same
            self.durable.announced(state, self.rng)
        announcement = round_start(
            cfg, state, self.spec, self.run_epoch, self.clock.time(), self.evaluator.fingerprint
        )
        if self.signing_key is not None:  # pinned agents follow only signed announcements
            announcement = sign_round_start(self.signing_key, announcement)
        # Retained, so an agent that (re)connects mid-round learns the round at once.
        self.publisher.publish(
            self.topics.round_start(state.round_id), announcement.to_json(), retain=True
        )
        log.info(
            "round %d started: %d selected, deadline in %.0fs",
            state.round_id,
            len(state.selected),
            state.deadline - self.clock.time(),
        )

    def _decide(self, state: RoundState, decision: str, reason: str) -> None:
        """Publish what happened to a round (operators and tests watch this topic)."""
        body = round_decision(self.cfg.federation, state, decision, reason)
        self.publisher.publish(
            self.topics.round_decision(state.round_id), body.to_json(), wait=False
        )

    # --- inbound -----------------------------------------------------------------------
    def _next(self, timeout: float) -> Inbound | None:
        self.guard.flush(self.clock.monotonic())
        return self.clock.wait(self.transport.inbox, timeout)

    def _warn(self, sender: str | None, fmt: str, *args: object) -> None:
        self.guard.warn(sender, self.clock.monotonic(), fmt, *args)

    def _handle(self, item: Inbound, intake: UpdateIntake | None) -> bool:
        """Dispatch one message; True when it was an accepted update."""
        try:
            parsed = topics.parse(item.topic)
        except topics.TopicError as exc:
            self._warn(topics.sender_of(item.topic), "ignoring message on %s: %s", item.topic, exc)
            return False
        if parsed.kind == "agent_status":
            refusal = self.agents.on_status(item.topic, item.payload)
            if refusal is not None:
                self._wrong_model(refusal, intake)
            return False
        if parsed.kind == "site_status":
            self.agents.on_site_status(item.topic, item.payload)
            return False
        if parsed.kind == "site_bridge" and parsed.site is not None:
            self.agents.on_site_bridge(parsed.site, item.payload)
            return False
        # A device's update, or a site's partial aggregate (an update whose client is the site).
        sender = parsed.site if parsed.kind == "site_partial" else parsed.client_id
        if parsed.kind not in ("update", "site_partial") or parsed.round_id is None or not sender:
            return False
        site = parsed.kind == "site_partial"
        if site and not self.agents.site_devices(sender):
            self.agents.note_site(sender)  # its partial came before its status
        read, answer = self.guard.admit(sender, self.clock.monotonic())
        if not read:  # over its budget: dropped unread, answered once per interval
            if answer is not None:
                self._receipt(parsed.round_id, sender, answer, site)
            return False
        if intake is None:
            verdict = without_open_round(parsed.round_id, self.windows.last_closed(self.round_id))
            if verdict.code == "no-round" and self.windows.hold(item):
                return False  # async: the next window takes it
            self._receipt(parsed.round_id, sender, verdict, site)
            return False
        offer = intake.offer(parsed.round_id, sender, item.payload)
        if offer.verdict.accepted and self.durable is not None and offer.stats is not None:
            # Durable before the receipt: an acknowledged update survives a crash. Journaled
            # under the open round (an async update names its base round, an earlier one).
            self.durable.accepted(
                intake.state.round_id, sender, offer.stats.num_samples, item.payload, site
            )
        self._receipt(parsed.round_id, sender, offer.verdict, site)
        if not offer.verdict.accepted:
            self._warn(
                sender,
                "rejected %s from %s for round %d (%s): %s",
                "partial" if site else "update",
                sender,
                parsed.round_id,
                offer.verdict.code,
                offer.verdict.reason,
            )
        return offer.verdict.accepted

    def _wait_for_agents(self, count: int, timeout: float) -> bool:
        """Until ``count`` agents are online (False after ``timeout``), counted after what
        has already arrived, which may also take some off-line again (part-time devices):
        the selection then never finds fewer."""
        deadline = self.clock.monotonic() + timeout
        while True:
            while len(self.agents.online()) < count:
                self.publisher.after_reconnect()
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    return False
                item = self._next(timeout=min(remaining, 1.0))
                if item is not None:
                    self._handle(item, None)
            # Presence that has already arrived counts too (e.g. the burst of retained
            # statuses right after subscribing): the selection sees every agent known by now.
            for _ in range(self.transport.inbox.qsize()):
                item = self._next(timeout=0.0)
                if item is None:
                    break
                self._handle(item, None)
            if len(self.agents.online()) >= count:
                return True

    def _wrong_model(self, status: msg.AgentStatus, intake: UpdateIntake | None) -> None:
        """A device refused a round: another build of the model (intake.decline_wrong_model)."""
        what = f"this device's build of {self.spec.arch!r} is another architecture"
        verdict = intake.decline_wrong_model(status, what) if intake is not None else None
        if verdict is not None:
            self._receipt(status.round, status.client_id, verdict)

    # --- outbound ----------------------------------------------------------------------
    def _publish_model(self, final: bool) -> None:
        self.downloads.publish(
            self.round_id, self.params, self.model_hash, final, self.publisher.publish
        )

    def _receipt(self, round_id: int, client_id: str, verdict: Verdict, site: bool = False) -> None:
        receipt = receipt_for(round_id, client_id, verdict)
        where = self.topics.site_receipt if site else self.topics.receipt
        self.publisher.publish(where(round_id, client_id), receipt.to_json(), wait=False)

    def _status(self, state: str) -> bytes:
        status = msg.AggregatorStatus(
            federation=self.cfg.federation,
            state=state,  # type: ignore[arg-type]
            round=self.round_id,
            rounds_total=self.cfg.rounds,
            run=self.run_epoch,
        )
        if self.signing_key is not None:  # a live "finished" ends pinned agents: signed
            status = sign_status(self.signing_key, status)
        return status.to_json()
