"""A compromised device against a real Mosquitto: junk floods, stolen client ids, plaintext.

- a device floods junk on its own update topic: the honest round is applied promptly, the
  aggregator's memory does not grow with the flood, and the flood becomes a few receipts
  and log lines, not one of each per message (transport inbox, update budget, aggregated log);
- a device connects with the client id ``aggregator`` or another device's: on the provisioned
  broker it gets its own id (``use_username_as_clientid``) and nobody is disconnected;
- a provisioned agent whose broker URL is turned into plain ``mqtt://``: it refuses, and its
  password never crosses the wire;
- the demo's round table keeps going after a status on an invalid topic.

Each failed before its fix; the figures printed here (``pytest -s``) are in docs/security.md.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.ops import provision
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.monitor import RoundTable
from shared.mqtt.options import ConnectOptions
from shared.mqtt.transport import MqttTransport
from shared.protocol import messages as msg
from shared.protocol.topics import Topics
from tests.integration import federation as fed
from tests.integration.test_security import SecureBroker, _connect
from tests.integration.test_security import secure as secure  # the provisioned TLS broker

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
HONEST = ("pi-0", "pi-1", "pi-2")
HONEST_UPDATES = [T.update(1, c) for c in HONEST]


# --- finding 9: a junk flood ------------------------------------------------------------------
def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def _flood(client: mqtt.Client, count: int, size: int) -> float:
    """Publish ``count`` junk messages at QoS 0 as fast as paho goes; seconds until all left.

    A QoS 1 marker after them: its PUBACK means the broker has read every one before it.
    """
    junk = b"\x00" * size
    t0 = time.monotonic()
    for _ in range(count):
        client.publish(T.update(1, "mallory"), junk, qos=0)
    client.publish(T.update(1, "mallory"), b"end", qos=1).wait_for_publish(60)
    return time.monotonic() - t0


@dataclass
class _Run:
    """A federation of three honest agents, a watcher and mallory, the flooding device."""

    agg: subprocess.Popen[bytes]
    agents: list[subprocess.Popen[bytes]]
    seen: fed.Inbox  # the round: its start, the honest updates, its decision
    receipts: fed.Inbox  # the flooder's receipts (its own client: a flood of them may be
    # more than Mosquitto queues for one subscriber, and must not hide the decision)
    receipt_watcher: mqtt.Client
    mallory: mqtt.Client
    workdir: Path

    def finish(self) -> tuple[int, int]:
        """Wait for the federation's end; the flooder's receipts and the log lines about it."""
        assert fed.wait_exit(self.agg, 120, self.workdir / "aggregator.log") == 0
        fed.wait_agents(self.agents, list(HONEST), self.workdir)
        marker = T.receipt(999, "mallory")  # routed after everything the aggregator sent
        self.receipt_watcher.publish(marker, b"marker", qos=1).wait_for_publish(10)
        got = fed.until(self.receipts, fed.on(marker), 30, "the marker")
        log = (self.workdir / "aggregator.log").read_text(errors="replace")
        return len(got) - 1, sum("mallory" in line for line in log.splitlines())


@contextmanager
def _federation(broker: LocalBroker, mqtt_client: Any, workdir: Path) -> Iterator[_Run]:
    clients = fed.write_client_data(workdir / "data", len(HONEST))
    seen = fed.collect(
        mqtt_client(broker.url, "watcher"), T.round_start(1), T.round_decision(1), *HONEST_UPDATES
    )
    receipt_watcher = mqtt_client(broker.url, "receipt-watcher")
    receipts = fed.collect(receipt_watcher, T.receipt_any_round("mallory"))
    mallory = mqtt_client(broker.url, "mallory")
    agg = fed.start_aggregator(broker.url, workdir, "--no-onnx", rounds=2)
    agents = [fed.start_agent(broker.url, c, clients[i], workdir) for i, c in enumerate(HONEST)]
    try:
        fed.next_on(seen, T.round_start(1), 120)
        yield _Run(agg, agents, seen, receipts, receipt_watcher, mallory, workdir)
    finally:
        fed.resume([agg])
        fed.stop([agg, *agents])


def test_a_junk_flood_ahead_of_the_honest_updates_costs_the_aggregator_little(
    broker: LocalBroker, mqtt_client: Any, tmp_path: Path
) -> None:
    # The flood: 20,000 four-byte messages. The aggregator is paused while they
    # and then the honest updates reach it, so all of them wait in its socket, the flood
    # first (they fit in the loopback buffers: Mosquitto drops nothing).
    with _federation(broker, mqtt_client, tmp_path) as run:
        fed.pause([run.agg])
        rss_before = _peak_rss_mb(run.agg.pid)
        flood_s = _flood(run.mallory, 20_000, 4)
        got = fed.until_each(run.seen, HONEST_UPDATES, 120, "the honest updates")
        resumed = time.monotonic()
        fed.resume([run.agg])
        got += fed.until(run.seen, fed.on(T.round_decision(1)), 180, "round 1's decision")
        rss_after = _peak_rss_mb(run.agg.pid)
        receipts, lines = run.finish()

    decision = next(m for m in got if m.topic == T.round_decision(1))
    latency = decision.timestamp - resumed  # paho stamps messages with time.monotonic()
    print(
        f"\nMEASURED 20000 x 4 B sent in {flood_s:.2f}s ahead of the honest updates: round 1 "
        f"applied {latency:.2f}s after the aggregator resumed; its peak RSS {rss_before:.0f} "
        f"-> {rss_after:.0f} MB; {receipts} receipts to the flooder, {lines} aggregator log "
        "lines about it"
    )
    # The latency and the peak RSS are figures (docs/security.md), not assertions: both depend
    # on the machine's load (the RSS grew 8-11 MB idle, 21 MB once beside a full CI run; 56 MB
    # before the fix). What the fix guarantees regardless: the flood costs a bounded number of
    # receipts and log lines, and the round is applied with every honest update.
    assert json.loads(decision.payload)["decision"] == "applied"
    assert receipts <= 30
    assert lines <= 20
    assert [r["accepted"] for r in fed.metrics(tmp_path)] == [3, 3]


# --- finding 10: stolen client ids --------------------------------------------------------------
def _transport(sb: SecureBroker, user: str) -> MqttTransport:
    options = ConnectOptions(
        username=user, password=sb.password(user), ca_file=str(sb.root / "ca.crt")
    )
    return MqttTransport(sb.url, user, options=options).start(timeout=10)


def _round_trip(transport: MqttTransport, topic: str) -> None:
    """A QoS 1 publish and its PUBACK: the connection works (or was re-made) by now."""
    transport.publish(topic, b"still here", timeout=15)


def test_a_device_cannot_take_over_the_aggregator_s_or_another_device_s_client_id(
    secure: SecureBroker,
) -> None:
    aggregator = _transport(secure, "aggregator")
    victim = _transport(secure, "pi-1")
    try:
        for _ in range(5):  # the issue saw the aggregator kicked 24 times in 28 s
            for stolen in ("aggregator", "pi-1"):
                thief, rc = _connect(secure, "pi-0", client_id=stolen)
                thief.disconnect()
                thief.loop_stop()
                assert not rc.is_failure, rc  # it may connect, as itself
                _round_trip(aggregator, T.aggregator_status)
                _round_trip(victim, T.agent_status("pi-1"))
        counts = (aggregator.connect_count, victim.connect_count)
    finally:
        aggregator.stop()
        victim.stop()

    assert counts == (1, 1)  # never disconnected, never reconnected
    log = secure.broker.log_text()
    assert "already connected, closing old connection" not in log


# --- finding 11 (part): a password in clear text ---------------------------------------------
class _WireTap:
    """A TCP relay to the broker that records every byte a client sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, record in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, record), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def tap(broker: LocalBroker) -> Iterator[_WireTap]:
    wire = _WireTap(broker.port)
    yield wire
    wire.close()


def test_a_provisioned_agent_refuses_a_plain_url_and_its_password_never_crosses_the_wire(
    tap: _WireTap, tmp_path: Path
) -> None:
    root = tmp_path / "pki"
    provision.broker_init(root, port=8883, federation=fed.FEDERATION)
    provision.device_add(root, "pi-0")
    password = (root / "devices" / "pi-0" / "password").read_text().strip()
    (data,) = fed.write_client_data(tmp_path / "data", 1)
    env = dict(fed._env(tmp_path), FEDMQ_AGENT_BROKER=f"mqtt://127.0.0.1:{tap.port}")
    config = root / "devices" / "pi-0" / "agent.toml"
    log_path = tmp_path / "pi-0.log"
    with log_path.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "--config", str(config), "--data", str(data)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=fed.REPO,
        )
    try:
        fed.wait_for(
            lambda: agent.poll() is not None or password.encode() in tap.sent,
            60,
            "the agent to exit or to send its password",
        )
    finally:
        fed.stop([agent])

    assert password.encode() not in tap.sent
    assert tap.connections == 0
    assert agent.returncode == 1
    assert "refusing to connect to mqtt://127.0.0.1" in log_path.read_text()


# --- the demo's round table ---------------------------------------------------------------------
def test_the_demo_round_table_keeps_printing_rounds_after_a_bad_status_topic(
    broker: LocalBroker, mqtt_client: Any
) -> None:
    publisher = mqtt_client(broker.url, "anyone")
    online = msg.AgentStatus(client_id="pi-0", state="online").to_json()
    publisher.publish(T.agent_status("pi-0"), online, qos=1, retain=True).wait_for_publish(10)
    table = RoundTable(broker.url, fed.FEDERATION, rounds_total=1)
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            table.follow(until=lambda: bool(table.rows), timeout=60)
        except Exception as exc:  # handed to the test thread
            errors.append(exc)

    worker = threading.Thread(target=follow, daemon=True)
    worker.start()
    fed.wait_for(lambda: "pi-0" in table.online, fed.BROKER_WAIT, "the table subscribed")
    bad = f"fl/v1/{fed.FEDERATION}/agents/bad id!/status"
    publisher.publish(bad, online, qos=1).wait_for_publish(10)
    metrics = msg.RoundMetrics(
        federation=fed.FEDERATION, round=1, participants=[], accepted=0, rejected=0, num_samples=0
    )
    publisher.publish(T.metrics, metrics.to_json(), qos=1).wait_for_publish(10)
    worker.join(60)

    assert errors == []
    assert [m.round for m in table.rows] == [1]
