"""Federated averaging as pure math over (delta, sample count) pairs.

FedAvg written on deltas: θ ← θ + Σ wᵢΔᵢ / Σ wᵢ with wᵢ = nᵢ, the sample count, except that no
client may take more than ``max_share`` of a round's total weight: the heaviest are capped
(wᵢ = min(nᵢ, c), :func:`share_cap`). The sum is kept *streaming*: each accepted delta is
folded into one running fp64 sum, so memory is O(model), not O(clients × model). Only the
⌈1/max_share⌉ heaviest deltas so far are held back unfolded, because only they can end up
capped (a client lighter than that many others cannot exceed the share). No MQTT, no files,
no clock here.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

Tensors = dict[str, np.ndarray]


class AggregationError(ValueError):
    """A delta does not fit the model, there is nothing to aggregate, or the result overflows."""


class RoundSum(Protocol):
    """What the intake feeds and the round's close applies: :class:`StreamingFedAvg`, or the
    configured strategy's round (:class:`aggregator.round_strategy.RoundAggregate`)."""

    shapes: dict[str, tuple[int, ...]]
    max_share: float

    def add(self, delta: Mapping[str, np.ndarray], num_samples: int, client_id: str = "") -> None:
        """Count one update (AggregationError: nothing counted)."""

    def capped(self) -> list[tuple[str, int, float]]:
        """(client, num_samples, weight) of every client whose weight the share cap lowers."""

    def apply(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global parameters (AggregationError when not finite)."""


@runtime_checkable
class PartialSum(Protocol):
    """A round sum that also counts sites' partial aggregates (docs/sites.md)."""

    def add_partial(self, delta: Mapping[str, np.ndarray], num_samples: int, site: str) -> None:
        """Count site ``site``'s mean delta with the weight of its ``num_samples``."""


@dataclass(order=True)
class _Held:
    """A delta not yet folded into the sum: it may still need capping."""

    num_samples: int
    order: int
    client_id: str = field(compare=False)
    delta: Tensors = field(compare=False)


def share_cap(held: Sequence[int], folded: int, max_share: float) -> float:
    """The weight cap c so that no client's min(n, c) is over ``max_share`` of the total.

    ``held``: the sample counts that may be capped; ``folded``: the samples of all the others
    (never capped). The largest such c (inf: no cap needed). When no cap can reach the share
    (fewer than 1/max_share clients, none folded), the cap makes the weights equal: the
    smallest largest share there is.
    """
    counts = sorted(held, reverse=True)
    if max_share >= 1 or not counts or counts[0] <= max_share * (folded + sum(counts)):
        return math.inf
    for t in range(1, len(counts) + 1):
        # The t heaviest at c, the rest at n: c / (rest + t·c) = max_share.
        rest = folded + sum(counts[t:])
        if max_share * t >= 1:
            return float(counts[t - 1])
        cap = max_share * rest / (1 - max_share * t)
        below = counts[t] if t < len(counts) else 0
        if cap >= below and cap > 0:
            return cap
    return float(counts[-1])


def check_delta(shapes: Mapping[str, tuple[int, ...]], delta: Mapping[str, np.ndarray]) -> None:
    """Raise AggregationError unless ``delta`` has exactly these tensors, shapes, finite values."""
    if set(delta) != set(shapes):
        missing = sorted(set(shapes) - set(delta))
        extra = sorted(set(delta) - set(shapes))
        raise AggregationError(f"tensor names differ: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        if tuple(delta[name].shape) != tuple(shape):
            raise AggregationError(
                f"{name}: shape {tuple(delta[name].shape)} != model {tuple(shape)}"
            )
        if not np.isfinite(delta[name]).all():
            raise AggregationError(f"{name}: non-finite values")


class StreamingFedAvg:
    """Running weighted sum of deltas for one round, with a cap on any one client's share."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], max_share: float = 1.0) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.shapes = dict(shapes)
        self.max_share = max_share
        # fp64 accumulation: summing hundreds of fp32 deltas loses no precision worth noting.
        self._sum: Tensors = {n: np.zeros(s, dtype=np.float64) for n, s in self.shapes.items()}
        self._folded = 0  # samples whose deltas are in _sum
        self._held: list[_Held] = []  # a min-heap: the lightest of the heaviest on top
        self._hold = 0 if max_share >= 1 else math.ceil(1 / max_share - 1e-9)
        self.total_samples = 0
        self.count = 0

    def check(self, delta: Mapping[str, np.ndarray]) -> None:
        """Raise AggregationError unless ``delta`` has exactly the model's tensors and shapes."""
        check_delta(self.shapes, delta)

    def add(self, delta: Mapping[str, np.ndarray], num_samples: int, client_id: str = "") -> None:
        """Fold one client's delta, weighted by its sample count, into the running sum."""
        if num_samples <= 0:
            raise AggregationError(f"num_samples must be positive, got {num_samples}")
        self.check(delta)
        entry = _Held(num_samples, self.count, client_id, {n: delta[n] for n in self.shapes})
        self.total_samples += num_samples
        self.count += 1
        if self._hold == 0:
            self._fold(entry.delta, num_samples)
            return
        heapq.heappush(self._held, entry)
        if len(self._held) > self._hold:
            lightest = heapq.heappop(self._held)
            self._fold(lightest.delta, lightest.num_samples)

    def add_uncapped(
        self, delta: Mapping[str, np.ndarray], num_samples: int, client_id: str = ""
    ) -> None:
        """Fold a delta with its full weight, never capped: a site's partial aggregate, whose
        weight is its devices' samples, each already capped at the site (docs/sites.md)."""
        if num_samples <= 0:
            raise AggregationError(f"num_samples must be positive, got {num_samples}")
        self.check(delta)
        self.total_samples += num_samples
        self.count += 1
        self._fold(delta, num_samples)

    def _fold(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        for name, acc in self._sum.items():
            acc += np.asarray(delta[name], dtype=np.float64) * num_samples
        self._folded += num_samples

    def capped(self) -> list[tuple[str, int, float]]:
        """(client, num_samples, weight) of every client whose weight the share cap lowers."""
        cap = share_cap([h.num_samples for h in self._held], self._folded, self.max_share)
        return [(h.client_id, h.num_samples, cap) for h in self._held if h.num_samples > cap]

    def mean_delta(self) -> Tensors:
        """Σ wᵢΔᵢ / Σ wᵢ as fp32; AggregationError when it is not finite in fp32."""
        if self.count == 0:
            raise AggregationError("no update was added")
        cap = share_cap([h.num_samples for h in self._held], self._folded, self.max_share)
        weights = [min(float(h.num_samples), cap) for h in self._held]
        total = self._folded + sum(weights)
        out: Tensors = {}
        for name, acc in self._sum.items():
            s = acc.copy()
            for h, w in zip(self._held, weights, strict=True):
                s += np.asarray(h.delta[name], dtype=np.float64) * w
            with np.errstate(over="ignore"):  # refused just below
                out[name] = (s / total).astype(np.float32)
            if not np.isfinite(out[name]).all():
                raise AggregationError(f"{name}: the mean delta overflows fp32")
        return out

    def apply(self, params: Mapping[str, np.ndarray]) -> Tensors:
        """New global parameters θ + mean delta (θ itself is not modified).

        AggregationError when a value of the result is not finite in fp32.
        """
        mean = self.mean_delta()
        out: Tensors = {}
        for n in self.shapes:
            with np.errstate(over="ignore"):  # refused just below
                out[n] = np.asarray(params[n], dtype=np.float32) + mean[n]
            if not np.isfinite(out[n]).all():
                raise AggregationError(f"{n}: the new global model overflows fp32")
        return out


def fedavg(
    params: Mapping[str, np.ndarray], results: list[tuple[Mapping[str, np.ndarray], int]]
) -> Tensors:
    """One-shot FedAvg of ``results`` = [(delta, num_samples), ...] applied to ``params``."""
    acc = StreamingFedAvg({n: tuple(np.shape(v)) for n, v in params.items()})
    for delta, n in results:
        acc.add(delta, n)
    return acc.apply(params)
