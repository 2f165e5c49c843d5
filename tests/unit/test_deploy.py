"""The deployment kit: systemd units, install.sh, example configs, configuration docs."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.ops import config_docs
from edge_agent.config import AgentConfig
from edge_agent.serve import ServeConfig
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))


def test_configuration_docs_list_every_setting() -> None:
    assert config_docs.missing_descriptions() == []
    assert config_docs.missing_flags() == []
    assert (REPO / "docs" / "configuration.md").read_text() == config_docs.render_markdown(), (
        "docs/configuration.md is stale: run python -m aggregator.ops.config_docs"
    )


@pytest.mark.parametrize(
    ("cls", "section", "extra"),
    [
        (AgentConfig, "agent", {}),
        (ServeConfig, "inference", {}),
        (AggregatorConfig, "aggregator", {}),
    ],
)
def test_example_configs_load(cls: type, section: str, extra: dict[str, str]) -> None:
    name = "aggregator" if section == "aggregator" else "agent"
    args = argparse.Namespace(config=DEPLOY / f"{name}.example.toml")

    cfg = load_settings(cls, args, section, "FEDMQ_TEST_UNUSED_")

    assert cfg.federation == "shop-floor"  # type: ignore[attr-defined]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_is_hardened(unit: Path) -> None:
    text = unit.read_text()

    for line in ("Restart=on-failure", "User=fedmq", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in text
    assert "StateDirectory=fedmq" in text


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_passes_systemd_analyze(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants existing executables: point /opt/fedmq/venv at this checkout's venv.
    venv = Path(sys.executable).parent.parent
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/fedmq/venv", str(venv)))

    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)

    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if unit.name in line or "error" in line.lower()
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def _fake_venv(root: Path) -> Path:
    """An existing venv below ``root`` whose python and fedmq-agent only log their arguments."""
    bin_dir = root / "opt" / "fedmq" / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = root / "calls.log"
    for name in ("python", "fedmq-agent"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (bin_dir / name).chmod(0o755)
    return calls


def test_install_sh_pip_installs_extra_packages_with_fedmq(tmp_path: Path) -> None:
    root = tmp_path / "root"
    calls = _fake_venv(root)
    (tmp_path / "my-plugin").mkdir()
    cmd = ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--python", sys.executable]
    cmd += ["--extra-package", "my-plugin", "--extra-package", "pyarrow>=15"]
    env = {k: v for k, v in os.environ.items() if k != "FEDMQ_PIP_ARGS"}

    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)

    assert out.returncode == 0, out.stderr
    (pip,) = [c for c in calls.read_text().splitlines() if " -m pip install " in c]
    # One pip run: a plugin requiring fedmq gets this source; a local path becomes absolute.
    assert pip.endswith(f"{REPO}[train] {tmp_path / 'my-plugin'} pyarrow>=15")
