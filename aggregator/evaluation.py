"""The aggregator's copy of the model: initial weights and held-out evaluation."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from aggregator.onnx_export import holdout_batch
from shared.protocol.messages import ModelSpec
from shared.runtime.data import ArrayDataset, DataFormatError, load_device_data
from shared.runtime.modelio import get_params, set_params
from shared.runtime.plugins import architecture_fingerprint, build_from_spec, describe_model
from shared.runtime.training import EvalResult, evaluate

log = logging.getLogger(__name__)

PROBE_SAMPLES = 64


class Evaluator:
    """Builds the architecture once; evaluates each new global model on held-out data."""

    def __init__(
        self,
        spec: ModelSpec,
        eval_data: str | None,
        seed: int,
        threads: int,
        regression_loss: str = "mse",
    ) -> None:
        torch.set_num_threads(max(1, threads))
        torch.manual_seed(seed)
        # A built-in model or a plugin (UnknownModelError / PluginError: the service refuses
        # to start, naming the model).
        self.model = build_from_spec(spec)
        # What every device's build must match: announced with every round.
        self.fingerprint = architecture_fingerprint(self.model)
        self.regression_loss = regression_loss
        log.info(
            "model %s (%s): %s, input %s, architecture fingerprint %s",
            spec.arch,
            describe_model(spec.arch),
            spec.task,
            tuple(spec.input_shape),
            self.fingerprint,
        )
        self.data = _eval_data(eval_data, spec) if eval_data else None
        if self.data is not None:
            log.info("evaluating on %d held-out samples from %s", len(self.data), eval_data)
        # What every new global model must give finite outputs on before it is published.
        self.probe = holdout_batch(self.data, spec.input_shape, n=PROBE_SAMPLES, seed=seed)

    def initial_params(self) -> dict[str, np.ndarray]:
        """The seeded initial global model."""
        return get_params(self.model)

    def unusable(self, params: Mapping[str, np.ndarray]) -> str | None:
        """Why ``params`` must not be published (a non-finite weight, or non-finite logits on
        the probe batch: held-out samples, or seeded noise without them), else None."""
        for name, value in params.items():
            if not np.isfinite(value).all():
                return f"{name} has non-finite values"
        set_params(self.model, params)
        with torch.no_grad():
            logits = self.model.eval()(torch.from_numpy(self.probe))
        if not bool(torch.isfinite(logits).all()):
            return f"its outputs on {len(self.probe)} probe samples are not finite"
        return None

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvalResult | None:
        """Test loss/accuracy of ``params``, or None without eval data."""
        if self.data is None:
            return None
        set_params(self.model, params)
        return evaluate(self.model, self.data, regression_loss=self.regression_loss)


def _eval_data(path: str, spec: ModelSpec) -> ArrayDataset:
    """The held-out data at ``path``, shaped for ``spec``; ValueError when it does not fit."""
    data = load_device_data(path)
    try:
        data = data.shaped(spec.input_shape)
    except DataFormatError as exc:
        raise ValueError(f"eval data {path}: {exc}") from exc
    if data.task != spec.task:
        raise ValueError(f"eval data {path} is for {data.task}, the model for {spec.task}")
    return data
