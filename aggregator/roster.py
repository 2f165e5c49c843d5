"""Who is there: the agents' retained statuses, as the aggregator last heard them.

Presence drives selection (online agents are invited) and bounds (a device's update may claim
no more samples than its status declared). Statuses are checked here: the ACL lets a device
write only its own status topic, so a payload naming another device is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared.protocol import messages as msg
from shared.protocol import topics

log = logging.getLogger("fedmq.aggregator")

Warn = Callable[..., None]  # (sender, fmt, *args): an aggregated, per-sender warning


class AgentRoster:
    """The latest status of every agent that ever reported one."""

    def __init__(self, warn: Warn) -> None:
        self.agents: dict[str, msg.AgentStatus] = {}
        self._warn = warn

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.agents

    def on_status(self, topic: str, payload: bytes) -> msg.AgentStatus | None:
        """Record a status message (an empty payload is a cleared retained status).

        Returns the status when it newly says the device refused a round because its build
        of the model has another architecture fingerprint (the service answers it), else None.
        """
        if not payload:
            return None
        sender = topics.sender_of(topic)
        try:
            status = msg.decode(payload, msg.AgentStatus)
        except msg.MessageError as exc:
            self._warn(sender, "bad agent status on %s: %s", topic, exc)
            return None
        if topics.parse(topic).client_id != status.client_id:
            self._warn(sender, "ignoring status for %r on %s", status.client_id, topic)
            return None
        before = self.agents.get(status.client_id)
        fresh = status.skipped and (before is None or before.round != status.round)
        if fresh:
            log.warning("%s skipped round %d: %s", status.client_id, status.round, status.skipped)
        self.agents[status.client_id] = status
        return status if fresh and status.model_fingerprint else None

    def online(self) -> list[str]:
        """Agents whose last status is not ``offline``, sorted."""
        return sorted(c for c, s in self.agents.items() if s.state != "offline")

    def declared_samples(self, client_id: str) -> int | None:
        """The sample count ``client_id`` declared in its status (None: no status yet)."""
        status = self.agents.get(client_id)
        return status.num_samples if status is not None else None
