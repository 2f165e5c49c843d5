"""Federations over MQTT 3.1.1: amqtt (a 3.1.1-only broker) and Mosquitto spoken to in 3.1.1.

What 3.1.1 takes away (docs/brokers.md) is worked around, not assumed: no broker packet
limit is advertised, so the processes are given ``--max-chunk-bytes`` and the models and
updates travel as retained/QoS 1 chunks; wills, retained messages and QoS 1 are the 3.1.1
features fedmq needs, and each is checked on amqtt.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.ops.local_broker import LocalBroker
from shared.mqtt.options import ConnectOptions
from shared.mqtt.transport import MqttTransport
from shared.protocol.frames import decode_frame, tensors_hash
from shared.protocol.topics import Topics, chunk_topic
from tests.conftest import require_mosquitto, running_in_ci
from tests.integration import federation as fed
from tests.integration.amqtt_broker import AmqttBroker, find_amqtt

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
AGENTS = ["pi-0", "pi-1", "pi-2"]
# The MLP's fp32 model is ~216 kB and an int8 update ~55 kB: 16 kB chunks make every model
# download and every update a chunked transfer.
SMALL_CHUNKS = ("--max-chunk-bytes", "16384")


def require_amqtt() -> str:
    """The amqtt executable; skip without it, or fail under CI=true (as for mosquitto)."""
    try:
        return find_amqtt()
    except FileNotFoundError as exc:
        if running_in_ci():
            pytest.fail(f"CI=true but amqtt is unavailable: {exc}", pytrace=False)
        pytest.skip(f"needs amqtt: {exc}")


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[AmqttBroker]:
    """A started amqtt on a free loopback port (anonymous, loopback only)."""
    with AmqttBroker(require_amqtt(), tmp_path / "amqtt") as broker:
        yield broker


def client_311(url: str, client_id: str) -> mqtt.Client:
    """A connected paho MQTT 3.1.1 client (the test's own eyes on the broker)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    host, port = url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    if not connected.wait(fed.BROKER_WAIT):
        client.loop_stop()
        raise AssertionError(f"no CONNACK from {url}")
    return client


def retained_on(url: str, topic: str) -> mqtt.MQTTMessage:
    """The message a new 3.1.1 subscriber to ``topic`` gets first (the retained one)."""
    client = client_311(url, "late-watcher")
    try:
        return fed.next_on(fed.collect(client, topic), topic, fed.BROKER_WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


def run_federation(url: str, workdir: Path, *flags: str) -> tuple[int, list[int]]:
    """Aggregator + 3 agents (the MLP on generated data, 3 rounds); their exit codes."""
    clients = fed.write_client_data(workdir / "data", 3)
    agg = fed.start_aggregator(url, workdir, *flags, rounds=3, min_clients=3)
    agents = [
        fed.start_agent(url, n, p, workdir, *flags) for n, p in zip(AGENTS, clients, strict=True)
    ]
    try:
        code = fed.wait_exit(agg, 180, workdir / "aggregator.log")
        return code, fed.wait_agents(agents, AGENTS, workdir)
    finally:
        fed.stop([agg, *agents])


def assert_federation_completed(workdir: Path, code: int, agent_codes: list[int]) -> None:
    """Exit codes 0; 3 rounds, each with every agent's update counted once; it learned."""
    assert (code, agent_codes) == (0, [0, 0, 0])
    rounds = fed.metrics(workdir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == AGENTS and r["num_samples"] == 3 * 270 for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.9  # 4 classes: chance is 0.25


def retained_model_hash(url: str) -> str:
    """Hash of the retained global model a late 3.1.1 reader reassembles from its chunks."""
    options = ConnectOptions(mqtt_version="3.1.1")
    late = MqttTransport(url, "late-reader", subscriptions=[(T.global_model, 1)], options=options)
    late.start()
    try:
        message = late.inbox.get(timeout=fed.BROKER_WAIT)
    finally:
        late.stop()
    assert message.retain
    return tensors_hash(decode_frame(message.payload).tensors)


@pytest.mark.parametrize("version", ["auto", "3.1.1"])
def test_federation_over_amqtt_with_small_chunks(
    amqtt: AmqttBroker, tmp_path: Path, version: str
) -> None:
    code, agent_codes = run_federation(
        amqtt.url, tmp_path, "--mqtt-version", version, *SMALL_CHUNKS
    )

    assert_federation_completed(tmp_path, code, agent_codes)
    for name in ["aggregator", *AGENTS]:
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        spoken = re.search(r"connected to \S+ with (MQTT [0-9.]+)( \(auto: [^)]*\))?", log)
        assert spoken is not None, f"{name} logged no connection"
        assert spoken.group(1) == "MQTT 3.1.1"
        assert (spoken.group(2) is not None) == (version == "auto")  # auto says why it fell back
    # The retained model is kept as chunks, and a late joiner reassembles the applied model.
    assert retained_on(amqtt.url, chunk_topic(T.global_model, 0)).retain
    assert retained_model_hash(amqtt.url) == fed.metrics(tmp_path)[-1]["model_hash"]


def test_amqtt_publishes_a_killed_agents_will_retained(amqtt: AmqttBroker, tmp_path: Path) -> None:
    (data,) = fed.write_client_data(tmp_path / "data", 1)
    watcher = client_311(amqtt.url, "watcher")
    statuses = fed.collect(watcher, T.agent_status("pi-0"))
    agent = fed.start_agent(amqtt.url, "pi-0", data, tmp_path)  # auto: falls back to 3.1.1
    try:
        online = fed.next_on(statuses, T.agent_status("pi-0"), timeout=60)
        agent.send_signal(signal.SIGKILL)  # no goodbye: only the will can say it is gone
        offline = fed.until(statuses, _offline, fed.BROKER_WAIT, "pi-0's will")[-1]
    finally:
        fed.stop([agent])
        watcher.disconnect()
        watcher.loop_stop()
    retained = retained_on(amqtt.url, T.agent_status("pi-0"))

    assert json.loads(online.payload)["state"] == "online"
    assert offline.topic == T.agent_status("pi-0")
    assert retained.retain and _offline(retained)


def _offline(message: mqtt.MQTTMessage) -> bool:
    return bool(message.payload) and json.loads(message.payload)["state"] == "offline"


def test_federation_over_mosquitto_speaking_311_under_its_packet_limit(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    # A 3.1.1 client learns no packet limit: --max-chunk-bytes keeps it under the broker's.
    flags = ("--mqtt-version", "3.1.1", "--max-chunk-bytes", "32768")
    with LocalBroker(tmp_path / "broker", extra_config="max_packet_size 65536") as broker:
        code, agent_codes = run_federation(broker.url, tmp_path, *flags)
        model_hash = retained_model_hash(broker.url)
        broker_log = broker.log_path.read_text(errors="replace")

    assert_federation_completed(tmp_path, code, agent_codes)
    assert model_hash == fed.metrics(tmp_path)[-1]["model_hash"]
    # Mosquitto logs each connection's protocol: p2 is 3.1.1, p5 would be MQTT 5.
    for name in ["aggregator", *AGENTS]:
        assert re.search(rf" as {name} \(p2,", broker_log), f"{name} did not connect with 3.1.1"
    assert "oversize" not in broker_log.lower()
