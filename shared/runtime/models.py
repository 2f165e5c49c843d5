"""Model zoo for fedmq.

Every model is a plain ``nn.Sequential`` of standard layers so that it exports
cleanly with ``torch.onnx.export`` (no Python control flow on tensor values) and
so that the aggregator and the agents build bit-for-bit identical architectures
from just a name and an input shape.

Models take float32 ``N x C x H x W`` input scaled to ``[0, 1]`` and return logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODEL_NAMES: tuple[str, ...] = ("lenet5", "cnn", "mlp")


class UnknownModelError(ValueError):
    """Raised when a model name is not in :data:`MODEL_NAMES`."""


def _conv_out(size: int, kernel: int, padding: int) -> int:
    """Spatial size after a stride-1 convolution."""
    return size + 2 * padding - kernel + 1


def _pool_out(size: int) -> int:
    """Spatial size after a 2x2, stride-2 max-pool (floor mode, as PyTorch)."""
    return size // 2


def _conv_pool_size(size: int, layers: tuple[tuple[int, int], ...]) -> int:
    """Spatial size after a stack of (kernel, padding) conv + 2x2 pool blocks."""
    for kernel, padding in layers:
        size = _pool_out(_conv_out(size, kernel, padding))
    return size


def _check_spatial(name: str, height: int, width: int) -> None:
    """Refuse inputs that the conv/pool stack would shrink to nothing."""
    if height < 1 or width < 1:
        raise ValueError(
            f"input is too small for model {name!r}: feature map would be {height}x{width}"
        )


def _lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-5 (padding 2 on the first conv, so 28x28 behaves like the original 32x32)."""
    channels, height, width = input_shape
    blocks = ((5, 2), (5, 0))
    out_h, out_w = _conv_pool_size(height, blocks), _conv_pool_size(width, blocks)
    _check_spatial("lenet5", out_h, out_w)
    return nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * out_h * out_w, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def _fedavg_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The CNN of McMahan et al. 2017 ("Communication-Efficient Learning ...")."""
    channels, height, width = input_shape
    blocks = ((5, 2), (5, 2))
    out_h, out_w = _conv_pool_size(height, blocks), _conv_pool_size(width, blocks)
    _check_spatial("cnn", out_h, out_w)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * out_h * out_w, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def _mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The "2NN" of McMahan et al. 2017: two hidden layers of 200 ReLU units."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "lenet5": _lenet5,
    "cnn": _fedavg_cnn,
    "mlp": _mlp,
}


def build_model(
    name: str, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10
) -> nn.Module:
    """Build a freshly initialised model by name.

    ``input_shape`` is ``(C, H, W)``; the flatten size of the classifier head is
    derived from it. Raises :class:`UnknownModelError` for an unknown name and
    ``ValueError`` for a malformed shape or class count.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UnknownModelError(
            f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}"
        )
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    return builder(shape, int(num_classes))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODEL_NAMES", "UnknownModelError", "build_model", "count_parameters"]
