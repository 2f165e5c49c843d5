"""``fedmq bench ingest`` end to end: real Mosquitto, the real aggregator, real update frames."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aggregator.ops.bench.ingest import add_arguments, run_ingest
from tests.integration.federation import needs_fashion_mnist

pytestmark = pytest.mark.integration


@needs_fashion_mnist
def test_every_update_is_counted_exactly_once(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--updates", "20", "--timeout", "120", "--out", str(tmp_path)])

    code = run_ingest(args)

    run = json.loads((tmp_path / "ingest.json").read_text())["runs"][0]
    assert code == 0
    assert (run["accepted"], run["metrics_accepted"], run["counted_once"]) == (20, 20, True)
    assert (run["accepted_twice"], run["refused"], run["unanswered"]) == ([], {}, 0)
