"""The baseline: the same model trained in one place on the union of the devices' windows.

Every device's training windows are read with the agent's own code
(:class:`edge_agent.device_data.DeviceData`: the same files, windows, split and per-device
standardisation the agents train on), pooled, and trained from the aggregator's initial
model with the same optimiser (fedmq's local SGD), batch size, learning rate and momentum,
for as many epochs as the federation's rounds × local epochs. After each round's worth of
epochs it is evaluated by the aggregator's own evaluator on the same held-out windows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.evaluation import Evaluator
from aggregator.service import model_spec
from edge_agent.config import AgentConfig
from edge_agent.device_data import DeviceData
from shared.runtime.data import ArrayDataset
from shared.runtime.modelio import get_params, set_params
from shared.runtime.plugins import build_from_spec
from shared.runtime.training import TrainConfig, train_local


@dataclass(frozen=True)
class Baseline:
    """Held-out accuracy after each round's worth of centralised epochs."""

    accuracy: list[float]
    samples: int
    train_s: float


def device_windows(
    agent_settings: Mapping[str, Any], devices: list[tuple[str, Path]]
) -> list[ArrayDataset]:
    """Each device's training windows, exactly as its agent reads them with these settings
    (the config file's ``[agent]`` table)."""
    out = []
    for client_id, data in devices:
        cfg = AgentConfig(**{**agent_settings, "client_id": client_id, "data": str(data)})
        out.append(DeviceData(cfg, now=time.time).train)
    return out


def train_centralised(
    cfg: AggregatorConfig, parts: list[ArrayDataset], eval_data: Path, rounds: int
) -> Baseline:
    """Train on the pooled ``parts`` for ``rounds`` × ``cfg.local_epochs`` epochs."""
    pooled = ArrayDataset(
        np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    )
    spec = model_spec(cfg)
    evaluator = Evaluator(spec, str(eval_data), cfg.seed, threads=1)
    model = build_from_spec(spec)
    set_params(model, evaluator.initial_params())  # the federation's initial model
    accuracy, start = [], time.perf_counter()
    for r in range(1, rounds + 1):
        train = TrainConfig(
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            momentum=cfg.momentum,  # restarted every round, as on the devices
            weight_decay=cfg.weight_decay,
            seed=cfg.seed * 1_000_003 + r,
        )
        train_local(model, pooled, train)
        result = evaluator.evaluate(get_params(model))
        assert result is not None  # eval data is given
        accuracy.append(result.accuracy)
    return Baseline(accuracy, len(pooled), time.perf_counter() - start)
