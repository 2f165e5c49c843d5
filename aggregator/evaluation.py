"""The aggregator's copy of the model: initial weights and held-out evaluation."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from shared.protocol.messages import ModelSpec
from shared.runtime.data import load_device_data
from shared.runtime.modelio import get_params, set_params
from shared.runtime.models import build_model
from shared.runtime.training import EvalResult, evaluate

log = logging.getLogger(__name__)


class Evaluator:
    """Builds the architecture once; evaluates each new global model on held-out data."""

    def __init__(self, spec: ModelSpec, eval_data: str | None, seed: int, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        torch.manual_seed(seed)
        self.model = build_model(spec.arch, spec.input_shape, spec.num_classes)
        self.data = load_device_data(eval_data) if eval_data else None
        if self.data is not None:
            if self.data.input_shape != spec.input_shape:
                raise ValueError(
                    f"eval data samples are {self.data.input_shape}, model expects "
                    f"{spec.input_shape}"
                )
            log.info("evaluating on %d held-out samples from %s", len(self.data), eval_data)

    def initial_params(self) -> dict[str, np.ndarray]:
        """The seeded initial global model."""
        return get_params(self.model)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvalResult | None:
        """Test loss/accuracy of ``params``, or None without eval data."""
        if self.data is None:
            return None
        set_params(self.model, params)
        return evaluate(self.model, self.data)
