"""Unit tests for local training and evaluation (generated data only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.runtime.data import ArrayDataset
from shared.runtime.models import build_model
from shared.runtime.training import EvalResult, TrainConfig, evaluate, train_local


def _separable(n: int = 400, seed: int = 0) -> ArrayDataset:
    """Two classes told apart by which half of an 8x8 image is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.uniform(0.0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        half = slice(0, 4) if label == 0 else slice(4, 8)
        x[i, 0, :, half] += 0.7
    return ArrayDataset(x, y)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=2)


def test_training_reaches_high_accuracy_on_separable_data() -> None:
    data, model = _separable(), _mlp()

    train_local(model, data, TrainConfig(local_epochs=5, batch_size=16, lr=0.05))

    assert evaluate(model, _separable(seed=1)).accuracy > 0.95


def test_training_lowers_evaluation_loss() -> None:
    data, model = _separable(), _mlp()
    before = evaluate(model, data).loss

    train_local(model, data, TrainConfig(local_epochs=2, batch_size=16, lr=0.05))

    assert evaluate(model, data).loss < before / 2


def test_train_result_counts_steps_and_samples() -> None:
    data, model = _separable(100), _mlp()

    result = train_local(model, data, TrainConfig(local_epochs=2, batch_size=32))

    # ceil(100 / 32) = 4 batches per epoch.
    assert (result.num_samples, result.steps) == (100, 8)
    assert result.train_loss > 0
    assert result.train_time_s >= 0


def test_max_steps_stops_training_early() -> None:
    data, model = _separable(100), _mlp()

    result = train_local(model, data, TrainConfig(local_epochs=3, batch_size=10, max_steps=5))

    assert result.steps == 5


def test_same_seed_gives_identical_weights() -> None:
    data = _separable()
    first, second = _mlp(), _mlp()

    train_local(first, data, TrainConfig(seed=4))
    train_local(second, data, TrainConfig(seed=4))

    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_different_seeds_give_different_weights() -> None:
    data = _separable()
    first, second = _mlp(), _mlp()

    train_local(first, data, TrainConfig(seed=1))
    train_local(second, data, TrainConfig(seed=2))

    assert not torch.equal(next(first.parameters()), next(second.parameters()))


def test_evaluate_returns_sane_values_for_untrained_model() -> None:
    data = _separable(250)

    result = evaluate(_mlp(), data, batch_size=64)

    assert isinstance(result, EvalResult)
    assert result.num_samples == 250
    assert 0.0 <= result.accuracy <= 1.0
    # An untrained 2-class model should sit near chance loss ln(2).
    assert result.loss == pytest.approx(np.log(2), abs=0.3)


def test_evaluate_accepts_uint8_images() -> None:
    data = ArrayDataset(np.zeros((3, 1, 8, 8), np.uint8), np.array([0, 1, 1]))

    result = evaluate(_mlp(), data)

    assert result.num_samples == 3


def test_evaluate_restores_training_mode() -> None:
    model = _mlp()
    model.train()

    evaluate(model, _separable(10))

    assert model.training


def test_empty_dataset_is_rejected() -> None:
    empty = ArrayDataset(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64))

    with pytest.raises(ValueError, match="empty"):
        train_local(_mlp(), empty, TrainConfig())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"local_epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"momentum": 1.0},
        {"max_steps": 0},
        {"proximal_mu": -0.1},
    ],
)
def test_train_config_rejects_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def _reference_sgd(model: torch.nn.Module, data: ArrayDataset, cfg: TrainConfig) -> None:
    """The same training loop written with torch.optim.SGD."""
    x, y = torch.from_numpy(data.as_float()), torch.from_numpy(data.y)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(data), generator=generator)
        for begin in range(0, len(data), cfg.batch_size):
            idx = order[begin : begin + cfg.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-3)])
def test_update_rule_matches_torch_optim_sgd(momentum: float, weight_decay: float) -> None:
    data = _separable(96)
    cfg = TrainConfig(
        local_epochs=2, batch_size=16, lr=0.05, momentum=momentum, weight_decay=weight_decay, seed=3
    )
    ours, reference = _mlp(), _mlp()

    train_local(ours, data, cfg)
    _reference_sgd(reference, data, cfg)

    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _reference_fedprox(model: torch.nn.Module, data: ArrayDataset, cfg: TrainConfig) -> None:
    """FedProx as Li et al. write it: μ/2·‖w − w₀‖² added to the loss, torch.optim.SGD."""
    x, y = torch.from_numpy(data.as_float()), torch.from_numpy(data.y)
    anchors = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(data), generator=generator)
        for begin in range(0, len(data), cfg.batch_size):
            idx = order[begin : begin + cfg.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            prox = sum(
                ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
            )
            (loss + cfg.proximal_mu / 2 * prox).backward()
            opt.step()


def test_fedprox_adds_mu_over_2_times_the_squared_distance_to_the_start_to_the_loss() -> None:
    data = _separable(96)
    cfg = TrainConfig(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=3, proximal_mu=0.5)
    ours, reference = _mlp(), _mlp()

    train_local(ours, data, cfg)
    _reference_fedprox(reference, data, cfg)

    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _distance_moved(mu: float) -> float:
    model, start = _mlp(), _mlp()
    train_local(model, _separable(200), TrainConfig(local_epochs=3, lr=0.1, proximal_mu=mu))
    return sum(
        float(((p - q) ** 2).sum())
        for p, q in zip(model.parameters(), start.parameters(), strict=True)
    )


def test_a_larger_mu_keeps_the_local_model_closer_to_the_global_one() -> None:
    assert _distance_moved(0.0) > _distance_moved(1.0) > _distance_moved(10.0)


# --- regression ---------------------------------------------------------------------------
def _linear_targets(n: int = 400, outputs: int = 1, seed: int = 0) -> ArrayDataset:
    """Feature vectors (N, 6) of any scale and float targets, a noiseless linear function."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, size=(n, 6)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=(6, outputs)).astype(np.float32)
    y = x @ w
    return ArrayDataset(x, y[:, 0] if outputs == 1 else y)


def _regression_mlp(outputs: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", input_shape=(6,), num_classes=outputs)


@pytest.mark.parametrize(("outputs", "loss"), [(1, "mse"), (3, "mse"), (1, "mae")])
def test_regression_training_lowers_the_error(outputs: int, loss: str) -> None:
    data = _linear_targets(outputs=outputs)
    model = _regression_mlp(outputs)
    before = evaluate(model, data, regression_loss=loss)

    train_local(model, data, TrainConfig(local_epochs=5, lr=0.01, regression_loss=loss))
    after = evaluate(model, data, regression_loss=loss)

    assert after.rmse is not None and before.rmse is not None
    assert after.rmse < 0.5 * before.rmse
    assert after.task == "regression"


def test_regression_evaluation_reports_rmse_mae_and_its_loss() -> None:
    data = ArrayDataset(np.zeros((4, 6), np.float32), np.array([1.0, -1.0, 3.0, -3.0]))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # predicts 0 everywhere

    mse = evaluate(model, data, regression_loss="mse")
    mae = evaluate(model, data, regression_loss="mae")

    assert mse.rmse == pytest.approx(np.sqrt(5.0)) and mse.mae == pytest.approx(2.0)
    assert mse.loss == pytest.approx(5.0) and mae.loss == pytest.approx(2.0)
    assert np.isnan(mse.accuracy)


def test_classification_evaluation_has_no_errors() -> None:
    result = evaluate(_mlp(), _separable())

    assert result.rmse is None and result.mae is None and result.task == "classification"


def test_outputs_and_targets_of_different_sizes_are_named() -> None:
    data = _linear_targets(outputs=2)

    with pytest.raises(ValueError, match="outputs 1 values per sample, the data has 2 targets"):
        train_local(_regression_mlp(1), data, TrainConfig())


def test_an_unknown_regression_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="regression_loss"):
        TrainConfig(regression_loss="huber")
