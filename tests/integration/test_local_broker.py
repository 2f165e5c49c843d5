"""LocalBroker against a real mosquitto: start, deliver, stop, crash, restart, fail loudly."""

from __future__ import annotations

import queue
import re
import socket
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.ops import local_broker
from aggregator.ops.local_broker import (
    DEFAULT_TEMPLATE_PATH,
    EMBEDDED_TEMPLATE,
    BrokerError,
    LocalBroker,
)
from tests.conftest import MqttClientFactory, require_mosquitto
from tests.integration.federation import wait_for

pytestmark = pytest.mark.integration

# Upper bound for any single wait on the broker; loopback delivery takes milliseconds.
WAIT = 10.0


def _subscribe(client: mqtt.Client, topic: str, qos: int = 1) -> queue.Queue[mqtt.MQTTMessage]:
    """Subscribe ``client`` to ``topic``, wait for the SUBACK, return a queue of messages."""
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subacked: queue.Queue[list[Any]] = queue.Queue()

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received.put(message)

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        subacked.put(codes)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    rc, _mid = client.subscribe(topic, qos=qos)
    assert rc == mqtt.MQTT_ERR_SUCCESS
    codes = subacked.get(timeout=WAIT)
    assert not codes[0].is_failure, codes
    return received


def _port_is_bindable(port: int) -> bool:
    """Return True if this process can bind 127.0.0.1:port (i.e. nobody listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option mosquitto uses, so a closed broker's TIME_WAIT sockets don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _settings(config: str) -> list[str]:
    """Return a config's setting lines (comments and blank lines dropped)."""
    return [
        line.strip() for line in config.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_broker_starts_on_loopback(broker: LocalBroker) -> None:
    """The fixture's broker runs, listens on 127.0.0.1 and logs through the template."""
    assert broker.is_running()
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    conf = broker.conf_path.read_text()
    assert f"listener {broker.port} 127.0.0.1" in conf
    assert "{" not in conf, "a placeholder was left unsubstituted"
    # mosquitto accepts connections a moment before it logs that it runs.
    wait_for(lambda: "running" in broker.log_text(), 10, "the broker's 'running' line")


def test_qos1_message_is_delivered(broker: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    """A QoS 1 publish from one v5 client reaches a subscriber on another, as QoS 1."""
    receiver = mqtt_client(broker.url, client_id="receiver")
    messages = _subscribe(receiver, "fedmq-test/qos1")
    sender = mqtt_client(broker.url, client_id="sender")
    payload = bytes(range(256)) * 4096  # 1 MiB: exercises more than one TCP segment

    info = sender.publish("fedmq-test/qos1", payload, qos=1)
    info.wait_for_publish(timeout=WAIT)  # returns once the broker's PUBACK arrived

    message = messages.get(timeout=WAIT)
    assert message.topic == "fedmq-test/qos1"
    assert message.payload == payload
    assert message.qos == 1


def test_retained_message_reaches_late_subscriber(
    broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    """A retained message published before anyone subscribed is delivered on subscribe."""
    publisher = mqtt_client(broker.url, client_id="publisher")
    publisher.publish(
        "fedmq-test/global/meta", b'{"round": 3}', qos=1, retain=True
    ).wait_for_publish(timeout=WAIT)

    late = mqtt_client(broker.url, client_id="late-subscriber")
    message = _subscribe(late, "fedmq-test/global/meta").get(timeout=WAIT)
    assert message.payload == b'{"round": 3}'
    assert message.retain


def test_stop_frees_the_port_and_is_idempotent(broker: LocalBroker) -> None:
    """After stop() the process is gone and its port can be bound again."""
    port = broker.port
    assert not _port_is_bindable(port)
    broker.stop()
    assert not broker.is_running()
    assert broker.pid is None
    assert _port_is_bindable(port)
    broker.stop()  # a second stop is harmless
    broker.kill()  # and so is killing a stopped broker


def test_kill_then_restart_on_the_same_port(
    broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    """kill() crashes the broker; restart() brings up a new process on the same URL."""
    url, first_pid = broker.url, broker.pid
    broker.kill()
    assert not broker.is_running()

    broker.restart()
    assert broker.is_running()
    assert broker.url == url
    assert broker.pid != first_pid
    # Both runs append to the same log, which is what a fault-injection test wants to read.
    wait_for(
        lambda: len(re.findall(r"mosquitto version \S+ running", broker.log_text())) == 2,
        10,
        "both runs' 'running' lines",
    )

    receiver = mqtt_client(url, client_id="after-restart")
    messages = _subscribe(receiver, "fedmq-test/after-restart")
    mqtt_client(url, client_id="sender").publish(
        "fedmq-test/after-restart", b"hello", qos=1
    ).wait_for_publish(timeout=WAIT)
    assert messages.get(timeout=WAIT).payload == b"hello"


def test_restart_of_a_running_broker(broker: LocalBroker) -> None:
    """restart() on a live broker stops it gracefully first, then starts on the same port."""
    port = broker.port
    broker.restart()
    assert broker.is_running()
    assert broker.port == port


def test_relative_workdir_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedmq demo` passes runs/demo-…/broker: mosquitto (cwd = workdir) must find its config."""
    require_mosquitto()
    monkeypatch.chdir(tmp_path)
    with LocalBroker(Path("runs") / "demo" / "broker") as broker:
        assert broker.is_running()
        assert broker.conf_path.is_absolute()


def test_broken_template_reports_the_broker_error(tmp_path: Path) -> None:
    """A config mosquitto rejects raises BrokerError quoting mosquitto's own message."""
    require_mosquitto()
    template = tmp_path / "broken.conf"
    template.write_text("listener {port} 127.0.0.1\nnot_a_mosquitto_option 42\n")
    broker = LocalBroker(tmp_path / "b", template=template)
    with pytest.raises(BrokerError) as err:
        broker.start(timeout=5.0)
    assert "Unknown configuration variable" in str(err.value)
    assert "not_a_mosquitto_option" in str(err.value)
    assert not broker.is_running()


def test_template_without_port_placeholder_is_rejected(tmp_path: Path) -> None:
    """A template that cannot listen on the chosen port is refused before launching."""
    template = tmp_path / "noport.conf"
    template.write_text("listener 1883 127.0.0.1\n")
    with pytest.raises(BrokerError, match="placeholder"):
        LocalBroker(tmp_path / "b", template=template).start(timeout=5.0)


def test_automatic_port_moves_when_taken(tmp_path: Path) -> None:
    """If another process grabs the auto-chosen port before start(), a new one is used."""
    require_mosquitto()
    broker = LocalBroker(tmp_path / "b")
    taken = broker.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with broker:
            assert broker.port != taken
            assert broker.is_running()


def test_explicit_port_in_use_is_an_error(tmp_path: Path) -> None:
    """A caller-chosen port is never silently replaced."""
    require_mosquitto()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalBroker(tmp_path / "b", port=port)
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start(timeout=5.0)
        assert broker.port == port


def test_extra_config_emulates_mosquitto_21_packet_limit(
    tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    """extra_config overrides the template: a 2 MB max_packet_size drops oversize packets."""
    require_mosquitto()
    with LocalBroker(tmp_path / "b", extra_config="max_packet_size 2000000") as broker:
        receiver = mqtt_client(broker.url, client_id="receiver")
        messages = _subscribe(receiver, "fedmq-test/big")
        sender = mqtt_client(broker.url, client_id="sender")
        sender.publish("fedmq-test/big", b"x" * 2_100_000, qos=0)
        sender.publish("fedmq-test/big", b"small", qos=0)
        # The broker refuses the oversize packet and disconnects the sender before it reads
        # "small": once the refusal is logged, nothing was or will be routed.
        wait_for(lambda: "oversize packet" in broker.log_text(), 10, "the refusal in the log")
        assert messages.empty()


def test_embedded_template_matches_repository_template() -> None:
    """The fallback template inside the module has the same settings as broker_config/."""
    assert DEFAULT_TEMPLATE_PATH.is_file()
    assert _settings(EMBEDDED_TEMPLATE) == _settings(DEFAULT_TEMPLATE_PATH.read_text())


def test_embedded_template_starts_a_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without broker_config/ (non-editable install) the embedded template is used and works."""
    require_mosquitto()
    monkeypatch.setattr(local_broker, "DEFAULT_TEMPLATE_PATH", tmp_path / "absent.conf")
    with LocalBroker(tmp_path / "b") as broker:
        assert broker.conf_path.read_text().startswith("# fedmq development broker (embedded")
        wait_for(lambda: "running" in broker.log_text(), 10, "the broker's 'running' line")


def test_restart_without_prior_start(tmp_path: Path) -> None:
    """restart() on a never-started broker simply starts it (creating its work directory)."""
    require_mosquitto()
    broker = LocalBroker(tmp_path / "never-started")
    try:
        broker.restart()
        assert broker.is_running()
    finally:
        broker.stop()
