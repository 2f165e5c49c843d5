"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.inprocess import Federation


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    """An in-memory broker, a manual clock and the federation's files; stopped afterwards."""
    federation = Federation(tmp_path)
    yield federation
    federation.stop()
