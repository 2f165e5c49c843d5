"""The generated broker configs bound what one client can make Mosquitto hold."""

from __future__ import annotations

from pathlib import Path

from aggregator.ops import provision

DEV_TEMPLATE = Path(__file__).resolve().parents[2] / "broker_config" / "mosquitto-dev.conf"


def _settings(text: str) -> dict[str, str]:
    lines = (line.split(None, 1) for line in text.splitlines() if line and line[0] != "#")
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def test_production_config_bounds_packets_queues_and_broker_memory(tmp_path: Path) -> None:
    provision.broker_init(tmp_path, port=8883, bind="127.0.0.1")

    conf = _settings((tmp_path / "mosquitto.conf").read_text())

    assert conf["max_packet_size"] == "2000000"
    assert conf["max_queued_messages"] == "20000"  # every device's status at subscription
    assert conf["max_queued_bytes"] == str(128 * 1024 * 1024)
    assert conf["memory_limit"] == str(1024 * 1024 * 1024)


def test_development_broker_has_mosquitto_21_packet_limit() -> None:
    assert _settings(DEV_TEMPLATE.read_text())["max_packet_size"] == "2000000"


def test_development_broker_queues_a_fleet_and_bounds_its_bytes() -> None:
    conf = _settings(DEV_TEMPLATE.read_text())

    assert conf["max_queued_messages"] == "20000"
    assert conf["max_queued_bytes"] == str(512 * 1024 * 1024)
