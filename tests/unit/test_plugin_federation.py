"""Plugin models in a whole federation (in-process): regression, and a device whose plugin
version differs (refused by its fingerprint, answered with a ``wrong-model`` receipt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.checkpoint import Checkpoint, CheckpointError, CheckpointStore, config_fingerprint
from aggregator.resume import rng_state
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.local_training import LocalTrainer
from shared.protocol import messages as msg
from shared.protocol.frames import tensors_hash
from shared.protocol.messages import ModelSpec
from shared.runtime.data import save_npz
from shared.runtime.modelio import get_params
from shared.runtime.plugins import PLUGINS_ENV, architecture_fingerprint
from tests.plugin_models import build_cnn1d_wider
from tests.synthetic import WINDOW_CLASSES, WINDOW_SHAPE, make_windows
from tests.unit.inprocess import Federation, T, Worker


@pytest.fixture(autouse=True)
def _plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator and the agents of this process find ``cnn1d`` (no package installed)."""
    monkeypatch.setenv(PLUGINS_ENV, "cnn1d=tests.plugin_models:cnn1d")


def _sensor_files(fed: Federation, task: str, clients: int) -> None:
    """Each device's windows and the held-out windows, as npz files."""
    data = fed.tmp / "data"
    save_npz(data / "eval.npz", make_windows(200, seed=999, task=task))
    for i in range(clients):
        save_npz(data / f"pi-{i}.npz", make_windows(150, seed=i + 1, task=task))


def _sensor_aggregator(task: str) -> dict[str, Any]:
    outputs = {"task": "regression", "num_outputs": 1} if task == "regression" else {}
    return {
        "model": "cnn1d",
        "input_shape": WINDOW_SHAPE,
        "num_classes": WINDOW_CLASSES,
        "lr": 0.05,
        **outputs,
    }


def test_a_regression_plugin_federation_reports_falling_rmse(fed: Federation) -> None:
    _sensor_files(fed, "regression", clients=3)
    fed.start_aggregator(rounds=3, min_clients=3, **_sensor_aggregator("regression"))
    for i in range(3):
        fed.start_agent(f"pi-{i}", seed=i + 1, val_fraction=0.2)

    codes = fed.finish()

    assert set(codes.values()) == {0}
    rounds = fed.rounds()
    assert [r["task"] for r in rounds] == ["regression"] * 3
    assert all(r["test_accuracy"] is None and r["accepted"] == 3 for r in rounds)
    assert rounds[-1]["test_rmse"] < rounds[0]["test_rmse"]
    assert rounds[-1]["test_mae"] is not None and rounds[-1]["local_val_rmse"] is not None


class _OtherVersion(LocalTrainer):
    """A device with another version of the ``cnn1d`` plugin installed."""

    def _model(self, spec: ModelSpec) -> torch.nn.Module:
        if "other" not in self._models:
            self._models["other"] = build_cnn1d_wider(spec)
        return self._models["other"]


def test_a_device_with_another_plugin_version_is_refused_naming_both_fingerprints(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    _sensor_files(fed, "classification", clients=3)
    fed.start_agent("pi-0", seed=1)
    fed.start_agent("pi-1", seed=2)
    odd = EdgeAgent(fed.agent_config("pi-2", seed=3), fed.broker.connector, fed.clock,
                    trainer=_OtherVersion("pi-2"))  # fmt: skip
    fed.agents["pi-2"], fed.workers["pi-2"] = odd, Worker("pi-2", odd.run)
    fed.wait_online("pi-0", "pi-1", "pi-2")
    service = fed.start_aggregator(rounds=2, min_clients=2, **_sensor_aggregator("classification"))

    codes = fed.finish()  # the rounds do not wait for the device that cannot train them

    assert set(codes.values()) == {0}
    ours = service.evaluator.fingerprint
    device = architecture_fingerprint(build_cnn1d_wider(service.spec))
    assert ours != device
    for round_id in (1, 2):
        (receipt,) = fed.receipts(round_id, "pi-2")
        assert receipt.code == "wrong-model" and receipt.status == "rejected"
        assert ours in receipt.reason and device in receipt.reason
    assert all(r["participants"] == ["pi-0", "pi-1"] and r["rejected"] == 1 for r in fed.rounds())
    assert odd.rounds_trained == 0
    statuses = [
        msg.decode(m.payload, msg.AgentStatus) for m in fed.broker.messages(T.agent_status("pi-2"))
    ]
    assert {(s.round, s.model_fingerprint) for s in statuses if s.skipped} == {
        (1, device),
        (2, device),
    }
    refusals = [r.getMessage() for r in caplog.records if "fingerprint mismatch" in r.getMessage()]
    assert any(ours in line and device in line for line in refusals)  # the device's log line


def test_a_checkpoint_of_another_plugin_version_is_not_resumed(fed: Federation) -> None:
    cfg = fed.aggregator_config(
        state_dir=str(fed.tmp / "state"), eval_data=None, **_sensor_aggregator("classification")
    )
    spec = ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, num_classes=WINDOW_CLASSES)
    wider = get_params(build_cnn1d_wider(spec))  # what the previous version trained
    rng = rng_state(np.random.default_rng(0))
    CheckpointStore(Path(cfg.state_dir or "")).save(
        Checkpoint(1, wider, tensors_hash(wider), rng, config_fingerprint(cfg), [], run=1)
    )
    service = AggregatorService(cfg, fed.broker.connector, fed.clock)

    with pytest.raises(CheckpointError, match="another architecture than 'cnn1d'"):
        service.run()
