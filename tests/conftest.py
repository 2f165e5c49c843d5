"""Shared pytest fixtures: a real Mosquitto broker per test and connected paho clients.

Integration tests (tests/integration/, marked ``integration``) use ``broker`` and
``mqtt_client``. Without mosquitto installed they are skipped locally, but fail under
CI=true: CI must never go green by silently skipping the tests that touch a broker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.ops.local_broker import BrokerError, LocalBroker, find_mosquitto

# Seconds a helper waits for a CONNACK; loopback answers in milliseconds, so this only
# bounds how long a broken broker can hang a test.
CONNECT_TIMEOUT = 10.0

MqttClientFactory = Callable[..., mqtt.Client]


def running_in_ci() -> bool:
    """Return True when the CI environment variable says we are in CI (CI=true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_mosquitto() -> str:
    """Return the mosquitto path; skip the test without it, or fail it in CI."""
    try:
        return find_mosquitto()
    except BrokerError as exc:
        if running_in_ci():
            pytest.fail(f"CI=true but mosquitto is unavailable: {exc}", pytrace=False)
        pytest.skip(f"integration test needs mosquitto: {exc}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A started dev broker on a free loopback port, with its files in ``tmp_path/broker``."""
    require_mosquitto()
    local = LocalBroker(tmp_path / "broker")
    local.start()
    try:
        yield local
    finally:
        local.stop()


def _host_port(url: str) -> tuple[str, int]:
    """Split ``mqtt://host:port`` (port defaults to 1883) into host and port."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
        raise ValueError(f"expected mqtt://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 1883


@pytest.fixture
def mqtt_client() -> Iterator[MqttClientFactory]:
    """Factory fixture: ``mqtt_client(url, client_id="")`` returns a connected client.

    Clients use paho-mqtt's VERSION2 callbacks and MQTT v5, run their network loop in a
    background thread (``loop_start``), and are disconnected when the test ends. The
    factory installs its own ``on_connect`` to wait for the CONNACK; a test may replace
    it after the factory returns.
    """
    made: list[mqtt.Client] = []

    def connect(url: str, client_id: str = "", **connect_kwargs: Any) -> mqtt.Client:
        host, port = _host_port(url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        connected = threading.Event()
        result: list[ReasonCode] = []

        def on_connect(
            _client: mqtt.Client,
            _userdata: Any,
            _flags: mqtt.ConnectFlags,
            reason_code: ReasonCode,
            _properties: Any,
        ) -> None:
            result.append(reason_code)
            connected.set()

        client.on_connect = on_connect
        # Registered before connecting so teardown also cleans up a client whose
        # CONNACK never came (its loop thread would otherwise outlive the test).
        made.append(client)
        client.connect(host, port, **connect_kwargs)
        client.loop_start()
        if not connected.wait(CONNECT_TIMEOUT):
            pytest.fail(f"no CONNACK from {url} within {CONNECT_TIMEOUT} s", pytrace=False)
        if result[0].is_failure:
            pytest.fail(f"broker at {url} refused the connection: {result[0]}", pytrace=False)
        return client

    yield connect

    for client in made:
        client.disconnect()
        client.loop_stop()
