"""``fedmq bench fleet`` end to end: real Mosquitto, the real aggregator, real agents that train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aggregator.ops.bench.fleet import add_arguments, run_fleet
from tests.integration.federation import needs_fashion_mnist

pytestmark = pytest.mark.integration


@needs_fashion_mnist
def test_a_fleet_in_two_processes_counts_every_update_once(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--agents", "6", "--rounds", "2", "--processes", "2", "--samples-per-agent", "20"]
    args = parser.parse_args([*argv, "--timeout", "300", "--out", str(tmp_path)])

    code = run_fleet(args)

    doc = json.loads((tmp_path / "fleet.json").read_text())
    assert code == 0
    assert [(r["round"], r["selected"], r["accepted"]) for r in doc["rows"]] == [
        (1, 6, 6),
        (2, 6, 6),
    ]
    assert all(r["counted_once"] and r["receipts_lost"] == 0 for r in doc["rows"])
    # Every agent trained in both rounds on its own connection, and ended by itself.
    (run,) = doc["runs"]
    assert (run["agents_ended"], run["agents_failed"], run["aggregator_exit"]) == (6, 0, 0)
    assert (tmp_path / "fleet.png").stat().st_size > 0
    events = [
        json.loads(line)
        for path in sorted((tmp_path / "n6").glob("events-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    trained = {(e["client"], e["end"] > e["start"]) for e in events if e["ev"] == "train"}
    assert trained == {(f"dev-{i:05d}", True) for i in range(6)}
    assert len([e for e in events if e["ev"] == "train"]) == 12


@needs_fashion_mnist
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_fleet_of_slow_and_part_time_agents_runs_in_either_mode(
    tmp_path: Path, mode: str
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--agents", "6", "--rounds", "2", "--processes", "2", "--samples-per-agent", "20"]
    argv += ["--slow-fraction", "0.5", "--slowdown", "2", "--online", "0.8"]
    argv += ["--online-spell-s", "2", "--mode", mode, "--buffer", "3"]
    args = parser.parse_args([*argv, "--timeout", "120", "--out", str(tmp_path)])

    code = run_fleet(args)

    doc = json.loads((tmp_path / "fleet.json").read_text())
    assert code == 0
    assert doc["settings"]["mode"] == mode
    assert (doc["settings"]["slow_fraction"], doc["settings"]["online"]) == (0.5, 0.8)
    assert len(doc["rows"]) == 2 and all(r["counted_once"] for r in doc["rows"])
    (run,) = doc["runs"]
    assert (run["agents_ended"], run["agents_slow"], run["agents_part_time"]) == (6, 3, 6)
    # The slow devices (the seed's draw) took their extra time after each training.
    events = [
        json.loads(line)
        for path in sorted((tmp_path / "n6").glob("events-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    slow = {e["client"] for e in events if e["ev"] == "agent" and e["slowdown"] == 2}
    assert slow == {"dev-00001", "dev-00002", "dev-00005"}
    slow_trains = [e for e in events if e["ev"] == "train" and e["client"] in slow]
    assert all(e["done"] - e["end"] >= e["end"] - e["start"] for e in slow_trains)
