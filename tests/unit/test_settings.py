"""Unit tests for layered settings (shared/settings.py) and the aggregator config."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, from_args
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
        ("FEDMQ_AGGREGATOR_FRACTION", "0.25", "fraction", 0.25),
        ("FEDMQ_AGGREGATOR_CODEC", "fp16", "codec", "fp16"),
        ("FEDMQ_AGGREGATOR_INPUT_SHAPE", "3,32,32", "input_shape", (3, 32, 32)),
        ("FEDMQ_AGGREGATOR_EVAL_DATA", "/data/test.npz", "eval_data", "/data/test.npz"),
    ],
)
def test_environment_values_are_coerced_to_the_field_type(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(var, raw)

    cfg = from_args(aggregator_args())

    assert getattr(cfg, field) == expected


def test_unparsable_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_ROUNDS", "many")

    with pytest.raises(ValueError, match="FEDMQ_AGGREGATOR_ROUNDS"):
        from_args(aggregator_args())


def test_unset_flags_do_not_override_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[aggregator]\ncodec = "fp32"\n')

    cfg = from_args(aggregator_args("--config", str(path), "--rounds", "3"))

    assert cfg.codec == "fp32"
    assert cfg.rounds == 3


def test_input_shape_flag_is_parsed_as_tuple() -> None:
    assert from_args(aggregator_args("--input-shape", "3,32,32")).input_shape == (3, 32, 32)


def test_malformed_input_shape_flag_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        aggregator_args("--input-shape", "3,32")


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


def test_wrongly_typed_toml_value_raises_value_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[aggregator]\nrounds = "ten"\n')

    with pytest.raises(ValueError, match="rounds"):
        from_args(aggregator_args("--config", str(path)))
