"""Sites in one process: a central and per-site in-memory brokers, bridged like Mosquitto.

:class:`MemoryBridge` forwards exactly the topics of ``Topics.site_downlink`` (central ->
site) and ``Topics.site_uplink`` (site -> central), as the generated bridge does, keeping the
retain flag of the protocol's retained topics (Mosquitto's ``try_private``). Cut, it queues
the QoS 1 traffic in both directions (the persistent sessions' queues) and drops the QoS 0
model frames; restored, it delivers the queues, then the retained downlink state again (the
bridge subscribes anew at every connect). tests/integration/test_sites*.py run the real
Mosquitto bridge.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aggregator.service import AggregatorService
from aggregator.site_service import SiteAggregator
from edge_agent.agent import EdgeAgent
from shared.mqtt.base import Inbound, Session
from shared.mqtt.memory import MemoryBroker, MemoryTransport, topic_matches
from shared.protocol import topics
from tests.unit.inprocess import FED, Federation, Worker

T = topics.Topics(FED)
_RETAINED = {
    "global_meta",
    "global_model",
    "global_delta",
    "global_onnx",
    "round_start",
    "aggregator_status",
    "site_status",
}
_QOS0 = ("global_model", "global_delta", "global_onnx")


def _kind(topic: str) -> str:
    base = topics.split_chunk_topic(topic)
    return topics.parse(base[0] if base else topic).kind


class MemoryBridge:
    """One site's bridge between two in-memory brokers."""

    def __init__(self, central: MemoryBroker, site_broker: MemoryBroker, site: str) -> None:
        self.site = site
        self.central = central
        self.cut = False
        self.queued: list[tuple[MemoryTransport, Inbound]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        down = [(t, 1) for t in T.site_downlink(site)]
        up = [(t, 1) for t in T.site_uplink(site)]
        self.down_in = central.connector(Session(f"bridge-{site}-down", tuple(down))).start()
        self.up_in = site_broker.connector(Session(f"bridge-{site}-up", tuple(up))).start()
        self.down_out = site_broker.connector(Session(f"bridge-{site}-site")).start()
        self.up_out = central.connector(Session(f"bridge-{site}-central")).start()
        self.threads = [
            threading.Thread(target=self._pump, args=(self.down_in, self.down_out), daemon=True),
            threading.Thread(target=self._pump, args=(self.up_in, self.up_out), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump(self, source: MemoryTransport, sink: MemoryTransport) -> None:
        while not self._stop.is_set():
            try:
                item = source.inbox.get(timeout=0.02)
            except queue.Empty:
                continue
            with self._lock:
                if self.cut:
                    if _kind(item.topic) not in _QOS0:  # QoS 0 frames are lost in a cut
                        self.queued.append((sink, item))
                    continue
                self._forward(sink, item)

    @staticmethod
    def _forward(sink: MemoryTransport, item: Inbound) -> None:
        retain = _kind(item.topic) in _RETAINED
        sink.publish(item.topic, item.payload, retain=retain, wait=False)

    def set_cut(self, cut: bool) -> None:
        """Cut the link (queueing QoS 1 traffic) or restore it (flushing, then re-syncing the
        retained downlink state as a reconnecting bridge's subscriptions do)."""
        with self._lock:
            self.cut = cut
            if cut:
                return
            queued, self.queued = self.queued, []
            for sink, item in queued:
                self._forward(sink, item)
            for sub, _ in [(t, 1) for t in T.site_downlink(self.site)]:
                for topic in sorted(self._retained_central(sub)):
                    payload = self.central.retained(topic)
                    if payload is not None and _kind(topic) in _QOS0:
                        self.down_out.publish(topic, payload, retain=True, wait=False)

    def _retained_central(self, sub: str) -> list[str]:
        return [t for t in self.central._retained if topic_matches(sub, t)]

    def stop(self) -> None:
        """Stop forwarding."""
        self._stop.set()
        for t in self.threads:
            t.join(timeout=5)


@dataclass
class Sites(Federation):
    """A central federation (``Federation``'s broker and aggregator) plus sites: each its own
    in-memory broker, a bridge and a site aggregator, with agents on the site broker."""

    site_brokers: dict[str, MemoryBroker] = field(default_factory=dict)
    bridges: dict[str, MemoryBridge] = field(default_factory=dict)
    site_services: dict[str, SiteAggregator] = field(default_factory=dict)

    def add_site(self, name: str, **overrides: Any) -> SiteAggregator:
        """A site broker bridged to the central one, and its aggregator running on a thread."""
        broker = MemoryBroker(self.clock)
        self.site_brokers[name] = broker
        self.bridges[name] = MemoryBridge(self.broker, broker, name)
        cfg = replace(
            self.aggregator_config(),
            site=name,
            client_id="aggregator",
            state_dir=str(Path(self.tmp) / "sites" / name),
            **overrides,
        )
        service = SiteAggregator(cfg, broker.connector, self.clock)
        self.site_services[name] = service
        self.workers[f"site:{name}"] = Worker(f"site:{name}", service.run)
        return service

    def start_site_agent(self, site: str, client_id: str, seed: int, **overrides: Any) -> EdgeAgent:
        """An agent of ``site``, connected to the site's broker only."""
        agent = EdgeAgent(
            self.agent_config(client_id, seed, site=site, **overrides),
            self.site_brokers[site].connector,
            self.clock,
        )
        self.agents[client_id] = agent
        self.workers[client_id] = Worker(client_id, agent.run)
        return agent

    def site_online(self, site: str, devices: int) -> bool:
        """The central broker holds ``site``'s status with ``devices`` devices online."""
        from shared.protocol import messages as msg

        raw = self.broker.retained(T.site_status(site))
        if raw is None:
            return False
        status = msg.decode(raw, msg.SiteStatus)
        return status.state == "online" and status.devices >= devices

    def stop(self) -> None:
        super().stop()
        for bridge in self.bridges.values():
            bridge.stop()


def start_central(fed: Sites, **overrides: Any) -> AggregatorService:
    """The central aggregator of ``fed`` (FedAvg, no clipping: flat-comparable)."""
    return fed.start_aggregator(**{"clip": "none", **overrides})
