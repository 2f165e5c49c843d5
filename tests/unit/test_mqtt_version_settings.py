"""``mqtt_version`` and ``max_chunk_bytes``: each MQTT program's settings, down to the transport."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, from_args
from aggregator.ops import demo
from aggregator.ops.monitor_view import add_monitor_arguments
from edge_agent import config as agent_config
from edge_agent.serve import ServeConfig, add_serve_arguments, serve_config
from shared.mqtt.base import Session
from shared.mqtt.connector import connector_for
from shared.mqtt.transport import MqttTransport
from tests.unit.settings_args import aggregator_args, clear_fedmq_env, write_toml

AGENT = ("--client-id", "pi-0", "--data", "pi-0.npz")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_fedmq_env(monkeypatch)


def _agent(*argv: str) -> agent_config.AgentConfig:
    parser = argparse.ArgumentParser()
    agent_config.add_arguments(parser)
    return agent_config.from_args(parser.parse_args([*AGENT, *argv]))


def _serve(*argv: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return serve_config(parser.parse_args(["--client-id", "pi-0", *argv]))


def test_every_program_defaults_to_auto() -> None:
    versions = {from_args(aggregator_args()).mqtt_version, _agent().mqtt_version}

    assert versions | {_serve().mqtt_version} == {"auto"}


def test_flag_sets_the_version_of_every_program() -> None:
    flag = ("--mqtt-version", "3.1.1")

    configs = [from_args(aggregator_args(*flag)), _agent(*flag), _serve(*flag)]

    assert [c.mqtt_version for c in configs] == ["3.1.1"] * 3


def test_unknown_flag_value_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        aggregator_args("--mqtt-version", "4")


def test_toml_sets_the_version_and_the_flag_overrides_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[aggregator]\nmqtt-version = "3.1.1"\nmax-chunk-bytes = 65536\n')

    from_file = from_args(aggregator_args("--config", str(path)))
    flagged = from_args(aggregator_args("--config", str(path), "--mqtt-version", "5"))

    assert (from_file.mqtt_version, from_file.max_chunk_bytes) == ("3.1.1", 65536)
    assert flagged.mqtt_version == "5"


def test_environment_sets_the_agent_version_and_chunk_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGENT_MQTT_VERSION", "3.1.1")
    monkeypatch.setenv("FEDMQ_AGENT_MAX_CHUNK_BYTES", "8192")

    cfg = _agent()

    assert (cfg.mqtt_version, cfg.max_chunk_bytes) == ("3.1.1", 8192)


def test_bad_environment_version_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_INFERENCE_MQTT_VERSION", "v5")

    with pytest.raises(
        ValueError, match=r"mqtt-version must be one of.*FEDMQ_INFERENCE_MQTT_VERSION"
    ):
        _serve()


def test_chunk_size_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="max-chunk-bytes must be ≥ 1024"):
        AggregatorConfig(max_chunk_bytes=100)


def test_connector_hands_version_and_chunk_size_to_the_transport() -> None:
    cfg = AggregatorConfig(mqtt_version="3.1.1", max_chunk_bytes=4096)

    transport = connector_for(cfg)(Session("aggregator"))

    assert isinstance(transport, MqttTransport)
    assert transport.negotiation.version == "3.1.1"
    assert transport.chunk_capacity() == 4096


def test_monitor_takes_the_version_flag() -> None:
    parser = argparse.ArgumentParser()
    add_monitor_arguments(parser)

    assert parser.parse_args(["--mqtt-version", "3.1.1"]).mqtt_version == "3.1.1"


@pytest.mark.parametrize(
    ("version", "flags"), [("auto", []), ("3.1.1", ["--mqtt-version", "3.1.1"])]
)
def test_demo_hands_a_chosen_version_to_its_children(version: str, flags: list[str]) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)

    args = parser.parse_args(["--mqtt-version", version])

    assert demo.child_protocol_flags(args) == flags
