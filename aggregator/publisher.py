"""What the aggregator publishes, and the retained state it puts back after a reconnect.

The broker must hold the service's current state (retained): global model, delta, meta,
status, metrics and the open round's announcement. A broker without persistence forgets it
when it restarts, so :class:`RetainedPublisher` keeps one entry per topic (current state
only: it does not grow with the rounds) and publishes it again after every reconnect.
"""

from __future__ import annotations

import logging

from shared.mqtt.base import Transport

log = logging.getLogger("fedmq.aggregator")


class RetainedPublisher:
    """Publishes on the service's transport, remembering its retained state to put back."""

    def __init__(self, transport: Transport, agents_prefix: str) -> None:
        """``agents_prefix``: topics under it (agents' own) are not the service's state."""
        self.transport = transport
        self.agents_prefix = agents_prefix
        self.retained: dict[str, bytes] = {}
        self.seen_connects = 0

    def started(self) -> None:
        """The transport is connected: reconnects are counted from here."""
        self.seen_connects = self.transport.connect_count

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: bool = True) -> None:
        """Publish ``payload``; a retained one is remembered (an empty one forgotten)."""
        if retain and not topic.startswith(self.agents_prefix):
            if payload:
                self.retained[topic] = payload
            else:
                # A clearance (a closed round's announcement, a global delta) is not state to
                # put back: a broker that restarted without persistence has nothing to clear,
                # one with persistence saved it (unless it crashed before its autosave: the
                # announcement that comes back names a base model no longer current, and
                # agents that follow a later round refuse it). Kept, they made every
                # reconnect re-publish one empty message per round ever run.
                self.retained.pop(topic, None)
        self.transport.publish(topic, payload, retain=retain, wait=wait)

    def after_reconnect(self) -> None:
        """After a reconnect, put back what a restarted broker may have forgotten."""
        if self.transport.connect_count == self.seen_connects:
            return
        self.seen_connects = self.transport.connect_count
        log.warning("reconnected: re-publishing the retained model, meta and round")
        for topic, payload in list(self.retained.items()):
            self.publish(topic, payload, retain=True, wait=False)
