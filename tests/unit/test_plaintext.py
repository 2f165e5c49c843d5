"""No password in clear text by mistake: one rule for every MQTT program (shared/mqtt/options.py).

A plain ``mqtt://`` URL is refused when TLS files are configured, or when a password is set
for a broker on another machine, unless ``allow_plaintext`` says it is meant.
tests/integration/test_hardening_flood.py shows on the wire that nothing is sent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aggregator import cli as aggregator_cli
from edge_agent import cli as agent_cli
from edge_agent.config import add_arguments, from_args
from shared.mqtt.base import TransportError
from shared.mqtt.connector import mqtt_connector
from shared.mqtt.options import BrokerAddress, ConnectOptions, plaintext_refusal
from shared.mqtt.transport import MqttTransport


def _refusal(url: str, **options: object) -> str | None:
    return plaintext_refusal(BrokerAddress.parse(url), ConnectOptions(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize("tls_file", ["ca_file", "cert_file", "key_file"])
def test_tls_files_with_a_plain_url_are_refused_even_on_loopback(tls_file: str) -> None:
    why = _refusal("mqtt://127.0.0.1:1883", **{tls_file: "/etc/fedmq/x.pem"})

    assert why is not None
    assert tls_file in why and "mqtts://" in why and "allow_plaintext" in why


def test_a_password_for_a_remote_broker_over_plain_mqtt_is_refused() -> None:
    why = _refusal("mqtt://10.0.0.2:1883", username="pi-07", password="secret")

    assert why is not None and "password" in why
    assert "secret" not in why


@pytest.mark.parametrize(
    "url, options",
    [
        ("mqtts://10.0.0.2:8883", {"password": "p", "ca_file": "ca.crt"}),  # TLS
        ("mqtt://127.0.0.1:1883", {"username": "u", "password": "p"}),  # never leaves
        ("mqtt://localhost:1883", {"username": "u", "password": "p"}),
        ("mqtt://[::1]:1883", {"username": "u", "password": "p"}),
        ("mqtt://10.0.0.2:1883", {"username": "u"}),  # nothing secret
        ("mqtt://10.0.0.2:1883", {}),  # the open development broker
        ("mqtt://10.0.0.2:1883", {"password": "p", "ca_file": "c", "allow_plaintext": True}),
    ],
)
def test_connections_that_leak_nothing_or_are_forced_are_allowed(
    url: str, options: dict[str, object]
) -> None:
    assert _refusal(url, **options) is None


def test_the_paho_transport_refuses_before_opening_anything() -> None:
    with pytest.raises(TransportError, match="in clear text"):
        MqttTransport("mqtt://10.0.0.2:1883", "pi-07", options=ConnectOptions(ca_file="ca.crt"))


def test_a_connector_refuses_when_it_is_built() -> None:
    with pytest.raises(TransportError, match="in clear text"):
        mqtt_connector("mqtt://10.0.0.2:1883", ConnectOptions(password="secret"))


def _provisioned_toml(tmp_path: Path, section: str) -> Path:
    """What `fedmq device add` writes: an mqtts:// URL, a password and the CA."""
    path = tmp_path / f"{section}.toml"
    username = "pi-07-infer" if section == "inference" else "pi-07"  # serve's own login
    path.write_text(
        f"[{section}]\n"
        'broker = "mqtts://broker.lan:8883"\n'
        f'username = "{username}"\n'
        'password = "secret"\n'
        f'ca_file = "{tmp_path / "ca.crt"}"\n'
    )
    return path


def test_the_agent_exits_with_one_line_when_the_environment_makes_its_url_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _provisioned_toml(tmp_path, "agent")
    monkeypatch.setenv("FEDMQ_AGENT_BROKER", "mqtt://broker.lan:1883")

    code = agent_cli.main(["--config", str(config), "--client-id", "pi-07", "--data", "x.npz"])

    assert code == 1
    assert "refusing to connect to mqtt://broker.lan:1883 in clear text" in caplog.text


def test_the_inference_server_follows_the_same_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _provisioned_toml(tmp_path, "inference")
    monkeypatch.setenv("FEDMQ_INFERENCE_BROKER", "mqtt://broker.lan:1883")

    code = agent_cli.main(["serve", "--config", str(config), "--client-id", "pi-07"])

    assert code == 1
    assert "in clear text" in caplog.text


def test_the_aggregator_follows_the_same_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _provisioned_toml(tmp_path, "aggregator")

    code = aggregator_cli.main(["--config", str(config), "--broker", "mqtt://broker.lan:1883"])

    assert code == 1
    assert "in clear text" in caplog.text


def test_allow_plaintext_is_an_explicit_setting_of_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _provisioned_toml(tmp_path, "agent")
    monkeypatch.setenv("FEDMQ_AGENT_ALLOW_PLAINTEXT", "true")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--config", str(config), "--client-id", "a", "--data", "x"]))

    assert cfg.allow_plaintext is True
