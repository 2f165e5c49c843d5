"""Settings errors name the key and the source of the value: TOML, environment or flag."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from aggregator.cli import main as aggregator_main
from aggregator.config import AggregatorConfig, from_args
from edge_agent import config as agent_config
from shared.settings import SettingsError, load_settings
from tests.unit.settings_args import aggregator_args, clear_fedmq_env, write_toml


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_fedmq_env(monkeypatch)


@pytest.mark.parametrize(
    ("var", "raw", "reason"),
    [
        ("FEDMQ_AGGREGATOR_ROUNDS", "many", "expected int"),
        ("FEDMQ_AGGREGATOR_FRACTION", "half", "expected float"),
        ("FEDMQ_AGGREGATOR_ONNX", "maybe", "expected bool"),
        ("FEDMQ_AGGREGATOR_ONNX", "", "expected bool"),
        ("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", "abc", "expected float | None"),
        ("FEDMQ_AGGREGATOR_INPUT_SHAPE", "1,x,28", "expected int at index 1"),
    ],
)
def test_unconvertible_environment_value_names_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, reason: str
) -> None:
    monkeypatch.setenv(var, raw)

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args())

    assert str(caught.value) == f"environment variable {var}={raw!r}: {reason}"


def test_an_input_shape_of_four_dimensions_is_refused_naming_its_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_INPUT_SHAPE", "1,28,28,28")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args())

    assert "input-shape must have 1 to 3 dimensions" in str(caught.value)
    assert "FEDMQ_AGGREGATOR_INPUT_SHAPE='1,28,28,28'" in str(caught.value)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('rounds = "ten"', "rounds: expected int, got str"),
        ("rounds = 2.5", "rounds: expected int, got float"),
        ("onnx = 1", "onnx: expected bool, got int"),
        ('max_update_norm = "5"', "max_update_norm: expected float | None, got str"),
        ("eval_data = 5", "eval_data: expected str | None, got int"),
        ('input-shape = [1, "a"]', "input-shape: expected int, got str at index 1"),
    ],
)
def test_wrongly_typed_toml_value_names_file_section_and_key(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = write_toml(tmp_path, f"[aggregator]\n{line}\n")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--config", str(path)))

    assert str(caught.value) == f"{path} [aggregator] {reason}"


def test_wrongly_typed_top_level_toml_value_names_file_and_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'rounds = "ten"\n')

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--config", str(path)))

    assert str(caught.value) == f"{path} rounds: expected int, got str"


def test_unknown_toml_key_names_file_and_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[aggregator]\nroundz = 3\n")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--config", str(path)))

    assert str(caught.value) == f"{path} [aggregator]: unknown setting 'roundz'"


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[aggregator\nrounds = 3\n")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--config", str(path)))

    assert str(caught.value).startswith(f"{path}: ")


def test_wrongly_typed_flag_value_goes_through_the_same_conversion() -> None:
    args = argparse.Namespace(rounds="7")

    with pytest.raises(SettingsError) as caught:
        load_settings(AggregatorConfig, args, "aggregator", "FEDMQ_AGGREGATOR_")

    assert str(caught.value) == "command-line rounds='7': expected int, got str"


def test_range_check_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ROUNDS", "0")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args())

    assert str(caught.value) == (
        "invalid [aggregator] setting: rounds must be ≥ 1 "
        "(environment variable FEDMQ_AGGREGATOR_ROUNDS='0')"
    )


def test_range_check_names_the_toml_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[aggregator]\nfraction = 1.5\n")

    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--config", str(path)))

    assert str(caught.value) == (
        f"invalid [aggregator] setting: fraction must be in (0, 1] ({path} [aggregator] fraction)"
    )


def test_range_check_names_the_flag() -> None:
    with pytest.raises(SettingsError) as caught:
        from_args(aggregator_args("--min-clients", "0"))

    assert str(caught.value) == (
        "invalid [aggregator] setting: min-clients must be ≥ 1 (command-line min_clients=0)"
    )


def test_range_check_on_a_default_names_only_the_section() -> None:
    parser = argparse.ArgumentParser()
    agent_config.add_arguments(parser)

    with pytest.raises(SettingsError) as caught:
        agent_config.from_args(parser.parse_args(["--data", "x.npz"]))

    assert str(caught.value) == "invalid [agent] setting: client-id is required"


def test_aggregator_cli_reports_a_bad_environment_value_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", "abc")

    with caplog.at_level(logging.ERROR, logger="fedmq.aggregator"):
        code = aggregator_main([])

    assert code == 1
    assert "FEDMQ_AGGREGATOR_MAX_UPDATE_NORM='abc': expected float | None" in caplog.text
