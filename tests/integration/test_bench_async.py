"""``fedmq bench async`` end to end, tiny: real Mosquitto, the real aggregator in each mode,
one agent process per device, slow and part-time devices (``--slowdown``, ``--online``:
their disconnects and reconnects over paho)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aggregator.ops.bench.async_mode import add_arguments, run_async_bench
from tests.integration.federation import needs_fashion_mnist

pytestmark = pytest.mark.integration


@needs_fashion_mnist
def test_both_modes_run_on_the_same_devices_and_write_their_figures(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--agents", "4", "--rounds", "3", "--samples-per-client", "200", "--slow-fraction",
         "0.5", "--slowdown", "3", "--online", "0.7", "--online-spell-s", "2", "--buffer", "2",
         "--target-accuracy", "0.3", "--round-timeout", "60", "--timeout", "300",
         "--out", str(tmp_path)]
    )  # fmt: skip

    code = run_async_bench(args)

    doc = json.loads((tmp_path / "async.json").read_text())
    assert code == 0
    assert doc["sync"]["versions"] == 3 and doc["sync"]["staleness"] == {}
    assert doc["async"]["versions"] >= 1 and doc["async"]["updates_applied"] >= 2
    assert sum(doc["async"]["staleness"].values()) == doc["async"]["updates_applied"]
    assert len(doc["slow_devices"]) == 2
    assert "| async |" in (tmp_path / "async.md").read_text()
    assert (tmp_path / "async.png").stat().st_size > 0
    # The part-time devices went off-line and came back in at least one of the runs.
    logs = [p.read_text() for p in tmp_path.glob("*/logs/agent-*.log")]
    assert any("on-line again" in text for text in logs)
