"""One round of on-device training: global model in, weight delta and statistics out.

torch is imported here, lazily, when the first round is trained: an agent that only reports
presence never pays the ~500 MB of ``import torch``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.protocol.messages import ModelSpec, TrainParams
from shared.runtime.data import ArrayDataset

if TYPE_CHECKING:
    import torch

Tensors = dict[str, np.ndarray]
# Separates the update encoder's random stream from the training seed of the same round.
_ENCODER_STREAM = 0x656E63


class DivergedTraining(ValueError):
    """Local training ended with a non-finite loss or weights: there is no update to send."""


def encoder_rng(round_seed: int, client_id: str) -> np.random.Generator:
    """The random stream that encodes one client's update of one round (int8 rounding).

    Per client and round, and deterministic: from the round seed alone every device would
    draw the same rounding noise, correlated across the sum instead of averaging out.
    """
    return np.random.default_rng([round_seed, zlib.crc32(client_id.encode()), _ENCODER_STREAM])


@dataclass(frozen=True)
class LocalRound:
    """The result of training one round locally."""

    delta: Tensors
    num_samples: int
    meta: dict[str, Any]


class LocalTrainer:
    """Keeps one model instance per architecture and trains it from a given global model."""

    def __init__(
        self,
        client_id: str,
        threads: int = 1,
        models: dict[tuple[Any, ...], torch.nn.Module] | None = None,
    ) -> None:
        """``models``: a cache shared by the trainers of several agents in one process (the
        fleet simulator), who must then not train at the same time; its own otherwise."""
        self.client_id = client_id
        self.threads = threads
        self._models: dict[tuple[Any, ...], torch.nn.Module] = {} if models is None else models

    def warm_up(self) -> float:
        """Import the training stack now (seconds taken), so round 1 is not slowed by it."""
        t0 = time.perf_counter()
        import torch

        import shared.runtime.training  # noqa: F401

        torch.set_num_threads(self.threads)
        return time.perf_counter() - t0

    def _model(self, spec: ModelSpec) -> torch.nn.Module:
        import torch

        from shared.runtime.models import build_model

        # One thread per agent: several agents (or agent + other services) share a Pi's cores.
        torch.set_num_threads(self.threads)
        key = (spec.arch, spec.input_shape, spec.num_classes)
        if key not in self._models:
            self._models[key] = build_model(spec.arch, spec.input_shape, spec.num_classes)
        return self._models[key]

    def train(
        self,
        spec: ModelSpec,
        global_params: Tensors,
        params: TrainParams,
        data: ArrayDataset,
        val: ArrayDataset | None,
    ) -> LocalRound:
        """Train from ``global_params``; return the delta (local − global) and statistics.

        Raises DivergedTraining when the loss or the trained weights are not finite.
        """
        from shared.runtime.modelio import get_params, set_params, subtract
        from shared.runtime.training import TrainConfig, evaluate, train_local

        model = self._model(spec)
        set_params(model, global_params)
        # Per-client seed: the same round seed must not give every device the same shuffles.
        seed = (params.seed * 1_000_003 + zlib.crc32(self.client_id.encode())) % (2**63)
        cfg = TrainConfig(
            local_epochs=params.local_epochs,
            batch_size=params.batch_size,
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            seed=seed,
        )
        result = train_local(model, data, cfg)
        # Figures for the operator, rounded: at 100× compression the header is ~10 % of an
        # update, and 17-digit floats would be a fifth of it.
        meta: dict[str, Any] = {
            "train_loss": _figure(result.train_loss),
            "train_time_s": round(result.train_time_s, 3),
            "steps": result.steps,
        }
        if val is not None and len(val):
            ev = evaluate(model, val)
            meta.update(
                val_accuracy=round(ev.accuracy, 5),
                val_loss=_figure(ev.loss),
                val_samples=ev.num_samples,
            )
        delta = subtract(get_params(model), global_params)
        if not np.isfinite(result.train_loss):
            raise DivergedTraining(f"training diverged: loss {result.train_loss}")
        for name, value in delta.items():
            if not np.isfinite(value).all():
                raise DivergedTraining(f"training diverged: {name} has non-finite values")
        return LocalRound(delta=delta, num_samples=len(data), meta=meta)


def _figure(x: float) -> float:
    """Six significant digits (non-finite values pass through for the intake to reject)."""
    return float(f"{x:.6g}")
