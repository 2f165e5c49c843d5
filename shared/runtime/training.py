"""Local training and evaluation of a model on an :class:`ArrayDataset`.

Designed for one CPU thread per process on Raspberry-Pi-class devices: the data
is converted to a single float32 tensor once, minibatches are gathered with a
seeded permutation (no ``DataLoader``, no worker processes), and the thread
count is left to the caller.

The task follows the data (:attr:`ArrayDataset.task`): integer labels train on
cross-entropy and evaluate to accuracy; float targets train on MSE (or MAE,
``TrainConfig.regression_loss``) and evaluate to RMSE and MAE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.runtime.data import ArrayDataset

REGRESSION_LOSSES = ("mse", "mae")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one round of local SGD."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    regression_loss: str = "mse"  # "mse" or "mae"; classification is always cross-entropy
    # FedProx (Li et al. 2020): μ of the proximal term μ/2·‖w − w₀‖², w₀ the weights training
    # starts from (the global model); 0 = plain SGD.
    proximal_mu: float = 0.0
    # A slower device on this machine (a heterogeneous fleet to test on): after each batch,
    # sleep so that it lasts slowdown × max(its own time, min_batch_s): slowdown× the wall
    # time, and with min_batch_s a device of that speed however many share this machine's
    # cores (as long as they are not all busy).
    slowdown: float = 1.0
    min_batch_s: float = 0.0

    def __post_init__(self) -> None:
        """Reject nonsensical values early, with the offending field named."""
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.slowdown <= 1000:
            raise ValueError(f"slowdown must be in [1, 1000], got {self.slowdown}")
        if not 0 <= self.min_batch_s <= 60:
            raise ValueError(f"min_batch_s must be in [0, 60], got {self.min_batch_s}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be None or >= 1, got {self.max_steps}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(
                f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}"
            )


@dataclass(frozen=True)
class TrainResult:
    """Summary of a local training run; ``train_loss`` is the mean over all samples seen."""

    num_samples: int
    steps: int
    train_loss: float
    train_time_s: float
    slowed_s: float = 0.0  # of train_time_s, the wall time added by ``slowdown``


@dataclass(frozen=True)
class EvalResult:
    """A model's quality on a dataset.

    Classification: ``loss`` is the mean cross-entropy and ``accuracy`` the fraction right
    (``rmse``/``mae`` None). Regression: ``loss`` is the mean training loss (MSE or MAE),
    ``rmse`` and ``mae`` are over every predicted value, and ``accuracy`` is NaN.
    """

    num_samples: int
    loss: float
    accuracy: float
    rmse: float | None = None
    mae: float | None = None

    @property
    def task(self) -> str:
        """``regression`` when the result carries errors, else ``classification``."""
        return "regression" if self.rmse is not None else "classification"


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's parameters (CPU for a parameterless model)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _to_tensors(model: nn.Module, data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert the whole dataset once, so batches are cheap tensor gathers."""
    if len(data) == 0:
        raise ValueError("dataset is empty: nothing to train on or evaluate")
    device = _model_device(model)
    x = torch.from_numpy(data.as_float()).to(device)
    y = torch.from_numpy(data.y).to(device)
    return x, y


class _SGD:
    """Plain SGD with momentum and L2 weight decay, matching ``torch.optim.SGD``.

    Hand-written because constructing any ``torch.optim`` optimizer imports
    ``torch._dynamo``, which costs seconds on a desktop and far more on a
    Raspberry Pi; this is the same update rule (dampening 0, no Nesterov).

    With ``proximal_mu`` > 0 (FedProx) the gradient of μ/2·‖w − w₀‖² is added to each
    parameter's gradient, μ·(w − w₀), w₀ its value when the optimizer was built: the same as
    adding the term to the loss, without a second autograd graph over the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float,
        weight_decay: float,
        proximal_mu: float = 0.0,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.proximal_mu = proximal_mu
        self.anchors = [p.detach().clone() for p in self.params] if proximal_mu else []
        self.buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update from the gradients currently stored on the parameters."""
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.proximal_mu:
                grad = grad.add(param - self.anchors[i], alpha=self.proximal_mu)
            if self.momentum:
                buf = self.buffers.get(i)
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            param.add_(grad, alpha=-self.lr)


def _regression_pair(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets as ``(batch, values)``, or ValueError when their sizes differ."""
    out, target = out.reshape(len(out), -1), target.reshape(len(target), -1)
    if out.shape != target.shape:
        raise ValueError(
            f"the model outputs {out.shape[1]} values per sample, the data has "
            f"{target.shape[1]} targets per sample"
        )
    return out, target


def _loss_function(
    data: ArrayDataset, regression_loss: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for labels; MSE or MAE (over every value) for regression targets."""
    if data.task == "classification":
        return F.cross_entropy
    elementwise = F.mse_loss if regression_loss == "mse" else F.l1_loss

    def regression(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return elementwise(*_regression_pair(out, target))

    return regression


def train_local(model: nn.Module, data: ArrayDataset, cfg: TrainConfig) -> TrainResult:
    """Train ``model`` in place with SGD for ``cfg.local_epochs`` epochs.

    The loss is cross-entropy on labels, or ``cfg.regression_loss`` (MSE, MAE) on targets,
    plus FedProx's μ/2·‖w − w₀‖² when ``cfg.proximal_mu`` > 0 (w₀: the weights at the start;
    the reported ``train_loss`` is the data loss alone).

    Minibatches are drawn from a permutation seeded by ``cfg.seed``, so the same
    starting weights, data and config give identical results. Training stops
    early after ``cfg.max_steps`` optimizer steps when that is set.
    """
    start = time.perf_counter()
    x, y = _to_tensors(model, data)
    n = len(data)
    loss_fn = _loss_function(data, cfg.regression_loss)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = _SGD(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.proximal_mu)
    model.train()
    # Accumulate on-tensor: calling .item() every step would force a sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    steps = seen = 0
    slowed = 0.0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for begin in range(0, n, cfg.batch_size):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            batch_start = time.perf_counter()
            idx = order[begin : begin + cfg.batch_size]
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(idx)
            if cfg.slowdown > 1 or cfg.min_batch_s > 0:
                took = time.perf_counter() - batch_start
                extra = cfg.slowdown * max(took, cfg.min_batch_s) - took
                time.sleep(extra)
                slowed += extra
            steps += 1
            seen += len(idx)
    return TrainResult(
        num_samples=n,
        steps=steps,
        train_loss=float(loss_sum.item()) / max(seen, 1),
        train_time_s=time.perf_counter() - start,
        slowed_s=slowed,
    )


def evaluate(
    model: nn.Module, data: ArrayDataset, batch_size: int = 1000, regression_loss: str = "mse"
) -> EvalResult:
    """Loss and accuracy (classification) or loss, RMSE and MAE (regression) of ``model``.

    No gradients; the model is put in eval mode for the pass and its previous mode restored.
    ``regression_loss`` ("mse", "mae") is the loss reported for regression targets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, y = _to_tensors(model, data)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if data.task == "classification":
                return _evaluate_classes(model, x, y, batch_size)
            return _evaluate_targets(model, x, y, batch_size, regression_loss)
    finally:
        model.train(was_training)


def _evaluate_classes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> EvalResult:
    loss_sum = 0.0
    correct = 0
    for begin in range(0, len(x), batch_size):
        logits = model(x[begin : begin + batch_size])
        target = y[begin : begin + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = len(x)
    return EvalResult(num_samples=n, loss=loss_sum / n, accuracy=correct / n)


def _evaluate_targets(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, regression_loss: str
) -> EvalResult:
    squared = absolute = 0.0
    values = 0
    for begin in range(0, len(x), batch_size):
        out, target = _regression_pair(
            model(x[begin : begin + batch_size]), y[begin : begin + batch_size]
        )
        err = (out - target).double()
        squared += float((err * err).sum())
        absolute += float(err.abs().sum())
        values += err.numel()
    mse, mae = squared / values, absolute / values
    return EvalResult(
        num_samples=len(x),
        loss=mse if regression_loss == "mse" else mae,
        accuracy=float("nan"),
        rmse=math.sqrt(mse),
        mae=mae,
    )
