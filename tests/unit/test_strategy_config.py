"""The aggregator's strategy settings: defaults, flags, and the configurations it refuses."""

from __future__ import annotations

import argparse

import pytest

from aggregator.config import AggregatorConfig, add_arguments, from_args
from aggregator.strategy_config import dp_enabled
from shared.settings import SettingsError


def _parse(*argv: str) -> AggregatorConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_the_defaults_are_fedavg_at_server_lr_one_with_adaptive_clipping_and_no_dp() -> None:
    cfg = AggregatorConfig()

    assert (cfg.strategy, cfg.server_lr, cfg.robust) == ("fedavg", None, "fedavg")
    assert (cfg.clip, cfg.clip_bound, cfg.clip_quantile) == ("adaptive", None, 0.5)
    assert not dp_enabled(cfg) and cfg.proximal_mu == 0.0


def test_every_strategy_flag_reaches_the_config() -> None:
    cfg = _parse(
        "--strategy", "fedadam", "--server-lr", "0.03", "--beta1", "0.8", "--beta2", "0.95",
        "--tau", "0.01", "--robust", "trimmed-mean", "--trim-fraction", "0.2",
        "--clip", "fixed", "--clip-bound", "3", "--proximal-mu", "0.1",
        "--max-round-memory", "1000000",
    )  # fmt: skip

    assert (cfg.strategy, cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau) == (
        "fedadam", 0.03, 0.8, 0.95, 0.01,
    )  # fmt: skip
    assert (cfg.robust, cfg.trim_fraction, cfg.max_round_memory) == ("trimmed-mean", 0.2, 10**6)
    assert (cfg.clip, cfg.clip_bound, cfg.proximal_mu) == ("fixed", 3.0, 0.1)


def test_dp_flags_turn_dp_on() -> None:
    cfg = _parse("--dp-epsilon", "4", "--dp-expected-clients", "10", "--dp-clip", "0.5")

    assert dp_enabled(cfg) and (cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip) == (4.0, 1e-5, 0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "sgd"}, "strategy must be one of"),
        ({"server_lr": 0.0}, "server-lr must be positive"),
        ({"server_momentum": 1.0}, "server-momentum must be in"),
        ({"robust": "mean"}, "robust must be one of"),
        ({"trim_fraction": 0.5}, "trim-fraction must be in"),
        ({"clip": "fixed"}, "clip-bound is required by --clip fixed"),
        ({"clip_bound": 30.0}, "clip-bound must not exceed max-update-norm"),
        ({"clip_quantile": 1.0}, "clip-quantile must be in"),
        ({"proximal_mu": -1.0}, "proximal-mu must be in"),
        ({"robust": "krum", "min_clients": 4}, "min-clients must be ≥ 2·byzantine \\+ 3 = 5"),
        ({"dp_epsilon": 1.0}, "dp-expected-clients is required"),
        (
            {"dp_epsilon": 1.0, "dp_expected_clients": 5.0, "robust": "median"},
            "robust must be fedavg with differential privacy",
        ),
        (
            {"dp_noise_multiplier": 1.0, "dp_expected_clients": 5.0, "clip": "none"},
            "clip must be fixed or adaptive with differential privacy",
        ),
        (
            {"dp_noise_multiplier": 1.0, "dp_expected_clients": 5.0, "clip_bound": 2.0},
            "clip-bound is not used with differential privacy",
        ),
        ({"dp_delta": 0.0}, "dp-delta must be in"),
    ],
)
def test_a_strategy_that_cannot_work_is_refused_naming_the_setting(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AggregatorConfig(**overrides)  # type: ignore[arg-type]


def test_a_bad_flag_value_names_its_source() -> None:
    with pytest.raises(SettingsError, match=r"clip-quantile must be in .*command-line"):
        _parse("--clip-quantile", "2")
