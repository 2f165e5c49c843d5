"""When a device sends its update again: the re-send rules, in rounds and in version windows.

An update stays in the outbox (:mod:`edge_agent.outbox`) until a final receipt, and only a
receipt ends the re-sending: the broker may have lost it (it restarted, or the connection
died mid-upload), or the aggregator did (it restarted). :class:`UpdateSender` sends it again
after a reconnect, when its timer is up without a receipt, when its round is announced live
again (a restarted aggregator) and, in the asynchronous mode, at the next version when the
aggregator refused it "busy" for now. docs/async.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from edge_agent.outbox import Outbox
from shared.clock import Clock
from shared.mqtt.base import Transport
from shared.protocol import messages as msg
from shared.protocol.topics import Topics

log = logging.getLogger("fedmq.agent")

# Re-sends of one update closer together than this are one re-send.
RESEND_GAP_S = 1.0


def oldest_countable(ann: msg.RoundStart) -> int:
    """The oldest round whose update the aggregator may still count under ``ann``."""
    return ann.round - ann.max_staleness if ann.mode == "async" else ann.round


class UpdateSender:
    """Publishes the device's updates, and again until their receipts arrive."""

    def __init__(
        self,
        client_id: str,
        topics: Topics,
        outbox: Outbox,
        clock: Clock,
        resend_after_s: float,
        transport: Callable[[], Transport],
        send: Callable[[int, bytes], None],
    ) -> None:
        """``transport``: the agent's current one (an on-line spell connects a new one);
        ``send``: the agent's own send, which ends in :meth:`publish` (a subclass of the
        agent sees every send and re-send: the fleet bench logs them)."""
        self.client_id, self.topics, self.outbox, self.clock = client_id, topics, outbox, clock
        self.resend_after_s = resend_after_s
        self.transport, self.send = transport, send
        self.sent_at: dict[int, float] = {}  # round → monotonic time of the last send
        # Async: held updates refused for now ("busy"), sent again at the next version.
        self.retry_next_version: set[int] = set()

    def publish(self, round_id: int, payload: bytes) -> None:
        """Publish the update of ``round_id`` (QoS 1, not waiting for the broker)."""
        self.sent_at[round_id] = self.clock.monotonic()
        topic = self.topics.update(round_id, self.client_id)
        self.transport().publish(topic, payload, qos=1, wait=False)

    def resend(self, round_id: int, why: str, coalesce: bool = False) -> None:
        """Send the held update of ``round_id`` again (``coalesce``: not twice within
        :data:`RESEND_GAP_S`)."""
        payload = self.outbox.get(round_id)
        if payload is None:
            return
        last = self.sent_at.get(round_id)
        if coalesce and last is not None and self.clock.monotonic() - last < RESEND_GAP_S:
            # One event, two triggers (a reconnect and the retained announcement it brings):
            # the update goes out once.
            return
        log.warning("round %d: re-sending the unacknowledged update (%s)", round_id, why)
        self.send(round_id, payload)

    def on_announcement(self, ann: msg.RoundStart, again: bool, coalesce: bool) -> None:
        """A round (async: a version) announced; ``again``: the same one announced live again,
        ``coalesce``: the retained copy a reconnect brings."""
        self.retry_next_version.intersection_update(self.outbox.rounds())
        if ann.mode != "async":
            return
        # A new version: an update the aggregator asked to send again (refused "busy") is
        # owed to this window; one merely unanswered may have its receipt on the way (the
        # aggregator holds updates between windows), so the re-send timer covers it, as in
        # rounds. A live re-announcement of the same version (a restarted aggregator) gets
        # every held update again; a reconnect's retained copy: the reconnect re-sends.
        for held in self.outbox.rounds():
            if held < ann.round and (again or held in self.retry_next_version):
                self.retry_next_version.discard(held)
                self.resend(held, "asked to" if not again else "re-announced", coalesce=coalesce)

    def settled(self, round_id: int) -> None:
        """A final receipt for ``round_id``: nothing more to send."""
        self.sent_at.pop(round_id, None)
        self.retry_next_version.discard(round_id)

    def refused_for_now(self, round_id: int) -> None:
        """Not counted yet (e.g. "busy"): the update goes again at the next version."""
        self.retry_next_version.add(round_id)

    def reset(self) -> None:
        """A new run: the old run's sends are forgotten."""
        self.sent_at.clear()
        self.retry_next_version.clear()

    def due(
        self, ann: msg.RoundStart, done_rounds: Iterable[int], round_ends: float, reconnected: bool
    ) -> None:
        """Re-send unacknowledged updates under ``ann`` after a reconnect or a timeout.

        The timer waits while the transport is disconnected: a copy sent then would only wait
        in its queue beside the last one (an agent cut off for an hour would queue one more
        every ``resend_after_s``), and the reconnect re-sends once anyway.
        """
        if ann.mode == "async":  # every held update of the window, not only this round's
            oldest = oldest_countable(ann)
            for round_id in sorted(r for r in self.sent_at if r >= oldest):
                self._resend_due(round_id, reconnected)
            return
        if ann.round not in done_rounds:
            return
        if self.clock.monotonic() > round_ends and not reconnected:
            return
        self._resend_due(ann.round, reconnected)

    def _resend_due(self, round_id: int, reconnected: bool) -> None:
        """Re-send the update of ``round_id`` after a reconnect, or when its timer is up."""
        last = self.sent_at.get(round_id)
        if reconnected and last is not None:
            self.resend(round_id, "reconnected", coalesce=True)
        elif not self.transport().is_connected():
            return  # the reconnect re-sends
        elif last is None or self.clock.monotonic() - last >= self.resend_after_s:
            self.resend(round_id, "no receipt yet" if last is not None else "restarted")
