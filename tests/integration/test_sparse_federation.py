"""Federations with the biased codecs (top-k, low-rank) and error feedback, over Mosquitto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.ops.local_broker import LocalBroker
from edge_agent.residual import RESIDUAL_FILE, ResidualStore
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

# codec → the largest update it may send for the 54k-param MLP (≈ 216 kB in fp32)
CODECS = {"topk8:0.05": 216_000 / 15, "lowrank:4+int4": 216_000 / 40}


@pytest.mark.parametrize("codec", list(CODECS))
def test_compressed_federation_learns_with_small_updates_and_persists_residuals(
    broker: LocalBroker, tmp_path: Path, codec: str
) -> None:
    clients = fed.write_client_data(tmp_path / "data", 3)
    agg = fed.start_aggregator(broker.url, tmp_path, "--codec", codec, rounds=4, min_clients=3)
    agents = [
        fed.start_agent(broker.url, f"pi-{i}", p, tmp_path, "--state-dir", str(tmp_path / f"s{i}"))
        for i, p in enumerate(clients)
    ]
    try:
        code = fed.wait_exit(agg, 180, tmp_path / "aggregator.log")
        agent_codes = fed.wait_agents(agents, [f"pi-{i}" for i in range(3)], tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert code == 0 and agent_codes == [0, 0, 0]
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["accepted"] == 3 and r["codec"] == codec for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.85  # 4 classes: chance is 0.25
    per_update = max(r["update_bytes"] for r in rounds) / 3
    assert 0 < per_update < CODECS[codec]
    for i in range(3):
        assert (tmp_path / f"s{i}" / RESIDUAL_FILE).exists()
        residual = ResidualStore(tmp_path / f"s{i}", fed.FEDERATION).load().residual
        assert residual and all(np.isfinite(v).all() for v in residual.values())
        assert any(np.abs(v).sum() > 0 for v in residual.values())
