"""Devices that only infer or report presence must not pay for ``import torch``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "modules",
    [
        "edge_agent.agent",
        "edge_agent.inference, edge_agent.serve, edge_agent.cli",
        "shared.runtime.data, shared.protocol.frames, shared.protocol.messages",
        "shared.protocol.topics, shared.mqtt.transport",
        "shared.protocol.onnx_frame",
    ],
)
def test_import_does_not_load_torch(modules: str) -> None:
    code = (
        f"import sys, {modules}\n"
        "bad = [m for m in ('torch', 'torchvision', 'shared.runtime.models', "
        "'shared.runtime.training', 'shared.runtime.modelio') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {modules} loaded {out.stdout.strip()}"
