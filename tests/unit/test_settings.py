"""Unit tests for layered settings (shared/settings.py) and the aggregator config."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, from_args
from aggregator.update_bounds import norm_violation
from edge_agent import config as agent_config
from edge_agent.config import AgentConfig
from edge_agent.serve import ServeConfig, add_serve_arguments, serve_config
from tests.unit.settings_args import aggregator_args, clear_fedmq_env, write_toml


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_fedmq_env(monkeypatch)


def test_defaults_without_file_env_or_flags() -> None:
    assert from_args(aggregator_args()) == AggregatorConfig()


def test_toml_section_sets_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[aggregator]\nrounds = 7\nfederation = "lab-1"\nfraction = 0.5\n'
        "input-shape = [3, 32, 32]\n",
    )

    cfg = from_args(aggregator_args("--config", str(path)))

    assert cfg.rounds == 7
    assert cfg.federation == "lab-1"
    assert cfg.fraction == 0.5
    assert cfg.input_shape == (3, 32, 32)


def test_toml_top_level_keys_are_accepted_without_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "rounds = 9\n")

    assert from_args(aggregator_args("--config", str(path))).rounds == 9


def test_environment_overrideswrite_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, "[aggregator]\nrounds = 7\nmin_clients = 3\n")
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ROUNDS", "11")

    cfg = from_args(aggregator_args("--config", str(path)))

    assert cfg.rounds == 11
    assert cfg.min_clients == 3  # not overridden: the file still applies


def test_flag_overrides_environment_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, "[aggregator]\nrounds = 7\n")
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ROUNDS", "11")

    cfg = from_args(aggregator_args("--config", str(path), "--rounds", "13"))

    assert cfg.rounds == 13


@pytest.mark.parametrize(
    ("var", "raw", "field", "expected"),
    [
        ("FEDMQ_AGGREGATOR_ROUNDS", "11", "rounds", 11),
        ("FEDMQ_AGGREGATOR_FRACTION", "0.25", "fraction", 0.25),
        ("FEDMQ_AGGREGATOR_ROUND_TIMEOUT", "30", "round_timeout", 30.0),
        ("FEDMQ_AGGREGATOR_ONNX", "false", "onnx", False),
        ("FEDMQ_AGGREGATOR_CODEC", "fp16", "codec", "fp16"),
        ("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", "5.0", "max_update_norm", 5.0),
        ("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", "5", "max_update_norm", 5.0),
        ("FEDMQ_AGGREGATOR_EVAL_DATA", "/data/test.npz", "eval_data", "/data/test.npz"),
        ("FEDMQ_AGGREGATOR_PASSWORD", " pass word ", "password", " pass word "),
        ("FEDMQ_AGGREGATOR_INPUT_SHAPE", "3,32,32", "input_shape", (3, 32, 32)),
        ("FEDMQ_AGGREGATOR_INPUT_SHAPE", " 3, 32 ,32 ", "input_shape", (3, 32, 32)),
    ],
)
def test_environment_values_are_converted_to_the_field_type(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(var, raw)

    value = getattr(from_args(aggregator_args()), field)

    assert (value, type(value)) == (expected, type(expected))


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (" Off ", False),
    ],
)
def test_environment_boolean_words_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, word: str, expected: bool
) -> None:
    path = write_toml(tmp_path, f"[aggregator]\nonnx = {str(not expected).lower()}\n")
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ONNX", word)

    cfg = from_args(aggregator_args("--config", str(path)))

    assert cfg.onnx is expected


@pytest.mark.parametrize(
    ("line", "var"),
    [
        ("max_update_norm = 2.0", "FEDMQ_AGGREGATOR_MAX_UPDATE_NORM"),
        ('eval_data = "/data/test.npz"', "FEDMQ_AGGREGATOR_EVAL_DATA"),
    ],
)
def test_empty_environment_value_sets_an_optional_setting_to_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, var: str
) -> None:
    path = write_toml(tmp_path, f"[aggregator]\n{line}\n")
    monkeypatch.setenv(var, "")

    cfg = from_args(aggregator_args("--config", str(path)))

    assert getattr(cfg, var.removeprefix("FEDMQ_AGGREGATOR_").lower()) is None


def test_environment_max_update_norm_bounds_updates_end_to_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", "5.0")
    cfg = from_args(aggregator_args())
    too_long = {"w": np.full(4, 3.0, dtype=np.float32)}  # L2 norm 6

    reason = norm_violation(too_long, cfg.max_update_norm)

    assert reason == "update L2 norm 6 exceeds the bound 5"


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("rounds = 7", "rounds", 7),
        ("fraction = 0.5", "fraction", 0.5),
        ("round_timeout = 30", "round_timeout", 30.0),
        ("onnx = false", "onnx", False),
        ('codec = "fp16"', "codec", "fp16"),
        ("max_update_norm = 2.5", "max_update_norm", 2.5),
        ('eval_data = "/data/test.npz"', "eval_data", "/data/test.npz"),
        ("input_shape = [3, 32, 32]", "input_shape", (3, 32, 32)),
    ],
)
def test_toml_values_are_converted_to_the_field_type(
    tmp_path: Path, line: str, field: str, expected: object
) -> None:
    path = write_toml(tmp_path, f"[aggregator]\n{line}\n")

    value = getattr(from_args(aggregator_args("--config", str(path))), field)

    assert (value, type(value)) == (expected, type(expected))


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (("--rounds", "7"), "rounds", 7),
        (("--fraction", "0.5"), "fraction", 0.5),
        (("--no-onnx",), "onnx", False),
        (("--codec", "fp16"), "codec", "fp16"),
        (("--max-update-norm", "2.5"), "max_update_norm", 2.5),
        (("--eval-data", "/data/test.npz"), "eval_data", "/data/test.npz"),
        (("--input-shape", "3,32,32"), "input_shape", (3, 32, 32)),
    ],
)
def test_flag_values_are_converted_to_the_field_type(
    argv: tuple[str, ...], field: str, expected: object
) -> None:
    value = getattr(from_args(aggregator_args(*argv)), field)

    assert (value, type(value)) == (expected, type(expected))


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [(None, (), 1.0), ("2.0", (), 2.0), ("2.0", ("--max-update-norm", "3.0"), 3.0)],
    ids=["file", "environment-over-file", "flag-over-environment"],
)
def test_optional_setting_follows_the_same_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    argv: tuple[str, ...],
    expected: float,
) -> None:
    path = write_toml(tmp_path, "[aggregator]\nmax_update_norm = 1.0\n")
    if env is not None:
        monkeypatch.setenv("FEDMQ_AGGREGATOR_MAX_UPDATE_NORM", env)

    cfg = from_args(aggregator_args("--config", str(path), *argv))

    assert cfg.max_update_norm == expected


def test_agent_settings_come_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "CLIENT_ID": "pi-07",
        "DATA": "/data/pi-07.npz",
        "VAL_FRACTION": "0.1",
        "WARM_UP": "yes",
        "EXIT_WHEN_FINISHED": "off",
        "MODEL_PUBLIC_KEY": "",
    }.items():
        monkeypatch.setenv(f"FEDMQ_AGENT_{key}", value)
    parser = argparse.ArgumentParser()
    agent_config.add_arguments(parser)

    cfg = agent_config.from_args(parser.parse_args([]))

    assert cfg == AgentConfig(
        client_id="pi-07",
        data="/data/pi-07.npz",
        val_fraction=0.1,
        warm_up=True,
        exit_when_finished=False,
        model_public_key=None,
    )


def test_inference_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_INFERENCE_CLIENT_ID", "pi-07")
    monkeypatch.setenv("FEDMQ_INFERENCE_THREADS", "2")
    monkeypatch.setenv("FEDMQ_INFERENCE_CONNECT_TIMEOUT", "5")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    cfg = serve_config(parser.parse_args([]))

    assert cfg == ServeConfig(client_id="pi-07", threads=2, connect_timeout=5.0)


def test_unset_flags_do_not_override_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[aggregator]\ncodec = "fp32"\n')

    cfg = from_args(aggregator_args("--config", str(path), "--rounds", "3"))

    assert cfg.codec == "fp32"
    assert cfg.rounds == 3


def test_input_shape_flag_is_parsed_as_tuple() -> None:
    assert from_args(aggregator_args("--input-shape", "3,32,32")).input_shape == (3, 32, 32)


@pytest.mark.parametrize("text", ["3,128", "12"])
def test_input_shape_flag_takes_sensor_windows_and_feature_vectors(text: str) -> None:
    shape = tuple(int(p) for p in text.split(","))

    assert from_args(aggregator_args("--input-shape", text)).input_shape == shape


@pytest.mark.parametrize("text", ["3,32,32,1", "3,x"])
def test_malformed_input_shape_flag_is_a_usage_error(text: str) -> None:
    with pytest.raises(SystemExit):
        aggregator_args("--input-shape", text)


@pytest.mark.parametrize("key", ["roundz", "learning_rate"])
def test_unknown_toml_key_raises_value_error_naming_it(tmp_path: Path, key: str) -> None:
    path = write_toml(tmp_path, f"[aggregator]\nrounds = 3\n{key} = 1\n")

    with pytest.raises(ValueError, match=key):
        from_args(aggregator_args("--config", str(path)))


def test_missing_config_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        from_args(aggregator_args("--config", str(tmp_path / "absent.toml")))


def test_malformed_toml_raises_value_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[aggregator\nrounds = 3\n")

    with pytest.raises(ValueError):
        from_args(aggregator_args("--config", str(path)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("rounds = 0", "rounds"),
        ("fraction = 1.5", "fraction"),
        ("fraction = 0", "fraction"),
        ('codec = "zip"', "codec"),
        ("min_clients = 0", "min-clients"),
        ("round_timeout = 0", "round-timeout"),
        ("lr = 0", "lr"),
        ("momentum = -0.5", "momentum"),
    ],
)
def test_invalid_toml_values_raise_value_error(tmp_path: Path, line: str, message: str) -> None:
    path = write_toml(tmp_path, f"[aggregator]\n{line}\n")

    with pytest.raises(ValueError, match=message):
        from_args(aggregator_args("--config", str(path)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rounds", "0"), "rounds"),
        (("--fraction", "1.5"), "fraction"),
        (("--codec", "zip"), "codec"),
    ],
)
def test_invalid_flag_values_raise_value_error(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_args(aggregator_args(*argv))


def test_invalid_environment_value_raises_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ROUNDS", "0")

    with pytest.raises(ValueError, match="rounds"):
        from_args(aggregator_args())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rounds": 0}, "rounds"), ({"fraction": 1.5}, "fraction"), ({"codec": "zip"}, "codec")],
)
def test_config_constructor_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregatorConfig(**kwargs)  # type: ignore[arg-type]
