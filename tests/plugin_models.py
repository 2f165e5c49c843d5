"""Model plugins for the tests: a small 1-D CNN for sensor windows, and a "newer version" of it.

Named by the tests through a monkeypatched entry-point lookup, a real ``EntryPoint`` object,
``FEDMQ_MODEL_PLUGINS`` (real processes) or a ``dist-info`` directory on ``PYTHONPATH``.
"""

from __future__ import annotations

from torch import nn

from shared.protocol.messages import ModelSpec
from shared.runtime.plugins import ModelPlugin
from tests.synthetic import WINDOW_SHAPE


def build_cnn1d(spec: ModelSpec) -> nn.Module:
    """A 1-D CNN over ``(C, L)`` windows: what a user writes for sensor data."""
    channels, _length = spec.input_shape
    return nn.Sequential(
        nn.Conv1d(channels, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, spec.output_size),
    )


def build_cnn1d_wider(spec: ModelSpec) -> nn.Module:
    """The same plugin, a later version: 12 filters instead of 8 (another fingerprint)."""
    channels, _length = spec.input_shape
    return nn.Sequential(
        nn.Conv1d(channels, 12, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(12, spec.output_size),
    )


def build_wrong_output(spec: ModelSpec) -> nn.Module:
    """A broken plugin: one output more than the spec asks for."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(spec.output_size + 1))


def build_failing(spec: ModelSpec) -> nn.Module:
    """A plugin whose build raises."""
    raise RuntimeError("no GPU here")


cnn1d = ModelPlugin(build_cnn1d, input_shape=WINDOW_SHAPE)
cnn1d_wider = ModelPlugin(build_cnn1d_wider, input_shape=WINDOW_SHAPE)
classifier_only = ModelPlugin(build_cnn1d, tasks=("classification",))
not_a_plugin = 42
