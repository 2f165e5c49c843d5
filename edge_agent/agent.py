"""The edge agent: follows round announcements, trains locally, publishes compressed deltas.

All work runs on the thread that calls :meth:`EdgeAgent.run`; the network thread only
enqueues. The agent receives its transport (a :data:`~shared.mqtt.base.Connector`) and its
:class:`~shared.clock.Clock`: the command line gives it paho and the system clock, unit tests
an in-memory broker and a manual clock.

State comes from retained topics (global model, current round), so an agent that joins late
or restarts picks up the federation at once. After that it follows the compact
global deltas and downloads the full model only when it must (:mod:`edge_agent.model_sync`).
"""

from __future__ import annotations

import logging
import platform
import queue
import threading
import time

import numpy as np

from edge_agent.announcements import (
    DeviceLimits,
    check_announcement,
    check_finished,
    open_until,
    selects,
)
from edge_agent.availability import OnlineSpells
from edge_agent.config import AgentConfig
from edge_agent.device_data import DeviceData
from edge_agent.local_training import (
    DivergedTraining,
    LocalRound,
    LocalTrainer,
    UnusableRound,
    WrongModel,
    encoder_rng,
)
from edge_agent.model_sync import ModelSync
from edge_agent.outbox import COUNTED_CODES, MISSED_CODES, Outbox, receipt_is_final
from edge_agent.resend import UpdateSender, oldest_countable
from edge_agent.residual import DeviceFeedback
from shared.clock import Clock, SystemClock
from shared.compression.registry import needs_error_feedback
from shared.mqtt.base import Connector, Inbound, Outbound, Session
from shared.protocol import messages as msg
from shared.protocol import topics
from shared.protocol.frames import FrameError, FrameHeader, encode_frame, read_header
from shared.protocol.signing import load_public_key

log = logging.getLogger("fedmq.agent")

Tensors = dict[str, np.ndarray]


class EdgeAgent:
    """One device's participation in a federation."""

    def __init__(
        self,
        cfg: AgentConfig,
        connect: Connector,
        clock: Clock | None = None,
        trainer: LocalTrainer | None = None,
    ) -> None:
        """``trainer``: given when several agents share a process and its model objects
        (the fleet simulator, ``fedmq bench fleet``); each agent builds its own otherwise."""
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.topics = topics.Topics(cfg.federation)
        topics.validate_agent_id(cfg.client_id)  # not an inference server's id
        # A growing directory of sensor files is re-read at every round the device trains.
        self.device_data = DeviceData(cfg, self.clock.time)
        self.data, self.val = self.device_data.train, self.device_data.val
        self.trainer = trainer or LocalTrainer(cfg.client_id, cfg.threads)
        self.feedback = DeviceFeedback(cfg.resolved_state_dir(), cfg.federation)
        self.model_key = load_public_key(cfg.model_public_key) if cfg.model_public_key else None
        if self.model_key is None:
            log.warning(
                "%s: no --model-public-key: unsigned global models are accepted", cfg.client_id
            )
        # The global model, kept current from deltas (the full model only when needed).
        self.sync = ModelSync(
            cfg.federation,
            self.model_key,
            max_frame_bytes=cfg.max_frame_bytes,
            delta_wait_s=cfg.delta_wait_s,
            clock=self.clock.monotonic,
        )
        self.full_subscribed = True  # until it holds a model
        self.limits = DeviceLimits(cfg.max_local_epochs, cfg.max_batch_size)
        self.announcement: msg.RoundStart | None = None
        # When the followed round ends on this device's monotonic clock (open_until).
        self.round_ends = 0.0
        # Unacknowledged updates live on disk: a restarted agent re-sends, never re-trains.
        self.outbox = Outbox(cfg.resolved_state_dir(), cfg.federation, cfg.client_id)
        self.done_rounds: set[int] = set(self.outbox.rounds())
        self.seen_connects = 0
        self.rounds_trained = 0
        self.stop_event = threading.Event()
        status_topic = self.topics.agent_status(cfg.client_id)
        self.connect = connect
        self.session = Session(
            cfg.client_id,
            subscriptions=(
                (self.topics.global_model, 1),
                (self.topics.global_delta, 1),
                (self.topics.round_start_any, 1),
                (self.topics.receipt_any_round(cfg.client_id), 1),
                (self.topics.aggregator_status, 1),
            ),
            will=Outbound(status_topic, self._status("offline"), retain=True),
            births=lambda: [Outbound(status_topic, self._status("online"), retain=True)],
        )
        self.transport = connect(self.session)
        # Sends each update, and again until its receipt: edge_agent/resend.py.
        self.sender = UpdateSender(
            cfg.client_id, self.topics, self.outbox, self.clock, cfg.resend_after_s,
            lambda: self.transport, self._send,
        )  # fmt: skip
        # --online F: on-line in random spells (None: always); edge_agent/availability.py.
        self.spells = (
            OnlineSpells(cfg.online, cfg.online_spell_s, cfg.client_id, self.clock.monotonic())
            if cfg.online < 1
            else None
        )
        self.offline_spells = 0
        self.away = False  # in an off-line spell: disconnected on purpose

    # --- life cycle --------------------------------------------------------------------
    def run(self) -> int:
        """Participate until the federation finishes (or :meth:`stop`); return an exit code."""
        log.info(
            "%s: %d training samples%s",
            self.cfg.client_id,
            len(self.data),
            f", {len(self.val)} validation" if self.val is not None else "",
        )
        # Ready before announcing presence: "online" means able to train right away.
        if self.cfg.warm_up:
            log.info(
                "%s: training stack loaded in %.1fs", self.cfg.client_id, self.trainer.warm_up()
            )
        self.transport.start(timeout=self.cfg.connect_timeout)
        while not self.stop_event.is_set():
            if self.spells is not None and not self._follow_spells():
                continue
            item = self.clock.wait(self.transport.inbox, 0.5)
            if item is not None:
                self._dispatch(item)
            self._sync_subscriptions()
            self._maybe_train()
            self._maybe_resend()
        if not self.away:  # an off-line spell has already said goodbye
            self.transport.stop(
                [
                    Outbound(
                        self.topics.agent_status(self.cfg.client_id),
                        self._status("offline"),
                        retain=True,
                    )
                ]
            )
        model = self.sync.model
        log.info(
            "%s: stopped after training %d rounds (%d global deltas applied); holding the "
            "global model of round %s: %s",
            self.cfg.client_id,
            self.rounds_trained,
            self.sync.deltas_applied,
            model.round_id if model else "-",
            model.model_hash if model else "none",
        )
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step."""
        self.stop_event.set()

    def _follow_spells(self) -> bool:
        """``--online``: disconnect at an off-line spell, reconnect after it; True when on-line.

        Off-line, the device is gone as a powered-off one is: its last status says offline,
        nothing reaches it. Its state (model, outbox, residual) stays, and after the spell it
        connects again, takes the retained model and round, and re-sends what it holds.
        """
        assert self.spells is not None
        online = self.spells.at(self.clock.monotonic())
        if online == (not self.away):  # no change (a broker outage is the transport's)
            if self.away:
                self.clock.wait(queue.Queue(), 0.5)
            return online
        self.away = not online
        if not online:
            self.offline_spells += 1
            log.info("%s: off-line for %.0fs", self.cfg.client_id, self.spells.until
                     - self.clock.monotonic())  # fmt: skip
            self.transport.stop([Outbound(self.topics.agent_status(self.cfg.client_id),
                                          self._status("offline"), retain=True)])  # fmt: skip
            return False
        log.info("%s: on-line again", self.cfg.client_id)
        self.transport = self.connect(self.session)
        self.transport.start(timeout=self.cfg.connect_timeout)
        self.full_subscribed = True  # the session subscribes to the full model again
        self.seen_connects = 0  # re-send what is held, as after any reconnect
        return True

    # --- inbound -----------------------------------------------------------------------
    def _dispatch(self, item: Inbound) -> None:
        try:
            parsed = topics.parse(item.topic)
        except topics.TopicError as exc:
            log.warning("ignoring %s: %s", item.topic, exc)
            return
        if not item.payload:  # a cleared retained message
            return
        handlers = {
            "global_model": lambda i: self.sync.on_full_model(i.payload),
            "global_delta": lambda i: self.sync.on_delta(i.payload),
            "round_start": self._on_round_start,
            "receipt": self._on_receipt,
            "aggregator_status": self._on_aggregator_status,
        }
        handler = handlers.get(parsed.kind)
        if handler is None:
            return
        try:
            handler(item)
        except (FrameError, msg.MessageError) as exc:
            log.warning("rejected message on %s: %s", item.topic, exc)

    def _on_round_start(self, item: Inbound) -> None:
        ann = msg.decode(item.payload, msg.RoundStart)
        if ann.federation != self.cfg.federation:
            return
        # Never later than now: an Inbound made elsewhere may carry another clock's reading.
        now = self.clock.monotonic()
        ends = open_until(ann, min(item.received_at, now), item.retain)
        if ends < now:
            log.debug("ignoring expired announcement of round %d", ann.round)
            return
        # Signature (when pinned), cost, codecs, (run, round) order: refused = logged, skipped.
        check_announcement(ann, self.model_key, self.limits, self.announcement)
        if self.announcement is not None and ann.run != self.announcement.run:
            self._new_run(self.announcement.run, ann.run)
        again = self.announcement is not None and self.announcement.round == ann.round
        self.announcement, self.round_ends = ann, ends
        self.sync.on_announcement(ann.round, ann.base_hash, ann.download_codec, ann.run)
        # Its fate is unknown (a lost receipt may have said "accepted"): dropped, not given
        # back to the residual, which could count its mass twice. Asynchronous mode: an
        # update counts up to max_staleness versions later, so it stays until then.
        for old in self.outbox.drop_before(oldest_countable(ann)):
            log.info("round %d is over: its unacknowledged update is dropped", old)
        self.sender.on_announcement(ann, again, coalesce=item.retain)
        stored = self.outbox.base_hash(ann.round)
        if stored is not None and stored != ann.base_hash:
            # Another run of the federation (or a rolled-back aggregator): train afresh.
            log.warning("round %d: stored update is for another base model, dropped", ann.round)
            self.outbox.remove(ann.round)
            self.done_rounds.discard(ann.round)
        elif stored is not None:
            # (Re-)announced while we hold its update, e.g. by a restarted aggregator.
            self.done_rounds.add(ann.round)
            # A live re-announcement (a restarted aggregator) always gets the update again; the
            # retained copy a reconnect brings is the reconnect's own re-send (coalesced).
            self.sender.resend(ann.round, "round announced", coalesce=item.retain)

    def _new_run(self, old: int, new: int) -> None:
        """A new run of the federation: its rounds start again, the old run's state goes."""
        log.warning(
            "%s: run %d of %s supersedes run %d: its rounds start again",
            self.cfg.client_id,
            new,
            self.cfg.federation,
            old,
        )
        for r in self.outbox.rounds():
            self.outbox.remove(r)
        self.done_rounds.clear()
        self.sender.reset()
        self.feedback.reset()  # mass owed to the old run's model, not to the new one

    def _on_receipt(self, item: Inbound) -> None:
        receipt = msg.decode(item.payload, msg.Receipt)
        if receipt.client_id != self.cfg.client_id:
            return
        code = receipt.effective_code()
        (log.info if code in COUNTED_CODES else log.warning)(
            "round %d: update %s (%s)%s",
            receipt.round,
            receipt.status,
            code,
            f": {receipt.reason}" if receipt.reason else "",
        )
        if receipt_is_final(code):
            if code in MISSED_CODES:
                self._give_back(receipt.round)
            self.outbox.remove(receipt.round)
            self.sender.settled(receipt.round)
        elif receipt.status == "rejected":  # not counted yet, e.g. "busy": the next version
            self.sender.refused_for_now(receipt.round)

    def _give_back(self, round_id: int) -> None:
        """Return a refused top-k / low-rank update's mass to the residual (sent later).

        Only on a receipt that says the update was not counted: then its mass is still owed.
        """
        payload = self.outbox.get(round_id)
        if payload is None:
            return
        try:
            if needs_error_feedback(read_header(payload).codec):
                self.feedback.give_back(payload)
                log.info("round %d: its uncounted update goes back into the residual", round_id)
        except FrameError as exc:
            log.warning("round %d: stored update unreadable (%s)", round_id, exc)

    def _on_aggregator_status(self, item: Inbound) -> None:
        status = msg.decode(item.payload, msg.AggregatorStatus)
        # A retained "finished" is the previous federation's: keep waiting for the next one.
        if status.state == "finished" and not item.retain and self.cfg.exit_when_finished:
            check_finished(status, self.model_key, self.announcement)  # refused: logged
            log.info("federation %s finished", status.federation)
            self.stop()

    def _sync_subscriptions(self) -> None:
        """Follow the full-model topic only while the model sync needs it."""
        why = self.sync.policy.why_full()
        if bool(why) == self.full_subscribed:
            return
        self.full_subscribed = bool(why)
        # Logged once the broker has confirmed (the transport waits for SUBACK/UNSUBACK).
        if why:
            self.transport.subscribe(self.topics.global_model)
            log.info("%s: subscribed to the full global model (%s)", self.cfg.client_id, why)
        else:
            self.transport.unsubscribe(self.topics.global_model)
            log.info("%s: following global deltas only", self.cfg.client_id)

    # --- training ----------------------------------------------------------------------
    def _maybe_train(self) -> None:
        ann, model = self.announcement, self.sync.model
        if ann is None or model is None or ann.round in self.done_rounds:
            return
        if model.model_hash != ann.base_hash:
            return  # the announced base model has not arrived yet
        if ann.mode == "async":
            if self.outbox.rounds():
                return  # one update in flight at a time: train again once it is answered
        elif not selects(ann, self.cfg.client_id, self.cfg.site):
            return  # not invited
        unusable = self.device_data.reload()  # before the status: it declares the sample count
        self.data, self.val = self.device_data.train, self.device_data.val
        if unusable:
            self._skip_round(ann.round, unusable)
            return
        try:
            # Before any training: a device whose build of the model differs says so, once.
            self.trainer.check_model(ann.model, ann.fingerprint)
        except WrongModel as exc:
            self._skip_round(ann.round, str(exc), model_fingerprint=exc.device_fingerprint)
            return
        except UnusableRound as exc:
            self._skip_round(ann.round, str(exc))
            return
        self._publish_status("training", ann.round)
        try:
            local = self.trainer.train(
                ann.model, model.params, ann.train, self.data, self.val,
                self.cfg.slowdown, self.cfg.min_batch_ms / 1000,
            )  # fmt: skip
            t0 = time.perf_counter()
            payload = self._encode_update(ann, local)
        except (DivergedTraining, UnusableRound, FrameError) as exc:
            self._skip_round(ann.round, str(exc))
            return
        log.info(
            "round %d: trained %d samples in %.2fs (loss %.4f), update %d bytes "
            "(%s, encoded in %.0f ms)",
            ann.round,
            local.num_samples,
            local.meta["train_time_s"],
            local.meta["train_loss"],
            len(payload),
            ann.codec,
            (time.perf_counter() - t0) * 1000,
        )
        # Durable before it leaves: a crash after this line re-sends instead of re-training.
        self.outbox.put(ann.round, payload)
        self.done_rounds.add(ann.round)
        self.rounds_trained += 1
        self._send(ann.round, payload)
        self._publish_status("online", ann.round)

    def _encode_update(self, ann: msg.RoundStart, local: LocalRound) -> bytes:
        """The update frame of ``local``; FrameError when its delta cannot be encoded."""
        # Top-k / low-rank drop part of the update: error feedback sends it later.
        biased = needs_error_feedback(ann.codec)
        delta = self.feedback.compensate(local.delta) if biased else local.delta
        header = FrameHeader(
            kind="update",
            federation=self.cfg.federation,
            round=ann.round,
            client_id=self.cfg.client_id,
            base_hash=ann.base_hash,
            codec=ann.codec,
            num_samples=local.num_samples,
            # Global models and deltas received since the previous update: measured downloads.
            meta={**local.meta, "download_bytes": self.sync.take_download_bytes()},
        )
        rng = encoder_rng(ann.train.seed, self.cfg.client_id)
        encoded = encode_frame(header, delta, rng=rng)
        if biased:  # only once encoded: a refused delta leaves the residual as it was
            self.feedback.commit(delta, encoded.sent)
        return encoded.payload

    def _skip_round(self, round_id: int, why: str, model_fingerprint: str = "") -> None:
        """No update this round (another model, diverged training, unencodable delta): say
        so, carry on.

        The next global model is a fresh start; the aggregator learns why from the status
        (with this device's architecture fingerprint when that is why: it answers with a
        ``wrong-model`` receipt).
        """
        log.error("round %d skipped, no update sent: %s", round_id, why)
        self.done_rounds.add(round_id)
        self._publish_status("online", round_id, skipped=why, model_fingerprint=model_fingerprint)

    def _send(self, round_id: int, payload: bytes) -> None:
        """Publish the update of ``round_id``: every send and re-send goes through here."""
        self.sender.publish(round_id, payload)

    def _maybe_resend(self) -> None:
        """Re-send unacknowledged updates after a reconnect or a timeout (edge_agent/resend.py).

        The broker may have lost them (it restarted, or the connection died mid-upload),
        or the aggregator did (it restarted): only a receipt ends the re-sending.
        """
        reconnected = self.transport.connect_count != self.seen_connects
        self.seen_connects = self.transport.connect_count
        if self.announcement is not None:
            self.sender.due(self.announcement, self.done_rounds, self.round_ends, reconnected)

    # --- outbound ----------------------------------------------------------------------
    def _publish_status(
        self, state: str, round_id: int, skipped: str = "", model_fingerprint: str = ""
    ) -> None:
        self.transport.publish(
            self.topics.agent_status(self.cfg.client_id),
            self._status(state, round_id, skipped, model_fingerprint),
            retain=True,
            wait=False,
        )

    def _status(
        self, state: str, round_id: int = -1, skipped: str = "", model_fingerprint: str = ""
    ) -> bytes:
        return msg.AgentStatus(
            client_id=self.cfg.client_id,
            state=state,  # type: ignore[arg-type]
            num_samples=len(self.data),
            round=round_id,
            device={"machine": platform.machine(), "python": platform.python_version()},
            skipped=skipped[:300],
            model_fingerprint=model_fingerprint,
        ).to_json()
