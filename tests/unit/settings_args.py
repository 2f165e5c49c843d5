"""Helpers shared by the settings tests: a clean environment, real flags, a TOML file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from aggregator.config import add_arguments


def clear_fedmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every FEDMQ_* variable, so none from the outer environment leaks into a test."""
    for key in list(os.environ):
        if key.startswith("FEDMQ_"):
            monkeypatch.delenv(key)


def aggregator_args(*argv: str) -> argparse.Namespace:
    """``argv`` parsed by the aggregator's real argument parser."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write_toml(tmp_path: Path, text: str) -> Path:
    """``text`` as ``fedmq.toml`` in ``tmp_path``."""
    path = tmp_path / "fedmq.toml"
    path.write_text(text)
    return path
