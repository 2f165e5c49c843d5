"""The site aggregator: one partial aggregate of a site's devices per central round.

``fedmq-aggregator --site NAME`` runs beside a site broker bridged to the central one
(docs/sites.md). The central aggregator's signed announcements arrive over the bridge; when
one selects the site, the site's devices train it (their ``agent.toml`` names the site) and
upload to the site broker. Here their updates go through the central aggregator's own intake
(same checks, same receipts) and clipping into a streaming FedAvg, and at the end of the
site's share of the round one partial goes up: their weighted mean delta with their total
sample count (:mod:`aggregator.site_partials`). Nothing a device publishes crosses the bridge.

Durable with ``--state-dir``: accepted device updates are journaled before their receipt
(a restarted site re-opens the round from the retained announcement and replays them), and a
partial is on disk until the central aggregator's receipt for it arrives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.intake import UpdateIntake, receipt_for
from aggregator.journal import RoundJournal
from aggregator.roster import AgentRoster
from aggregator.round_strategy import (
    RoundAggregate,
    RoundStrategy,
    StrategyError,
    strategy_settings,
)
from aggregator.rounds import RoundPhase, RoundState, Verdict, without_open_round
from aggregator.site_partials import PartialEncoder, PartialOutbox, partial_meta
from aggregator.update_budget import IntakeGuard
from shared.clock import Clock, SystemClock
from shared.mqtt.base import Connector, Inbound, Outbound, Session
from shared.protocol import messages as msg
from shared.protocol import topics
from shared.protocol.claims import verify_round_start, verify_status
from shared.protocol.frames import FrameError
from shared.protocol.signing import SignatureError, load_public_key
from shared.runtime.modelio import param_shapes
from shared.runtime.plugins import architecture_fingerprint, build_from_spec

log = logging.getLogger("fedmq.site")

WARN_INTERVAL_S = 10.0
# The site's status (retained, it crosses the WAN) changes with every device that comes or
# goes: published at most this often, and at once when a round opens or closes.
STATUS_INTERVAL_S = 5.0
# An unacknowledged partial is published again after this long (the bridge queues it while
# the uplink is down; this covers a site broker that lost it).
RESEND_S = 30.0
# Answers of the central aggregator after which a partial is not sent again.
_FINAL = frozenset({"accepted", "duplicate"})
_RETRY = frozenset({"no-round", "busy", "rate-limited", "wrong-round"})


@dataclass
class SiteRound:
    """The central round the site is summing."""

    ann: msg.RoundStart
    state: RoundState
    intake: UpdateIntake


class SiteAggregator:
    """Runs one site's share of every central round until the central run finishes."""

    def __init__(
        self, cfg: AggregatorConfig, connect: Connector, clock: Clock | None = None
    ) -> None:
        if cfg.site is None:
            raise ValueError("a site aggregator needs --site")
        self.cfg = cfg
        self.site = cfg.site
        self.clock: Clock = clock or SystemClock()
        self.topics = topics.Topics(cfg.federation)
        self.central_key = load_public_key(cfg.central_key) if cfg.central_key else None
        if self.central_key is None:
            log.warning("no --central-key: following unsigned announcements (dev only)")
        state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        self.journal = RoundJournal(state_dir) if state_dir else None
        self.outbox = PartialOutbox(state_dir)
        self.encoder = PartialEncoder(cfg.federation, self.site, cfg.partial_codec)
        self.devices = AgentRoster(self._warn)
        self.guard = IntakeGuard(log, WARN_INTERVAL_S, cfg.update_burst, cfg.update_rate)
        self.current: SiteRound | None = None
        self.done_round = -1  # the last round whose share the site has finished
        self.contributors: dict[str, int] = {}  # the last partial's devices and samples
        self.sent_at: dict[int, float] = {}
        self.uplink_up = True  # the bridge's state (assumed up until it says otherwise)
        self.strategy: RoundStrategy | None = None  # built from the first announcement's model
        self._model: tuple[msg.ModelSpec, str] | None = None
        self._status_due = 0.0
        self._status_dirty = True
        self._seen_connects = 0
        self.finished = False
        self.transport = connect(
            Session(
                cfg.client_id,
                # Device statuses first: their retained copies then arrive before a retained
                # announcement, so a restarted site waits for every device online.
                subscriptions=(
                    (self.topics.agent_status_any, 1),
                    (self.topics.round_start_any, 1),
                    (self.topics.round_decision_any, 1),
                    (self.topics.aggregator_status, 1),
                    (self.topics.update_any, 1),
                    (self.topics.site_receipt_any(self.site), 1),
                    # The bridge's own state, which Mosquitto also publishes on the site
                    # broker: no re-sends into a cut uplink (its queue holds the partial).
                    (self.topics.site_bridge(self.site), 1),
                ),
                will=Outbound(
                    self.topics.site_status(self.site), self._status("offline"), retain=True
                ),
            )
        )

    # --- life cycle --------------------------------------------------------------------
    def run(self) -> int:
        """Serve central rounds until the central aggregator's run finishes; exit code."""
        self.transport.start()
        self._seen_connects = self.transport.connect_count
        log.info("site %s of federation %s: waiting for rounds", self.site, self.cfg.federation)
        for round_id in self.outbox.rounds():  # from before a restart
            self._send(round_id)
        self._publish_status(force=True)
        while not self.finished:
            self._after_reconnect()
            item = self.clock.wait(self.transport.inbox, self._timeout())
            if item is not None:
                self._handle(item)
            self._tick()
        self.guard.close()
        self.transport.stop(
            [Outbound(self.topics.site_status(self.site), self._status("offline"), retain=True)]
        )
        log.info("site %s: the central run finished", self.site)
        return 0

    def stop(self) -> None:
        """End :meth:`run` at its next wake-up (another thread: tests, a signal handler)."""
        self.finished = True

    def _timeout(self) -> float:
        if self.current is None:
            return 1.0
        return min(1.0, max(0.01, self.current.state.deadline - self.clock.time()))

    def _tick(self) -> None:
        """Close the site's round when it is due; re-send partials nobody answered."""
        self.guard.flush(self.clock.monotonic())
        rnd = self.current
        if rnd is not None and self._due(rnd.state):
            self._close(rnd)
        now = self.clock.monotonic()
        for round_id in self.outbox.rounds() if self.uplink_up else []:
            if now - self.sent_at.get(round_id, -math.inf) >= RESEND_S:
                log.warning("round %d: no receipt for the partial yet: sending it again", round_id)
                self._send(round_id)
        self._publish_status()

    def _due(self, state: RoundState) -> bool:
        """The site's share is over: its deadline passed, or every device it waits for has
        answered (and at least one counted: a round that no device has joined yet waits)."""
        now = self.clock.time()
        if now >= state.deadline:
            return True
        return bool(state.accepted) and state.phase(now) is not RoundPhase.OPEN

    # --- a central round ---------------------------------------------------------------
    def _on_announcement(self, item: Inbound, round_id: int) -> None:
        if not item.payload:  # the central aggregator closed the round (cleared it)
            self._central_closed(round_id, "its announcement was cleared")
            return
        try:
            ann = msg.decode(item.payload, msg.RoundStart)
            if self.central_key is not None:
                verify_round_start(self.central_key, ann)
        except (msg.MessageError, SignatureError) as exc:
            self._warn(None, "round %d announcement refused: %s", round_id, exc)
            return
        if ann.federation != self.cfg.federation or ann.round != round_id:
            self._warn(None, "round %d announcement for another round or federation", round_id)
            return
        if ann.mode != "sync":
            self._warn(None, "round %d is asynchronous: sites follow sync rounds only", round_id)
            return
        if self.site not in ann.selected or ann.round <= self.done_round:
            if ann.round in self.outbox.pending:  # re-announced (extended): still unanswered
                self._send(ann.round)
            return
        remaining = max(0.0, ann.deadline - ann.ts) * (1 - self.cfg.site_margin)
        rnd = self.current
        if rnd is not None and rnd.ann.round == ann.round:  # extended: more time
            rnd.state.deadline = max(rnd.state.deadline, self.clock.time() + remaining)
            rnd.ann = ann
            return
        if rnd is not None:  # a newer round: the old one is over at central
            self._close(rnd)
        self._open(ann, remaining)

    def _open(self, ann: msg.RoundStart, remaining: float) -> None:
        try:
            strategy, fingerprint = self._strategy_for(ann)
        except (StrategyError, ValueError) as exc:
            log.error("round %d: cannot sum this model here: %s", ann.round, exc)
            self.done_round = ann.round
            return
        if ann.fingerprint and ann.fingerprint != fingerprint:
            log.error(
                "round %d: the central model's fingerprint %s is not this site's build (%s): "
                "install the same model version here",
                ann.round,
                ann.fingerprint,
                fingerprint,
            )
            self.done_round = ann.round
            return
        now = self.clock.time()
        devices = set(self.devices.online())
        state = RoundState(ann.round, ann.base_hash, devices or {""}, 1, now + remaining, now)
        state.selected.discard("")  # devices that come online during the round join it
        aggregate = strategy.open_round(max(1, len(devices)))
        self.guard.new_round()
        intake = UpdateIntake(
            self.cfg.federation,
            state,
            aggregate,
            min(self.cfg.max_update_bytes, ann.max_update_bytes),
            self.cfg.max_update_norm,
            max_samples=self.cfg.max_samples,
            declared=self.devices.declared_samples,
            fingerprint=ann.fingerprint or fingerprint,
        )
        self.current = SiteRound(ann, state, intake)
        if self.journal is not None:
            self.journal.announce(ann.round, ann.base_hash, sorted(devices), state.deadline, 0, {})
            self._replay(self.current)
        log.info(
            "round %d: summing for central, %d devices online, %.0fs",
            ann.round,
            len(devices),
            remaining,
        )
        self._publish_status(force=True)

    def _replay(self, rnd: SiteRound) -> None:
        """Updates journaled before a restart count again (their devices had receipts)."""
        assert self.journal is not None
        jr = self.journal.load(rnd.ann.round)
        if jr is None:
            return
        for client, payload in self.journal.frames(jr):
            self._join(rnd, client)
            verdict = rnd.intake.offer(rnd.ann.round, client, payload).verdict
            if not verdict.accepted:
                log.error("journaled update of %s refused on replay: %s", client, verdict.reason)
        if rnd.state.accepted:
            log.info("round %d resumed with %d journaled updates", rnd.ann.round, len(jr.accepted))

    def _strategy_for(self, ann: msg.RoundStart) -> tuple[RoundStrategy, str]:
        """The site's strategy (its clipping) for the announced model, and the fingerprint of
        the model as built here; rebuilt when the model changes."""
        if self._model is None or self._model[0] != ann.model or self.strategy is None:
            model = build_from_spec(ann.model)
            shapes = param_shapes(model)
            self.strategy = RoundStrategy(strategy_settings(self.cfg), shapes)
            self._model = (ann.model, architecture_fingerprint(model))
        return self.strategy, self._model[1]

    def _close(self, rnd: SiteRound) -> None:
        """The site's share of the round is over: send its partial (if any device counted)."""
        self.current = None
        self.done_round = max(self.done_round, rnd.ann.round)
        state, intake = rnd.state, rnd.intake
        state.close()
        # The partial may claim no more samples than the site's status declares at central:
        # its contributors count there even if they have gone offline since.
        self.contributors = dict(state.accepted)
        self._publish_status(force=True)
        aggregate = intake.acc
        assert isinstance(aggregate, RoundAggregate) and self.strategy is not None
        if not state.accepted:
            log.warning("round %d: no device update arrived: no partial", state.round_id)
            return
        delta = aggregate.partial()
        self.strategy.close(aggregate, applied=True)
        try:
            payload = self.encoder.encode(rnd.ann, delta, state.num_samples, partial_meta(intake))
        except FrameError as exc:
            log.error("round %d: the partial cannot be encoded: %s", state.round_id, exc)
            return
        self.outbox.put(state.round_id, payload)  # durable before it leaves
        if self.journal is not None:
            self.journal.clear_through(state.round_id)
        log.info(
            "round %d: partial of %d devices, %d samples, %d bytes",
            state.round_id,
            len(state.accepted),
            state.num_samples,
            len(payload),
        )
        self._send(state.round_id)

    def _central_closed(self, round_id: int, why: str) -> None:
        """The central round ended (decision or cleared announcement)."""
        rnd = self.current
        if rnd is not None and rnd.ann.round == round_id:
            log.warning(
                "round %d closed at central before the site's share ended (%s): its %d device "
                "updates are not counted",
                round_id,
                why,
                len(rnd.state.accepted),
            )
            self.current = None
            self.done_round = max(self.done_round, round_id)
            self._publish_status(force=True)

    def _send(self, round_id: int) -> None:
        payload = self.outbox.pending.get(round_id)
        if payload is None:
            return
        self.sent_at[round_id] = self.clock.monotonic()
        topic = self.topics.site_partial(round_id, self.site)
        self.transport.publish(topic, payload, qos=1, wait=False)

    def _on_receipt(self, item: Inbound, round_id: int) -> None:
        try:
            receipt = msg.decode(item.payload, msg.Receipt)
        except msg.MessageError as exc:
            self._warn(None, "bad receipt on %s: %s", item.topic, exc)
            return
        code = receipt.effective_code()
        if round_id not in self.outbox.pending:
            return
        if code in _RETRY:
            log.info("round %d: central answered %s: sending it again later", round_id, code)
            return
        payload = self.outbox.done(round_id)
        self.sent_at.pop(round_id, None)
        if code in _FINAL:
            log.info("round %d: central counted the partial (%s)", round_id, code)
        else:
            log.error("round %d: central refused the partial (%s): %s", round_id, code,
                      receipt.reason)  # fmt: skip
            if code == "late" and payload is not None:
                self.encoder.give_back(payload)

    # --- inbound -----------------------------------------------------------------------
    def _handle(self, item: Inbound) -> None:
        try:
            parsed = topics.parse(item.topic)
        except topics.TopicError as exc:
            self._warn(topics.sender_of(item.topic), "ignoring message on %s: %s", item.topic, exc)
            return
        kind, round_id = parsed.kind, parsed.round_id
        if kind == "round_start" and round_id is not None:
            self._on_announcement(item, round_id)
        elif kind == "decision" and round_id is not None:
            self._on_decision(item, round_id)
        elif kind == "site_receipt" and round_id is not None and parsed.site == self.site:
            self._on_receipt(item, round_id)
        elif kind == "site_bridge" and parsed.site == self.site:
            self._on_bridge(item.payload)
        elif kind == "aggregator_status":
            self._on_central_status(item)
        elif kind == "agent_status":
            self.devices.on_status(item.topic, item.payload)
            self._on_device_status(parsed.client_id)
        elif kind == "update" and round_id is not None and parsed.client_id is not None:
            self._on_update(item, round_id, parsed.client_id)

    def _on_bridge(self, payload: bytes) -> None:
        """The uplink went down (``0``) or came back (``1``). Back: the bridge delivers the
        partials it queued, so the re-send timers start again from now."""
        if payload not in (b"0", b"1") or (payload == b"1") == self.uplink_up:
            return
        self.uplink_up = payload == b"1"
        log.warning("site %s: uplink %s", self.site, "back" if self.uplink_up else "down")
        if self.uplink_up:
            now = self.clock.monotonic()
            for round_id in self.outbox.rounds():
                self.sent_at[round_id] = now

    def _on_decision(self, item: Inbound, round_id: int) -> None:
        try:
            decision = msg.decode(item.payload, msg.RoundDecision)
        except msg.MessageError:
            return
        if decision.decision in ("applied", "failed", "discarded"):
            self._central_closed(round_id, f"decision {decision.decision}")

    def _on_central_status(self, item: Inbound) -> None:
        if not item.payload:
            return
        try:
            status = msg.decode(item.payload, msg.AggregatorStatus)
            if self.central_key is not None and status.state == "finished":
                verify_status(self.central_key, status)
        except (msg.MessageError, SignatureError) as exc:
            self._warn(None, "central status refused: %s", exc)
            return
        if status.state == "finished" and status.federation == self.cfg.federation:
            self.finished = True

    def _on_device_status(self, client_id: str | None) -> None:
        rnd = self.current
        if client_id is not None and rnd is not None and client_id in self.devices.online():
            self._join(rnd, client_id)  # a device online during the round joins it
        self._status_dirty = True

    def _on_update(self, item: Inbound, round_id: int, client: str) -> None:
        read, answer = self.guard.admit(client, self.clock.monotonic())
        if not read:
            if answer is not None:
                self._receipt(round_id, client, answer)
            return
        rnd = self.current
        if rnd is None or round_id != rnd.ann.round:
            self._receipt(round_id, client, without_open_round(round_id, self.done_round))
            return
        self._join(rnd, client)  # the site broker's ACL: only this device writes here
        offer = rnd.intake.offer(round_id, client, item.payload)
        if offer.verdict.accepted and self.journal is not None and offer.stats is not None:
            self.journal.accept(round_id, client, offer.stats.num_samples, item.payload)
        self._receipt(round_id, client, offer.verdict)
        if not offer.verdict.accepted:
            self._warn(client, "rejected update from %s for round %d (%s): %s", client,
                       round_id, offer.verdict.code, offer.verdict.reason)  # fmt: skip
        self._status_dirty = True

    def _join(self, rnd: SiteRound, client: str) -> None:
        """``client`` takes part in the open round; the round makes room for it (round 1 of
        the adaptive clipping bound holds its updates until their median is known)."""
        if client in rnd.state.selected:
            return
        rnd.state.selected.add(client)
        aggregate = rnd.intake.acc
        if isinstance(aggregate, RoundAggregate):
            try:
                aggregate.grow(len(rnd.state.selected))
            except StrategyError as exc:  # its update is refused with a receipt instead
                log.warning("round %d: no room for %s: %s", rnd.ann.round, client, exc)

    # --- outbound ----------------------------------------------------------------------
    def _receipt(self, round_id: int, client_id: str, verdict: Verdict) -> None:
        receipt = receipt_for(round_id, client_id, verdict)
        self.transport.publish(
            self.topics.receipt(round_id, client_id), receipt.to_json(), wait=False
        )

    def _after_reconnect(self) -> None:
        if self.transport.connect_count == self._seen_connects:
            return
        self._seen_connects = self.transport.connect_count
        log.warning("reconnected to the site broker: status and unanswered partials again")
        self._publish_status(force=True)
        for round_id in self.outbox.rounds():
            self._send(round_id)

    def _publish_status(self, force: bool = False) -> None:
        """The site's status, when it changed: at once between rounds (the central selection
        needs the devices), at most every STATUS_INTERVAL_S while a round is summing."""
        now = self.clock.monotonic()
        idle = self.current is None
        if not force and (not self._status_dirty or (now < self._status_due and not idle)):
            return
        self._status_dirty, self._status_due = False, now + STATUS_INTERVAL_S
        self.transport.publish(
            self.topics.site_status(self.site), self._status("online"), retain=True, wait=False
        )

    def _status(self, state: str) -> bytes:
        rnd = self.current
        counted = dict(self.contributors)
        if rnd is not None:
            counted.update(rnd.state.accepted)
        online = set(self.devices.online())
        declared = sum(self.devices.declared_samples(c) or 0 for c in online - set(counted))
        return msg.SiteStatus(
            site=self.site,
            state=state,  # type: ignore[arg-type]
            devices=len(online | set(counted)),
            num_samples=declared
            + sum(max(n, self.devices.declared_samples(c) or 0) for c, n in counted.items()),
            round=max(self.done_round, -1),
            open_round=rnd.ann.round if rnd is not None else -1,
            updates=len(rnd.state.accepted) if rnd is not None else 0,
        ).to_json()

    def _warn(self, sender: str | None, fmt: str, *args: object) -> None:
        self.guard.warn(sender, self.clock.monotonic(), fmt, *args)
