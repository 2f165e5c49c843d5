"""``fedmq bench strategies`` and ``fedmq bench inprocess`` bookkeeping (no federation runs)."""

from __future__ import annotations

import argparse

import pytest

from aggregator import config
from aggregator.config import AggregatorConfig
from aggregator.ops.bench import inprocess
from aggregator.ops.bench.strategies import (
    PRESETS,
    add_arguments,
    aggregator_flags,
    dp_settings,
    markdown_table,
    parse_strategy,
    split_strategies,
)


def _row(strategy: str, condition: str, accs: list[float], finished: bool = True) -> dict:
    return {
        "strategy": strategy,
        "condition": condition,
        "accuracy_per_round": accs,
        "finished": finished,
        "exit_code": 0,
    }


def test_every_preset_is_a_configuration_the_aggregator_accepts() -> None:
    for name in PRESETS:
        _, settings = parse_strategy(name)
        parser = argparse.ArgumentParser()
        config.add_arguments(parser)  # the flags the bench gives fedmq-aggregator

        cfg = config.from_args(parser.parse_args(aggregator_flags(settings)))

        assert all(str(getattr(cfg, k)).lower() == v.lower() or float(getattr(cfg, k)) == float(v)
                   for k, v in settings.items()), name  # fmt: skip


def test_a_custom_strategy_names_its_settings() -> None:
    label, settings = parse_strategy("adam-lr3:strategy=fedadam,server_lr=0.003")

    assert label == "adam-lr3"
    assert aggregator_flags(settings) == ["--strategy", "fedadam", "--server-lr", "0.003"]


def test_strategy_lists_split_on_semicolons_when_a_spec_has_settings() -> None:
    assert split_strategies("fedavg,median") == ["fedavg", "median"]
    assert split_strategies("fedavg;a:strategy=fedadam,server_lr=0.01") == [
        "fedavg",
        "a:strategy=fedadam,server_lr=0.01",
    ]


def test_an_unknown_preset_or_a_malformed_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategy("fedsgd")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_strategy("x:strategy")


def test_dp_runs_sample_every_device_with_a_fixed_bound() -> None:
    assert dp_settings(None, 10, 1.0) == {}
    assert dp_settings(4.0, 10, 0.5) == {
        "dp_epsilon": "4", "dp_expected_clients": "10", "dp_clip": "0.5", "clip": "fixed",
    }  # fmt: skip


def test_the_table_shows_rounds_10_and_last_per_condition() -> None:
    rows = [
        _row("fedavg", "none", [0.5] * 9 + [0.8] + [0.85] * 10),
        _row("fedavg", "scale ×100", [0.1] * 20),
        _row("median", "none", [0.5] * 9 + [0.79] + [0.84] * 9, finished=False),
    ]

    table = markdown_table(rows, "cmd", 20)

    assert "| strategy | none: round 10 | none: round 20 | scale ×100: round 10 |" in table
    assert "| `fedavg` | 80.00% | 85.00% | 10.00% | 10.00% |" in table
    assert "| `median` | 79.00% | stopped after round 19: 84.00% (exit 0) | – | – |" in table


def test_the_bench_defaults_are_the_issue_s_fixed_task() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])

    assert (args.clients, args.rounds, args.dataset, args.partition, args.alpha) == (
        10, 20, "fashion-mnist", "dirichlet", 0.5,
    )  # fmt: skip
    assert (args.model, args.local_epochs, args.batch_size, args.seed) == ("lenet5", 1, 32, 0)
    assert args.attack == "none" and args.malicious == 2


def test_the_inprocess_bench_takes_the_aggregator_s_strategy_flags() -> None:
    parser = argparse.ArgumentParser()
    inprocess.add_arguments(parser)
    args = parser.parse_args(
        ["--strategy", "fedadam", "--robust", "krum", "--byzantine", "2", "--lr", "0.05",
         "--dp-epsilon", "4", "--dp-expected-clients", "100", "--robust", "fedavg"]
    )  # fmt: skip

    cfg = inprocess.strategy_config(args)

    assert (cfg.strategy, cfg.robust, cfg.lr, cfg.dp_epsilon) == ("fedadam", "fedavg", 0.05, 4.0)
    assert cfg.momentum == AggregatorConfig().momentum


def test_the_demo_and_the_strategies_bench_run_the_tuned_task() -> None:
    from aggregator.ops import demo

    for add in (demo.add_arguments, add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        args = parser.parse_args([])
        assert (args.lr, args.max_update_norm) == (0.05, 100.0)
        assert demo._bound_flags(args) == ["--max-update-norm", "100"]
    assert demo._bound_flags(argparse.Namespace()) == []  # the compression bench: default bound
