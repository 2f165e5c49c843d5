"""Moving parameters between torch modules and the numpy tensors that travel in frames."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Tensors = dict[str, np.ndarray]


def get_params(model: torch.nn.Module) -> Tensors:
    """Every floating-point entry of the state dict, as fp32 numpy copies, in module order."""
    return {
        name: t.detach().cpu().to(torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name → shape of what :func:`get_params` returns."""
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if t.is_floating_point()}


def set_params(model: torch.nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load fp32 numpy tensors into ``model`` (shapes must match exactly)."""
    state = model.state_dict()
    missing = [n for n, t in state.items() if t.is_floating_point() and n not in params]
    if missing:
        raise ValueError(f"parameters missing: {missing[:5]}")
    with torch.no_grad():
        for name, value in params.items():
            if name not in state:
                raise ValueError(f"unknown parameter {name!r}")
            target = state[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{name}: shape {value.shape} != {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tensors:
    """a − b, tensor by tensor (a local model minus the global it started from)."""
    return {n: (a[n] - b[n]).astype(np.float32) for n in a}
