"""``fedmq bench strategies`` end to end, tiny: real Mosquitto, the real aggregator with a
strategy's flags, honest agent processes and one process of malicious agents."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aggregator.ops.bench.strategies import add_arguments, run_strategies
from tests.integration.federation import needs_fashion_mnist

pytestmark = pytest.mark.integration


@needs_fashion_mnist
def test_a_clean_and_an_attacked_federation_write_their_table(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--clients", "3", "--rounds", "2", "--samples-per-client", "100", "--malicious", "1",
         "--strategies", "median", "--attack", "none,scale:100", "--timeout", "300",
         "--out", str(tmp_path)]
    )  # fmt: skip

    code = run_strategies(args)

    doc = json.loads((tmp_path / "strategies.json").read_text())
    assert code == 0
    assert [(r["strategy"], r["condition"], r["rounds"]) for r in doc["rows"]] == [
        ("median", "none", 2),
        ("median", "scale:100", 2),
    ]
    attacked = tmp_path / "scale_100" / "median"
    # The malicious device's updates were valid frames: counted (or refused over the norm
    # bound with a receipt), never undecodable.
    log = (attacked / "logs" / "aggregator.log").read_text()
    assert "malformed" not in log
    malicious = (attacked / "logs" / "malicious.log").read_text()
    assert "round 2: update" in malicious
    assert "| `median` |" in (tmp_path / "strategies.md").read_text()
    assert (tmp_path / "strategies.png").stat().st_size > 0
