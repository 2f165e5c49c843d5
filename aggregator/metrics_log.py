"""Per-round metrics kept in memory and written to ``metrics.json`` atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.messages import RoundMetrics, to_builtins


class MetricsLog:
    """Accumulates one entry per applied round; rewrites the file after each."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: list[dict[str, Any]] = []

    def append(self, metrics: RoundMetrics) -> None:
        """Add a round and persist (write to a temp file, then rename: never half a file)."""
        self.entries.append(to_builtins(metrics))
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"rounds": self.entries}, indent=1))
        os.replace(tmp, self.path)
