"""A fedmq model plugin: a small 1-D CNN for windows of multichannel sensor readings.

Installed on the aggregator and on every device (``pip install``); the entry points in
``pyproject.toml`` name the two plugins below. Only the architecture lives here: the
weights travel over MQTT, the code never does.
"""

from torch import nn

from shared.protocol.messages import ModelSpec
from shared.runtime.plugins import ModelPlugin


def build(spec: ModelSpec) -> nn.Module:
    """Two convolutions over time, global average pooling, one linear layer of outputs."""
    channels, _length = spec.input_shape
    return nn.Sequential(
        nn.Conv1d(channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, spec.output_size),
    )


# The input spec: one sample is (channels, window) float32 readings.
vowels = ModelPlugin(build, input_shape=(12, 7), tasks=("classification",))
motions = ModelPlugin(build, input_shape=(6, 20), tasks=("classification",))
