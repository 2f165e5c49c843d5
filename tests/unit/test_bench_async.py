"""``fedmq bench async`` bookkeeping (no federation runs): devices, flags, and the figures
computed from metrics entries on fixed values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.ops.bench import async_report
from aggregator.ops.bench.async_mode import (
    add_arguments,
    device_flags,
    mode_settings,
    slow_devices,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _entry(ts: float, acc: float, accepted: int = 10, **more: object) -> dict[str, object]:
    return {"ts": ts, "round_time_s": 5.0, "test_accuracy": acc, "accepted": accepted,
            "bytes_up": 1000, "bytes_down": 2000, **more}  # fmt: skip


def test_the_issues_command_line_parses_with_its_defaults() -> None:
    args = _args("--agents", "20", "--slow-fraction", "0.3", "--slowdown", "5",
                 "--target-accuracy", "0.85")  # fmt: skip

    assert (args.clients, args.dataset, args.partition, args.alpha, args.model) == (
        20, "fashion-mnist", "dirichlet", 0.5, "lenet5"
    )  # fmt: skip


def test_the_slow_devices_are_the_fraction_and_the_same_for_a_seed() -> None:
    slow = slow_devices(20, 0.3, seed=0)

    assert len(slow) == 6 and len(set(slow)) == 6 and all(0 <= i < 20 for i in slow)
    assert slow == slow_devices(20, 0.3, seed=0)
    assert slow != slow_devices(20, 0.3, seed=1)


def test_slow_and_part_time_devices_get_their_agent_flags() -> None:
    args = _args("--slowdown", "5", "--online", "0.6", "--online-spell-s", "30",
                 "--min-batch-ms", "40")  # fmt: skip
    flags = device_flags(args, slow=[3])

    part_time = ["--online", "0.6", "--online-spell-s", "30"]
    assert flags(3) == ["--slowdown", "5", "--min-batch-ms", "40", *part_time]
    assert flags(4) == ["--min-batch-ms", "40", *part_time]


def test_each_modes_settings_are_ones_the_aggregator_accepts() -> None:
    args = _args("--buffer", "8", "--max-staleness", "4", "--staleness-weight", "hinge:1,2")

    for mode in ("sync", "async"):
        settings = mode_settings(args, mode)
        values = {k: int(v) if v.isdigit() else v for k, v in settings.items()}
        AggregatorConfig(**values, min_clients=2)  # type: ignore[arg-type]
    assert mode_settings(args, "sync") == {"mode": "sync"}


def test_wall_time_starts_at_the_first_announcement() -> None:
    points = async_report.timeline([_entry(105.0, 0.5), _entry(112.0, 0.7)])

    assert points == [(5.0, 0.5), (12.0, 0.7)]
    assert async_report.time_to(points, 0.6) == 12.0
    assert async_report.time_to(points, 0.9) is None
    assert async_report.accuracy_at(points, 11.0) == 0.5
    assert async_report.accuracy_at(points, 4.0) is None


def test_summary_counts_updates_staleness_and_bytes() -> None:
    entries = [_entry(105.0, 0.5, staleness=[0, 1, 1]), _entry(112.0, 0.8, staleness=[2, 0])]

    run = async_report.summarize("async", entries, target=0.75)

    assert run["updates_applied"] == 20 and run["staleness"] == {0: 2, 1: 2, 2: 1}
    assert (run["bytes_up"], run["bytes_down"]) == (2000, 4000)
    assert (run["time_to_target_s"], run["wall_time_s"], run["final_accuracy"]) == (
        12.0, 12.0, 0.8
    )  # fmt: skip


def test_the_targets_are_judged_at_the_same_wall_time() -> None:
    sync = async_report.summarize("sync", [_entry(105, 0.80), _entry(145, 0.86)], 0.85)
    fast = async_report.summarize("async", [_entry(105, 0.85), _entry(145, 0.855)], 0.85)

    verdict = async_report.compare(sync, fast, 0.85)

    assert verdict["speedup_to_target"] == 9.0  # 45 s vs 5 s and verdict["half_the_time"]
    assert verdict["accuracy_gap_points"] == pytest.approx(-0.5) and verdict["within_1_point"]


def test_the_report_says_when_a_target_is_not_met(tmp_path: Path) -> None:
    sync = async_report.summarize("sync", [_entry(105, 0.86)], 0.85)
    slow = async_report.summarize("async", [_entry(105, 0.70), _entry(300, 0.86)], 0.85)
    result = {"command": "fedmq bench async", "sync": sync, "async": slow,
              "compare": async_report.compare(sync, slow, 0.85)}  # fmt: skip

    table = async_report.markdown(result)
    async_report.plot(result, tmp_path / "async.png")

    assert "not met: ≤ 0.5×" in table and "not met: within 1 point" in table
    assert (tmp_path / "async.png").stat().st_size > 10_000
