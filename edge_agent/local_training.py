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

    from shared.runtime.training import EvalResult

Tensors = dict[str, np.ndarray]
# Separates the update encoder's random stream from the training seed of the same round.
_ENCODER_STREAM = 0x656E63


class DivergedTraining(ValueError):
    """Local training ended with a non-finite loss or weights: there is no update to send."""


class UnusableRound(ValueError):
    """This device cannot train the announced round: its model cannot be built here (no such
    plugin, a plugin refusing the spec), or its data does not fit the model or the task."""


class WrongModel(UnusableRound):
    """This device's build of the announced model has another architecture fingerprint."""

    def __init__(self, message: str, device_fingerprint: str) -> None:
        super().__init__(message)
        self.device_fingerprint = device_fingerprint


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
        """The cached model of ``spec`` (built on first use); UnusableRound when it cannot be."""
        import torch

        from shared.runtime.plugins import build_from_spec

        # One thread per agent: several agents (or agent + other services) share a Pi's cores.
        torch.set_num_threads(self.threads)
        key = (spec.arch, spec.input_shape, spec.num_classes, spec.task, spec.num_outputs)
        if key not in self._models:
            try:
                self._models[key] = build_from_spec(spec)
            except ValueError as exc:  # UnknownModelError, PluginError, a bad shape
                raise UnusableRound(f"cannot build model {spec.arch!r}: {exc}") from exc
        return self._models[key]

    def check_model(self, spec: ModelSpec, fingerprint: str) -> None:
        """Raise :class:`WrongModel` unless this device's build of ``spec`` has the announced
        architecture ``fingerprint`` ("" = an aggregator older than fingerprints: no check),
        :class:`UnusableRound` when it cannot be built at all."""
        from shared.runtime.plugins import architecture_fingerprint, describe_model

        mine = architecture_fingerprint(self._model(spec))
        if fingerprint and mine != fingerprint:
            raise WrongModel(
                f"architecture fingerprint mismatch for model {spec.arch!r}: aggregator "
                f"{fingerprint}, this device {mine} (its build: {describe_model(spec.arch)}); "
                "install the model version the aggregator runs",
                mine,
            )

    @staticmethod
    def check_data(spec: ModelSpec, data: ArrayDataset) -> ArrayDataset:
        """``data`` shaped for ``spec``'s samples; UnusableRound when it does not fit the model
        or the task (float targets for classification, labels beyond the classes, ...)."""
        from shared.runtime.data import DataFormatError

        try:
            shaped = data.shaped(spec.input_shape)
        except DataFormatError as exc:
            raise UnusableRound(f"this device's data does not fit the model: {exc}") from exc
        if spec.task != data.task:
            raise UnusableRound(
                f"the federation trains {spec.task}, this device's data is for {data.task} "
                f"({'float targets' if data.task == 'regression' else 'integer labels'})"
            )
        if spec.task == "classification" and data.num_classes > spec.num_classes:
            raise UnusableRound(
                f"this device's labels go up to {data.num_classes - 1}, the model has "
                f"{spec.num_classes} classes"
            )
        if spec.task == "regression" and data.num_outputs != spec.num_outputs:
            raise UnusableRound(
                f"this device's data has {data.num_outputs} targets per sample, the model "
                f"predicts {spec.num_outputs}"
            )
        return shaped

    def train(
        self,
        spec: ModelSpec,
        global_params: Tensors,
        params: TrainParams,
        data: ArrayDataset,
        val: ArrayDataset | None,
        slowdown: float = 1.0,
        min_batch_s: float = 0.0,
    ) -> LocalRound:
        """Train from ``global_params``; return the delta (local − global) and statistics.

        ``slowdown``, ``min_batch_s``: an emulated slower device (``--slowdown``,
        ``--min-batch-ms``): each batch lasts slowdown × max(its own time, min_batch_s), real
        extra wall time after it (shared/runtime/training.py).

        Raises DivergedTraining when the loss or the trained weights are not finite,
        UnusableRound when the model cannot be built here or the data does not fit it.
        """
        from shared.runtime.modelio import get_params, set_params, subtract
        from shared.runtime.training import TrainConfig, evaluate, train_local

        model = self._model(spec)
        data = self.check_data(spec, data)
        val = self.check_data(spec, val) if val is not None and len(val) else None
        try:
            set_params(model, global_params)
        except ValueError as exc:  # names/shapes: an aggregator without a fingerprint
            raise UnusableRound(
                f"the global model does not fit this device's build: {exc}"
            ) from exc
        # Per-client seed: the same round seed must not give every device the same shuffles.
        seed = (params.seed * 1_000_003 + zlib.crc32(self.client_id.encode())) % (2**63)
        cfg = TrainConfig(
            local_epochs=params.local_epochs,
            batch_size=params.batch_size,
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            seed=seed,
            regression_loss=params.regression_loss,
            proximal_mu=params.proximal_mu,
            slowdown=slowdown,
            min_batch_s=min_batch_s,
        )
        result = train_local(model, data, cfg)
        # Figures for the operator, rounded: at 100× compression the header is ~10 % of an
        # update, and 17-digit floats would be a fifth of it.
        meta: dict[str, Any] = {
            "train_loss": _figure(result.train_loss),
            "train_time_s": round(result.train_time_s, 3),
            "steps": result.steps,
        }
        if cfg.proximal_mu:  # the aggregator's logs can tell who trained with FedProx's term
            meta["proximal_mu"] = cfg.proximal_mu
        if val is not None:
            meta.update(
                _validation_figures(evaluate(model, val, regression_loss=cfg.regression_loss))
            )
        delta = subtract(get_params(model), global_params)
        if not np.isfinite(result.train_loss):
            raise DivergedTraining(f"training diverged: loss {result.train_loss}")
        for name, value in delta.items():
            if not np.isfinite(value).all():
                raise DivergedTraining(f"training diverged: {name} has non-finite values")
        return LocalRound(delta=delta, num_samples=len(data), meta=meta)


def _validation_figures(ev: EvalResult) -> dict[str, Any]:
    """The local validation figures an update reports (classification or regression)."""
    if ev.rmse is not None and ev.mae is not None:
        return {
            "val_rmse": _figure(ev.rmse),
            "val_mae": _figure(ev.mae),
            "val_loss": _figure(ev.loss),
            "val_samples": ev.num_samples,
        }
    return {
        "val_accuracy": round(ev.accuracy, 5),
        "val_loss": _figure(ev.loss),
        "val_samples": ev.num_samples,
    }


def _figure(x: float) -> float:
    """Six significant digits (non-finite values pass through for the intake to reject)."""
    return float(f"{x:.6g}")
