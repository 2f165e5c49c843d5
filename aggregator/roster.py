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

    def __init__(self, warn: Warn, max_site_devices: int = 1000) -> None:
        """``max_site_devices``: the most devices one site's status may claim."""
        self.max_site_devices = max_site_devices
        self.agents: dict[str, msg.AgentStatus] = {}
        self.sites: dict[str, msg.SiteStatus] = {}  # site aggregators (docs/sites.md)
        self.cut_off: set[str] = set()  # sites whose bridge is down
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

    def on_site_status(self, topic: str, payload: bytes) -> None:
        """Record a site aggregator's status (docs/sites.md): a site is one contributor."""
        if not payload:
            return
        sender = topics.sender_of(topic)
        try:
            status = msg.decode(payload, msg.SiteStatus)
        except msg.MessageError as exc:
            self._warn(sender, "bad site status on %s: %s", topic, exc)
            return
        if topics.parse(topic).site != status.site:
            self._warn(sender, "ignoring status for site %r on %s", status.site, topic)
            return
        if status.devices > self.max_site_devices:
            self._warn(sender, "site %s claims %d devices: counted as %d (max-site-devices)",
                       status.site, status.devices, self.max_site_devices)  # fmt: skip
        if status.site in self.agents:  # a name used by a device (add-site refuses it)
            self._warn(sender, "ignoring site status of %r: a device has that name", status.site)
            return
        before = self.sites.get(status.site)
        if before is None or (before.state, before.devices) != (status.state, status.devices):
            log.info("site %s %s, %d devices behind it", status.site, status.state, status.devices)
        self.sites[status.site] = status

    def note_site(self, name: str) -> None:
        """``name`` is a site (its partial arrived on its site topic) whose status has not:
        counted as a site of one device until its status says more."""
        if name not in self.sites and name not in self.agents:
            self.sites[name] = msg.SiteStatus(site=name, state="online", devices=1)

    def on_site_bridge(self, site: str, payload: bytes) -> None:
        """Mosquitto's notification of ``site``'s bridge: ``0`` (its will on the central
        broker) while the uplink is down, ``1`` once it is back. A site cut off is not
        selected: a round does not wait for a partial that cannot arrive."""
        if payload in (b"0", b"1"):
            if site in self.sites or payload == b"0":
                log.info("site %s: bridge %s", site, "up" if payload == b"1" else "down")
            if payload == b"1":
                self.cut_off.discard(site)
            else:
                self.cut_off.add(site)

    def online(self) -> list[str]:
        """Agents whose last status is not ``offline``, and online sites with devices and a
        connected bridge, sorted."""
        agents = [c for c, s in self.agents.items() if s.state != "offline"]
        sites = [
            n
            for n, s in self.sites.items()
            if s.state == "online" and s.devices > 0 and n not in self.cut_off
        ]
        return sorted(agents + sites)

    def declared_samples(self, client_id: str) -> int | None:
        """The sample count ``client_id`` (a device or a site) declared in its status (None:
        no status yet)."""
        status = self.agents.get(client_id) or self.sites.get(client_id)
        return status.num_samples if status is not None else None

    def site_devices(self, name: str) -> int:
        """Devices behind site ``name`` (at least 1), 0 when ``name`` is no site."""
        status = self.sites.get(name)
        return 0 if status is None else max(1, min(status.devices, self.max_site_devices))
