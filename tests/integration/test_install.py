"""deploy/install.sh for real: a fresh virtualenv with fedmq's inference extra, a unit, a config.

An integration test: it pip-installs into a new virtualenv (tens of seconds on an idle machine,
minutes on a loaded one), so it stays out of the fast tier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _plugin_package(directory: Path) -> Path:
    """The smallest installable package declaring a ``fedmq.models`` entry point."""
    directory.mkdir()
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tiny-plugin"\nversion = "0.1"\n'
        '[project.entry-points."fedmq.models"]\ntiny-cnn = "tiny_plugin:build"\n'
    )
    (directory / "tiny_plugin.py").write_text("def build(spec):\n    raise NotImplementedError\n")
    return directory


def test_install_sh_builds_an_inference_only_device_in_a_temp_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    plugin = _plugin_package(tmp_path / "tiny-plugin")
    env = dict(os.environ, FEDMQ_PYTHON=shutil.which("python3.11") or "python3")
    cmd = ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--inference-only"]
    cmd += ["--broker", "mqtt://10.0.0.2:1883", "--federation", "lab", "--client-id", "pi-9"]
    cmd += ["--extra-package", str(plugin)]

    # The bound only stops a hung pip: installs take minutes on a loaded machine.
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)

    assert out.returncode == 0, out.stderr[-3000:]
    venv = root / "opt" / "fedmq" / "venv"
    unit = root / "etc" / "systemd" / "system" / "fedmq-inference.service"
    toml = (root / "etc" / "fedmq" / "agent.toml").read_text()
    assert 'client_id = "pi-9"' in toml and "[inference]" in toml
    assert "ExecStart=/opt/fedmq/venv/bin/fedmq-agent serve" in unit.read_text()
    assert "Documentation=file:///opt/fedmq/README.md" in unit.read_text()
    assert (root / "opt" / "fedmq" / "README.md").is_file()  # what Documentation= names
    assert "not enabling" in out.stderr
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60
    )
    assert check.returncode != 0  # inference-only: no torch in the device's venv
    assert "model plugins installed: tiny-cnn" in out.stderr  # the --extra-package
