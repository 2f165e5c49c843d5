"""Federated averaging as pure math over (delta, sample count) pairs.

FedAvg written on deltas: θ ← θ + Σ nᵢΔᵢ / Σ nᵢ. The sum is kept *streaming*: each accepted
delta is folded into one running fp64 sum, so memory is O(model), not O(clients × model).
No MQTT, no files, no clock here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Tensors = dict[str, np.ndarray]


class AggregationError(ValueError):
    """A delta does not fit the model, or there is nothing to aggregate."""


class StreamingFedAvg:
    """Running sample-weighted sum of deltas for one round."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        # fp64 accumulation: summing hundreds of fp32 deltas loses no precision worth noting.
        self._sum: Tensors = {n: np.zeros(s, dtype=np.float64) for n, s in self.shapes.items()}
        self.total_samples = 0
        self.count = 0

    def check(self, delta: Mapping[str, np.ndarray]) -> None:
        """Raise AggregationError unless ``delta`` has exactly the model's tensors and shapes."""
        if set(delta) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(delta))
            extra = sorted(set(delta) - set(self.shapes))
            raise AggregationError(f"tensor names differ: missing {missing}, unexpected {extra}")
        for name, shape in self.shapes.items():
            if tuple(delta[name].shape) != tuple(shape):
                raise AggregationError(
                    f"{name}: shape {tuple(delta[name].shape)} != model {tuple(shape)}"
                )

    def add(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        """Fold one client's delta, weighted by its sample count, into the running sum."""
        if num_samples <= 0:
            raise AggregationError(f"num_samples must be positive, got {num_samples}")
        self.check(delta)
        for name, acc in self._sum.items():
            acc += np.asarray(delta[name], dtype=np.float64) * num_samples
        self.total_samples += num_samples
        self.count += 1

    def mean_delta(self) -> Tensors:
        """Σ nᵢΔᵢ / Σ nᵢ as fp32."""
        if self.total_samples == 0:
            raise AggregationError("no update was added")
        return {n: (s / self.total_samples).astype(np.float32) for n, s in self._sum.items()}

    def apply(self, params: Mapping[str, np.ndarray]) -> Tensors:
        """New global parameters θ + mean delta (θ itself is not modified)."""
        mean = self.mean_delta()
        return {n: (np.asarray(params[n], dtype=np.float32) + mean[n]) for n in self.shapes}


def fedavg(
    params: Mapping[str, np.ndarray], results: list[tuple[Mapping[str, np.ndarray], int]]
) -> Tensors:
    """One-shot FedAvg of ``results`` = [(delta, num_samples), ...] applied to ``params``."""
    acc = StreamingFedAvg({n: tuple(np.shape(v)) for n, v in params.items()})
    for delta, n in results:
        acc.add(delta, n)
    return acc.apply(params)
