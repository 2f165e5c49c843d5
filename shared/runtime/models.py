"""Model zoo for fedmq.

Every model is a plain ``nn.Sequential`` of standard layers so that it exports
cleanly with ``torch.onnx.export`` (no Python control flow on tensor values) and
so that the aggregator and the agents build bit-for-bit identical architectures
from just a name and an input shape.

Models take float32 ``N x C x H x W`` input scaled to ``[0, 1]`` and return logits (or,
for a regression task, ``num_outputs`` values: the head is the same layer with that many
outputs). The MLP also takes 1-D and 2-D samples (feature vectors, sensor windows). Models
of your own are plugins: :mod:`shared.runtime.plugins`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODEL_NAMES: tuple[str, ...] = ("lenet5", "cnn", "mlp")


class UnknownModelError(ValueError):
    """Raised when a model name is neither built in nor provided by a plugin."""


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


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The "2NN" of McMahan et al. 2017: two hidden layers of 200 ReLU units."""
    size = 1
    for d in input_shape:
        size *= d
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(size, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def _images_only(
    name: str, builder: Callable[[tuple[int, int, int], int], nn.Module]
) -> Callable[[tuple[int, ...], int], nn.Module]:
    """``builder`` behind a check that the samples are ``(C, H, W)`` images."""

    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(
                f"model {name!r} takes (C, H, W) images, got input shape {input_shape!r} "
                "(for 1-D or 2-D samples use 'mlp' or a model plugin)"
            )
        return builder((input_shape[0], input_shape[1], input_shape[2]), num_classes)

    return build


_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "lenet5": _images_only("lenet5", _lenet5),
    "cnn": _images_only("cnn", _fedavg_cnn),
    "mlp": _mlp,
}


def is_builtin(name: str) -> bool:
    """True when ``name`` is a model of the built-in zoo (:data:`MODEL_NAMES`)."""
    return name in _BUILDERS


def build_model(
    name: str, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10
) -> nn.Module:
    """Build a freshly initialised built-in model by name.

    ``input_shape`` is one sample's shape (``(C, H, W)`` for the CNNs, 1 to 3 dims for the
    MLP); the flatten size of the head is derived from it. ``num_classes`` is the head's
    size: classes, or a regression task's outputs. Raises :class:`UnknownModelError` for a
    name outside the zoo and ``ValueError`` for a malformed shape or output count. Plugins
    and built-ins alike: :func:`shared.runtime.plugins.build_from_spec`.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UnknownModelError(
            f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}"
        )
    if not 1 <= len(input_shape) <= 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be 1 to 3 positive ints, got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return builder(tuple(int(d) for d in input_shape), int(num_classes))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODEL_NAMES", "UnknownModelError", "build_model", "count_parameters", "is_builtin"]
