"""Per-round metrics kept in memory and written to ``metrics.json`` atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.files import write_atomic
from shared.protocol.messages import RoundMetrics, to_builtins


class MetricsLog:
    """Accumulates one entry per applied round; rewrites the file after each."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: list[dict[str, Any]] = []

    def append(self, metrics: RoundMetrics) -> None:
        """Add a round and persist it atomically (never half a file)."""
        self.entries.append(to_builtins(metrics))
        if self.path is not None:
            write_atomic(self.path, json.dumps({"rounds": self.entries}, indent=1).encode())
