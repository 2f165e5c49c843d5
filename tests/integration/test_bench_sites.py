"""``fedmq bench sites`` end to end: real bridged Mosquittos, the real aggregators and agents."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aggregator.ops.bench.sites import add_arguments, run_sites
from tests.integration.federation import needs_fashion_mnist

pytestmark = pytest.mark.integration

SITES, PER_SITE, ROUNDS = 2, 3, 2


@needs_fashion_mnist
def test_two_sites_send_one_partial_each_per_round_and_less_over_the_wan(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--sites", str(SITES), "--agents-per-site", str(PER_SITE)),
            *("--rounds", str(ROUNDS), "--samples-per-agent", "20"),
            *("--timeout", "300", "--out", str(tmp_path)),
        ]
    )

    code = run_sites(args)

    doc = json.loads((tmp_path / "sites.json").read_text())
    assert code == 0
    flat, sites = doc["layouts"]["flat"], doc["layouts"]["sites"]
    assert (flat["exit"], sites["exit"]) == (0, 0)
    assert sites["site_aggregator_exits"] == [0] * SITES
    assert [(r["round"], r["applied"], r["participants"]) for r in flat["rows"]] == [
        (r, True, SITES * PER_SITE) for r in range(1, ROUNDS + 1)
    ]
    assert [(r["round"], r["applied"], r["participants"]) for r in sites["rows"]] == [
        (r, True, SITES) for r in range(1, ROUNDS + 1)
    ]
    # One partial per site and round reached the central broker, and no device's update.
    assert all(r["partials"] == r["partial_sites"] == SITES for r in sites["rows"])
    assert all(r["updates_on_central"] == 0 for r in sites["rows"])
    assert all(r["updates_on_central"] == SITES * PER_SITE for r in flat["rows"])
    assert [r["num_samples"] for r in sites["rows"]] == [r["num_samples"] for r in flat["rows"]]
    assert doc["summary"]["wan_ratio"] > 1
    assert doc["summary"]["payload_ratio"] > 1
    assert (tmp_path / "sites.png").stat().st_size > 0
    assert "| round |" in (tmp_path / "sites.md").read_text()


@needs_fashion_mnist
def test_a_bridge_cut_for_two_rounds_counts_nothing_twice(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--sites", "2", "--agents-per-site", "2", "--rounds", "6"),
            *("--samples-per-agent", "20", "--cut-site", "site-1", "--cut-rounds", "2"),
            *("--cut-deadline", "10", "--timeout", "300", "--out", str(tmp_path)),
        ]
    )

    code = run_sites(args)

    doc = json.loads((tmp_path / "sites.json").read_text())
    assert code == 0
    sites = doc["layouts"]["sites"]
    assert sites["cut"]["ok"] and sites["cut"]["participants_unique"]
    back = sites["cut"]["rejoined_at"]
    assert back is not None and back >= 5  # round 4 was announced before the bridge was up
    assert [r["round"] for r in sites["cut"]["rounds"]] == list(range(2, back))
    assert len(sites["cut_log"]) == 2  # cut, then healed at round 4's announcement
    by_round = {r["round"]: r for r in sites["rows"]}
    # Rounds 3 and 4 were announced while the bridge was down: the central aggregator did
    # not select site-1 (its bridge's `0`); once it was back, both sites count again.
    assert [by_round[r]["participants"] for r in (3, 4)] == [1, 1]
    assert [by_round[r]["participants"] for r in (1, *range(back, 7))] == [2] * (8 - back)
    assert all(r["applied"] for r in sites["rows"])
