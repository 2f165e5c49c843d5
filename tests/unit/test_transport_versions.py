"""MqttTransport picks its MQTT version: auto falls back to 3.1.1 however a broker refuses 5.

The broker is scripted (tests/unit/scripted_broker.py): paho and the transport are real, the
three ways a 3.1.1-only broker answers an MQTT 5 CONNECT are replayed on a loopback socket.
"""

from __future__ import annotations

import logging
import time

import pytest

from shared.mqtt.base import TransportError
from shared.mqtt.options import ConnectOptions
from shared.mqtt.transport import MqttTransport
from tests.unit.scripted_broker import Reaction, ScriptedBroker

MQTT5, MQTT311 = 5, 4  # protocol levels in CONNECT
PROBE_S = 0.3
CONNECT_TIMEOUT_S = 30.0


def _transport(url: str, version: str, max_chunk_bytes: int = 1_000_000) -> MqttTransport:
    opts = ConnectOptions(
        mqtt_version=version,
        version_probe_s=PROBE_S,
        reconnect_min_s=0.1,
        max_chunk_bytes=max_chunk_bytes,
    )
    return MqttTransport(url, "pi-0", options=opts)


@pytest.mark.parametrize("refusal", ["refuse-version", "close", "silent"])
def test_auto_falls_back_to_311_however_the_broker_refuses_5(refusal: Reaction) -> None:
    with ScriptedBroker({MQTT5: refusal, MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "auto")

        t.start(timeout=10)
        t.stop()

    assert broker.levels == [MQTT5, MQTT311]
    assert t.negotiation.version == "3.1.1"


def test_auto_falls_back_within_the_probe_time_not_the_connect_timeout() -> None:
    with ScriptedBroker({MQTT5: "silent", MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "auto")
        began = time.monotonic()

        t.start(timeout=CONNECT_TIMEOUT_S)
        elapsed = time.monotonic() - began
        t.stop()

    # Not a speed figure: a fallback that waited for the connect timeout would take all of it;
    # one driven by the probe (PROBE_S) ends long before, however loaded the machine is.
    assert t.negotiation.version == "3.1.1"
    assert elapsed < CONNECT_TIMEOUT_S / 2


def test_auto_keeps_5_when_the_broker_accepts_it() -> None:
    with ScriptedBroker({MQTT5: "accept", MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "auto")

        t.start(timeout=10)
        t.stop()

    assert broker.levels == [MQTT5]
    assert t.negotiation.version == "5"


def test_311_connects_with_311_directly() -> None:
    with ScriptedBroker({MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "3.1.1")

        t.start(timeout=10)
        t.stop()

    assert broker.levels == [MQTT311]


def test_pinned_5_never_tries_311_and_says_why_it_failed() -> None:
    with ScriptedBroker({MQTT5: "refuse-version", MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "5")

        with pytest.raises(TransportError, match="does not speak MQTT 5; try --mqtt-version"):
            t.start(timeout=1.0)

    assert set(broker.levels) == {MQTT5}


def test_auto_gives_up_at_the_timeout_naming_both_versions() -> None:
    with ScriptedBroker({MQTT5: "silent", MQTT311: "silent"}) as broker:
        t = _transport(broker.url, "auto")

        with pytest.raises(TransportError, match=r"tried MQTT 5 and 3\.1\.1"):
            t.start(timeout=1.0)

    assert broker.levels[:3] == [MQTT5, MQTT311, MQTT5]  # alternates until the deadline


def test_311_subscribe_sends_plain_qos_and_confirms_it() -> None:
    with ScriptedBroker({MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "3.1.1")
        t.start(timeout=10)

        t.subscribe("fl/v1/f/metrics", qos=1)
        t.stop()

    # packet id, then topic length, topic, requested QoS (3.1.1 has no subscription options)
    assert broker.subscribes[0][2:].startswith(b"\x00\x0ffl/v1/f/metrics\x01")


def test_311_suback_failure_is_logged_as_a_refusal(caplog: pytest.LogCaptureFixture) -> None:
    with ScriptedBroker({MQTT311: "accept"}, suback_code=0x80) as broker:
        t = _transport(broker.url, "3.1.1")
        t.start(timeout=10)

        with caplog.at_level(logging.ERROR, logger="shared.mqtt.transport"):
            t.subscribe("fl/v1/f/metrics", qos=1)
        t.stop()

    assert "broker refused pi-0: fl/v1/f/metrics: Unspecified error" in caplog.text


def test_311_chunks_payloads_over_max_chunk_bytes_without_a_broker_limit() -> None:
    with ScriptedBroker({MQTT311: "accept"}) as broker:
        t = _transport(broker.url, "3.1.1", max_chunk_bytes=4096)
        t.start(timeout=10)
        capacity = t.chunk_capacity()
        t.stop()

    assert t.broker_max_packet is None
    assert capacity == 4096


def test_a_refused_connect_is_not_reported_as_a_lost_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ScriptedBroker({MQTT5: "refuse-version"}) as broker:
        t = _transport(broker.url, "5")

        with (
            caplog.at_level(logging.INFO, logger="shared.mqtt.transport"),
            pytest.raises(TransportError),
        ):
            t.start(timeout=0.5)

    assert "Unsupported protocol version" in caplog.text
    assert "lost the broker" not in caplog.text
