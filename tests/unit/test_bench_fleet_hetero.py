"""``fedmq bench fleet`` on a heterogeneous fleet: its flags, which devices are slow or
part-time, the agents ``fleet_agents`` builds from them, and what the report records."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.ops.bench import fleet_hetero
from aggregator.ops.bench.async_mode import slow_devices
from aggregator.ops.bench.fleet import add_arguments, write_shards
from aggregator.ops.bench.fleet_agents import EventLog, build_agents, parse_args
from aggregator.ops.bench.fleet_report import (
    Announcement,
    FleetEvents,
    counted_once_async,
    heterogeneity_summary,
    round_rows,
    settings_line,
)
from shared.runtime.data import ArrayDataset

CLIENTS = [f"dev-{i:05d}" for i in range(10)]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_a_fleet_is_homogeneous_and_synchronous_by_default() -> None:
    args = _parse([])
    assert (args.slow_fraction, args.online, args.min_batch_ms, args.mode) == (0, 1, 0, "sync")
    assert fleet_hetero.agent_flags(args, CLIENTS, set()) == []
    assert fleet_hetero.mode_flags(args) == []
    assert fleet_hetero.label(args) == ""


def test_flags_take_slow_part_time_devices_and_the_async_mode() -> None:
    argv = ["--slow-fraction", "0.3", "--slowdown", "5", "--min-batch-ms", "20", "--online"]
    argv += ["0.8", "--online-spell-s", "30", "--mode", "async", "--buffer", "4", "--seed", "7"]

    args = _parse(argv)

    assert (args.slow_fraction, args.slowdown, args.min_batch_ms) == (0.3, 5.0, 20.0)
    assert (args.online, args.online_spell_s, args.seed) == (0.8, 30.0, 7)
    assert (args.mode, args.buffer, args.max_staleness) == ("async", 4, 10)
    assert fleet_hetero.label(args) == (
        " --mode async --buffer 4 --max-staleness 10 --staleness-weight poly:0.5"
        " --slow-fraction 0.3 --slowdown 5 --seed 7 --min-batch-ms 20 --online 0.8"
        " --online-spell-s 30"
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--slow-fraction", "1.5"],
        ["--slow-fraction", "x"],
        ["--slowdown", "0.5"],
        ["--online", "0"],
        ["--online", "1.2"],
        ["--online-spell-s", "0"],
        ["--min-batch-ms", "-1"],
        ["--mode", "fast"],
    ],
)
def test_flags_refuse_settings_an_agent_would_refuse(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(bad)


def test_the_same_devices_are_slow_in_every_run_as_in_bench_async() -> None:
    first = fleet_hetero.slow_clients(CLIENTS, 0.3, seed=0)

    again = fleet_hetero.slow_clients(CLIENTS, 0.3, seed=0)

    assert first == again
    assert len(first) == 3
    assert first == {CLIENTS[i] for i in slow_devices(10, 0.3, 0)}
    assert fleet_hetero.slow_clients(CLIENTS, 0.0, seed=0) == set()
    assert fleet_hetero.slow_clients(CLIENTS, 1.0, seed=0) == set(CLIENTS)


def test_each_agent_process_is_told_only_its_own_slow_devices() -> None:
    args = _parse(["--slow-fraction", "0.5", "--slowdown", "2", "--online", "0.8"])
    slow = {"dev-00001", "dev-00007"}

    flags = fleet_hetero.agent_flags(args, CLIENTS[:5], slow)
    fast_process = fleet_hetero.agent_flags(args, CLIENTS[2:5], slow)

    assert flags == [
        *("--slow", "dev-00001", "--slowdown", "2"),
        *("--online", "0.8", "--online-spell-s", "60"),
    ]
    assert fast_process == ["--online", "0.8", "--online-spell-s", "60"]


def test_the_quorum_waits_for_half_the_part_time_fleet_and_at_most_k_in_async() -> None:
    assert fleet_hetero.quorum(_parse([]), 100) == 100
    assert fleet_hetero.quorum(_parse(["--online", "0.6"]), 100) == 30
    assert fleet_hetero.quorum(_parse(["--online", "0.01"]), 10) == 1
    assert fleet_hetero.quorum(_parse(["--mode", "async", "--buffer", "8"]), 100) == 8


def test_the_async_mode_reaches_the_aggregator_with_its_settings() -> None:
    args = _parse(["--mode", "async", "--buffer", "4", "--staleness-weight", "const"])

    flags = fleet_hetero.mode_flags(args)

    assert flags == [
        *("--mode", "async", "--buffer", "4", "--max-staleness", "10"),
        *("--staleness-weight", "const"),
    ]
    assert fleet_hetero.settings(args)["buffer"] == 4


def _agents_argv(tmp_path: Path, *extra: str) -> list[str]:
    x = np.zeros((6, 1, 4, 4), dtype=np.float32)
    write_shards(ArrayDataset(x, np.arange(6) % 2), CLIENTS[:3], 2, tmp_path)
    return [
        *("--broker", "mqtt://127.0.0.1:1", "--federation", "fleet", "--ids", "dev-00000:3"),
        *("--data-dir", str(tmp_path), "--state-dir", str(tmp_path / "state")),
        *("--events", str(tmp_path / "events.jsonl"), *extra),
    ]


def test_fleet_agents_give_each_agent_its_slowdown_and_availability(tmp_path: Path) -> None:
    argv = _agents_argv(
        tmp_path,
        *("--slow", "dev-00001", "--slowdown", "5", "--min-batch-ms", "20"),
        *("--online", "0.6", "--online-spell-s", "30"),
    )
    events = EventLog(tmp_path / "events.jsonl")

    agents = build_agents(parse_args(argv), events)
    events.close()

    configs = {a.cfg.client_id: a.cfg for a in agents}
    assert {c: cfg.slowdown for c, cfg in configs.items()} == {
        "dev-00000": 1.0,
        "dev-00001": 5.0,
        "dev-00002": 1.0,
    }
    assert all(cfg.min_batch_ms == 20 and cfg.online == 0.6 for cfg in configs.values())
    assert all(cfg.online_spell_s == 30 for cfg in configs.values())
    # The agent's own on-line spells (edge_agent/availability.py), as fedmq-agent's.
    assert all(a.spells is not None and a.spells.fraction == 0.6 for a in agents)


def test_fleet_agents_are_full_time_and_full_speed_by_default(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl")

    agents = build_agents(parse_args(_agents_argv(tmp_path)), events)
    events.close()

    assert all(a.cfg.slowdown == 1 and a.cfg.online == 1 for a in agents)
    assert all(a.spells is None for a in agents)


def _ended(client: str, **fields: Any) -> dict[str, Any]:
    return {"ev": "agent", "client": client, "connects": 1, "exit_code": 0, **fields}


def test_the_summary_counts_slow_and_part_time_agents_from_their_events() -> None:
    agent_events = [
        _ended("a", slowdown=5.0, online=0.8, offline_spells=2, rounds_trained=3),
        _ended("b", slowdown=1.0, online=0.8, offline_spells=1, rounds_trained=2),
        _ended("c"),  # an event file of an older run: no such fields
    ]

    summary = heterogeneity_summary(agent_events)

    assert summary == {
        "agents_slow": 1,
        "agents_part_time": 2,
        "offline_spells": 3,
        "rounds_trained": 5,
    }


def test_the_settings_line_leaves_out_unset_settings() -> None:
    line = settings_line({"mode": "sync", "slowdown": 5.0, "round_timeout": None})

    assert line == "settings: mode sync, slowdown 5.0"


def test_a_slow_device_s_extra_time_is_part_of_the_round_s_training() -> None:
    ev = FleetEvents()
    ev.starts[1] = Announcement(1, 100.0, 100.0, 0, 100, 0.01)
    train = {"ev": "train", "client": "a", "asked": 100.0, "start": 100.5, "end": 101.0}

    (row,) = round_rows(1, ev, [{**train, "done": 103.0}], [])

    assert (row["train_span_s"], row["slowest_train_s"]) == (3.0, 0.5)


def test_async_counts_each_update_once_over_the_whole_run() -> None:
    ev = FleetEvents()
    # Window 2 counts a's update trained on round 1: its receipt names round 1.
    ev.receipts += [(1.0, 1, "a", "accepted"), (1.1, 1, "b", "accepted")]
    ev.receipts += [(2.0, 1, "c", "accepted"), (2.1, 2, "a", "accepted"), (2.2, 2, "b", "stale")]
    metrics = [{"round": 1, "participants": ["a", "b"]}, {"round": 2, "participants": ["c", "a"]}]

    assert counted_once_async(ev, metrics)
    assert not counted_once_async(ev, [*metrics, {"round": 3, "participants": ["b"]}])
    ev.receipts.append((3.0, 2, "a", "accepted"))  # the same update accepted twice
    assert not counted_once_async(ev, [*metrics, {"round": 3, "participants": ["a"]}])
