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

import msgspec
import numpy as np

from aggregator.async_config import async_settings
from aggregator.async_rounds import AsyncIntake, VersionWindow, window_from_history
from aggregator.checkpoint import CheckpointError
from aggregator.config import AggregatorConfig
from aggregator.downloads import GlobalDownloads, bytes_down
from aggregator.evaluation import Evaluator
from aggregator.intake import UpdateIntake, receipt_for
from aggregator.metrics_log import MetricsLog
from aggregator.model_check import next_global_model
from aggregator.onnx_export import RoundExporter, state_dir_of
from aggregator.resume import (
    EXIT_BUDGET,
    EXIT_STARVED,
    Durability,
    new_run_epoch,
    resolve_run,
    set_rng_state,
    starved_action,
)
from aggregator.roster import AgentRoster
from aggregator.round_records import ClosedRound, OpenRound, log_latency, round_start
from aggregator.round_strategy import (
    RoundAggregate,
    RoundStrategy,
    StrategyError,
    strategy_settings,
)
from aggregator.rounds import RoundPhase, RoundState, Verdict, select_clients, without_open_round
from aggregator.update_bounds import model_headroom
from aggregator.update_budget import IntakeGuard
from shared.clock import Clock, SystemClock
from shared.mqtt.base import Connector, Inbound, Outbound, Session
from shared.protocol import messages as msg
from shared.protocol import topics
from shared.protocol.claims import sign_round_start, sign_status
from shared.protocol.frames import read_header, tensors_hash
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
        # This run's epoch (a resumed one is set again by _restore): agents follow the largest.
        self.run_epoch = resolve_run(cfg.run, None, new_run_epoch(self.clock.time()))
        # What the broker must hold (retained), re-published after every reconnect: a broker
        # without persistence forgets it when it restarts. Current state only (one entry per
        # topic: model, delta, meta, status, metrics, the open round's announcement), so it
        # does not grow with the rounds: _publish.
        self._retained: dict[str, bytes] = {}
        self._seen_connects = 0
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
        self._window: VersionWindow | None = None  # the last async window (its successor)
        # Async: updates that arrived between two windows, offered to the next one (bounded:
        # beyond it they are answered no-round, and their agents re-send them).
        self.held_updates: list[Inbound] = []
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
        self.agents = AgentRoster(self._warn)
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
                ),
                will=Outbound(self.topics.aggregator_status, self._status("offline"), retain=True),
            )
        )

    # --- life cycle --------------------------------------------------------------------
    def run(self) -> int:
        """Run every round; return the process exit code."""
        cfg = self.cfg
        self.transport.start()
        self._seen_connects = self.transport.connect_count
        resumed = self._restore()
        log.info(
            "federation %s, run %d (agents follow the latest run)", cfg.federation, self.run_epoch
        )
        self._publish(self.topics.aggregator_status, self._status("running"), retain=True)
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
            self._report(closed)
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
            state = self._next_window(r, started)
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

    def _next_window(self, r: int, started: float) -> VersionWindow:
        """Async: version window ``r`` on the current model (after a restart: from the
        checkpoint's history)."""
        assert self.async_mode is not None
        deadline = started + self.cfg.round_timeout
        last = self._window
        if last is not None and last.round_id == r - 1:
            window = last.successor(r, self.model_hash, deadline, started)
        else:
            history = self.durable.history if self.durable is not None else []
            window = window_from_history(
                history, self.async_mode, r, self.model_hash, self.cfg.min_clients, deadline,
                started, self.initial_hash,
            )  # fmt: skip
        self._window = window
        return window

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

    def _restore(self) -> OpenRound | None:
        """Continue from the checkpoint; re-open (and replay) its next round if announced."""
        if self.durable is None:
            return None
        restored = self.durable.restore()  # CheckpointError (a ValueError): exit 1
        ckpt, jr = restored.checkpoint, restored.open_round
        self._continue_run(restored.run)
        if ckpt is not None:
            if {n: tuple(v.shape) for n, v in ckpt.params.items()} != self.shapes:
                # Same settings, another build of the model: a plugin changed version.
                raise CheckpointError(
                    f"the checkpoint's model is another architecture than {self.cfg.model!r} "
                    f"as built here (fingerprint {self.evaluator.fingerprint}): install the "
                    "model version it was trained with, or use another --state-dir"
                )
            # In the model's tensor order, not the file's (sorted): the download quantizer
            # draws its rounding noise tensor by tensor, so a resumed run draws as before.
            order = list(self.shapes)
            self.params = {n: ckpt.params[n] for n in order}
            self.model_hash, self.round_id = ckpt.model_hash, ckpt.round
            res = ckpt.residual
            self.downloads.residual = None if res is None else {n: res[n] for n in order}
            self.strategy.load_state(ckpt.strategy_tensors, ckpt.strategy)
            set_rng_state(self.rng, ckpt.rng_state)
            self.metrics.entries = self.metrics.earlier(ckpt.round)
            log.info("resumed from checkpoint: %d rounds applied", ckpt.round)
        if jr is None or jr.round > self.cfg.rounds:
            return None
        ann = jr.announce
        set_rng_state(self.rng, ann["rng_state"])
        started = self.clock.time()
        # A full window after a crash: agents must notice the re-announcement and re-send.
        deadline = max(float(ann["deadline"]), started + self.cfg.round_timeout)
        state: RoundState
        if self.async_mode is not None:
            state = self._next_window(jr.round, started)
            state.deadline, state.extensions = deadline, int(ann["extensions"])
        else:
            state = RoundState(
                jr.round,
                self.model_hash,
                set(ann["selected"]),
                self.cfg.min_clients,
                deadline,
                started,
                extensions=int(ann["extensions"]),
            )
        intake = self._intake(state)
        for client, payload in self.durable.journal.frames(jr):
            # An async window's updates name their base round (the frame's), not the window.
            base = read_header(payload).round if self.async_mode is not None else jr.round
            verdict = intake.offer(base, client, payload).verdict
            if not verdict.accepted:
                log.error("journaled update of %s refused on replay: %s", client, verdict.reason)
        log.info("round %d resumed with %d journaled updates", jr.round, len(state.accepted))
        self._announce(state)
        return OpenRound(state, intake, started)

    def _continue_run(self, saved: int | None) -> None:
        """Continue the state directory's run (or start this one); everything signs with it."""
        assert self.durable is not None
        self.run_epoch = resolve_run(self.cfg.run, saved, self.run_epoch)
        self.downloads.run = self.exporter.run = self.durable.run = self.run_epoch

    def _close_round(self, rnd: OpenRound) -> ClosedRound | None:
        """Collect updates until the round may be applied; apply it and publish the model.

        None when the round stayed below quorum after every extension (the federation fails).
        """
        state, intake = rnd.state, rnd.intake
        last_update_at = self.clock.monotonic()
        held, self.held_updates = self.held_updates, []
        for n, waiting in enumerate(held):
            if state.phase(self.clock.time()) is not RoundPhase.OPEN:  # K reached: the rest
                self.held_updates = held[n:] + self.held_updates  # wait for the next window
                break
            self._handle(waiting, intake)
        while (phase := state.phase(self.clock.time())) in (RoundPhase.OPEN, RoundPhase.STARVED):
            if phase is RoundPhase.STARVED:
                if not self._starved(state, intake):
                    return None
                continue
            self._after_reconnect()
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
        self._publish(self.topics.round_start(state.round_id), b"", retain=True)
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
        if isinstance(state, VersionWindow):
            announcement = msgspec.structs.replace(
                announcement, mode="async", max_staleness=state.max_staleness
            )
        if self.signing_key is not None:  # pinned agents follow only signed announcements
            announcement = sign_round_start(self.signing_key, announcement)
        # Retained, so an agent that (re)connects mid-round learns the round at once.
        self._publish(self.topics.round_start(state.round_id), announcement.to_json(), retain=True)
        log.info(
            "round %d started: %d selected, deadline in %.0fs",
            state.round_id,
            len(state.selected),
            state.deadline - self.clock.time(),
        )

    def _starved(self, state: RoundState, intake: UpdateIntake) -> bool:
        """Apply the --on-starved policy; False when the round has to fail."""
        cfg = self.cfg
        action = starved_action(state.extensions, cfg.on_starved, cfg.max_extensions)
        if action == "fail":
            why = f"below quorum ({len(state.accepted)}/{state.min_clients}) after "
            log.error("round %d failed: %s%d extensions", state.round_id, why, state.extensions)
            self._decide(state, "failed", why + f"{state.extensions} extensions")
            return False
        if action == "retry":
            online = [c for c in self.agents.online() if c not in state.accepted]
            fresh = select_clients(online, cfg.fraction, 1, self.rng) if online else []
            state.selected = set(state.accepted) | set(fresh) or state.selected
        self._extend(state, intake)
        self._decide(state, "retried" if action == "retry" else "extended", "below quorum")
        return True

    def _decide(self, state: RoundState, decision: str, reason: str) -> None:
        """Publish what happened to a round (operators and tests watch this topic)."""
        body = msg.RoundDecision(
            federation=self.cfg.federation,
            round=state.round_id,
            decision=decision,  # type: ignore[arg-type]
            accepted=len(state.accepted),
            min_clients=state.min_clients,
            extensions=state.extensions,
            deadline=state.deadline,
            reason=reason,
        )
        self._publish(self.topics.round_decision(state.round_id), body.to_json(), wait=False)

    def _after_reconnect(self) -> None:
        """After a reconnect, put back what a restarted broker may have forgotten."""
        if self.transport.connect_count == self._seen_connects:
            return
        self._seen_connects = self.transport.connect_count
        log.warning("reconnected: re-publishing the retained model, meta and round")
        for topic, payload in list(self._retained.items()):
            self._publish(topic, payload, retain=True, wait=False)

    def _extend(self, state: RoundState, intake: UpdateIntake) -> None:
        extra = [c for c in self.agents.online() if c not in state.selected]
        try:  # a rule holding the round makes room for the newly invited agents
            _aggregate(intake).grow(len(state.selected) + len(extra))
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
        self._announce(state)

    def _report(self, closed: ClosedRound) -> None:
        state = closed.round.state
        evaluation = self.evaluator.evaluate(closed.params)
        exported = self.exporter.after_round(
            closed.params, state.round_id, self._publish, closed.frame
        )
        metrics = closed.metrics(
            self.cfg.federation,
            codec=self.cfg.codec,
            download_codec=self.cfg.download_codec,
            evaluation=evaluation,
            onnx_export_s=exported.export_s if exported else None,
            task=self.spec.task,
        )
        if isinstance(state, VersionWindow):
            metrics = msgspec.structs.replace(
                metrics, mode="async", staleness=list(state.staleness)
            )
        self._publish(self.topics.metrics, metrics.to_json(), retain=True)
        self.metrics.append(metrics)
        quality = (
            f"rmse={metrics.test_rmse}"
            if metrics.task == "regression"
            else f"acc={metrics.test_accuracy}"
        )
        log.info(
            "round %d applied: %d updates, %s, %.1fs",
            state.round_id,
            metrics.accepted,
            quality,
            metrics.round_time_s,
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
            verdict = without_open_round(parsed.round_id, self._last_closed())
            if verdict.code == "no-round" and len(self.held_updates) < self._hold_room():
                self.held_updates.append(item)  # async: the next window takes it
                return False
            self._receipt(parsed.round_id, sender, verdict, site)
            return False
        offer = intake.offer(parsed.round_id, sender, item.payload)
        if offer.verdict.accepted and self.durable is not None and offer.stats is not None:
            # Durable before the receipt: an acknowledged update survives a crash. Journaled
            # under the open round (an async update names its base round, an earlier one).
            self.durable.accepted(
                intake.state.round_id, sender, offer.stats.num_samples, item.payload
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

    def _hold_room(self) -> int:
        """Updates held between two async windows, at most (0: sync, none held)."""
        return 0 if self.async_mode is None else 4 * self.async_mode.buffer

    def _last_closed(self) -> int:
        """The last round an update may no longer be counted for (async: the rounds
        within max_staleness of the next window still may)."""
        if self.async_mode is None:
            return self.round_id
        return self.round_id - self.async_mode.max_staleness

    def _wait_for_agents(self, count: int, timeout: float) -> bool:
        deadline = self.clock.monotonic() + timeout
        while len(self.agents.online()) < count:
            self._after_reconnect()
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return False
            item = self._next(timeout=min(remaining, 1.0))
            if item is not None:
                self._handle(item, None)
        # Presence that has already arrived counts too (e.g. the burst of retained statuses
        # right after subscribing): the selection sees every agent known by now.
        for _ in range(self.transport.inbox.qsize()):
            item = self._next(timeout=0.0)
            if item is None:
                break
            self._handle(item, None)
        return True

    def _wrong_model(self, status: msg.AgentStatus, intake: UpdateIntake | None) -> None:
        """A device refused a round: another build of the model (intake.decline_wrong_model)."""
        what = f"this device's build of {self.spec.arch!r} is another architecture"
        verdict = intake.decline_wrong_model(status, what) if intake is not None else None
        if verdict is not None:
            self._receipt(status.round, status.client_id, verdict)

    # --- outbound ----------------------------------------------------------------------
    def _publish_model(self, final: bool) -> None:
        self.downloads.publish(self.round_id, self.params, self.model_hash, final, self._publish)

    def _receipt(self, round_id: int, client_id: str, verdict: Verdict, site: bool = False) -> None:
        receipt = receipt_for(round_id, client_id, verdict)
        where = self.topics.site_receipt if site else self.topics.receipt
        self._publish(where(round_id, client_id), receipt.to_json(), wait=False)

    def _publish(self, topic: str, payload: bytes, retain: bool = False, wait: bool = True) -> None:
        if retain and not topic.startswith(f"{self.topics.root}/agents/"):
            if payload:
                self._retained[topic] = payload
            else:
                # A clearance (a closed round's announcement, a global delta) is not state to
                # put back: a broker that restarted without persistence has nothing to clear,
                # one with persistence saved it (unless it crashed before its autosave: the
                # announcement that comes back names a base model no longer current, and
                # agents that follow a later round refuse it). Kept, they made every
                # reconnect re-publish one empty message per round ever run.
                self._retained.pop(topic, None)
        self.transport.publish(topic, payload, retain=retain, wait=wait)

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
