"""Per-round metrics kept in memory and written to ``metrics.json`` atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shared.files import write_atomic
from shared.protocol.messages import RoundMetrics, to_builtins

log = logging.getLogger("fedmq.aggregator")


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

    def earlier(self, upto: int) -> list[dict[str, Any]]:
        """The file's entries of rounds ≤ ``upto`` (a resumed run continues them)."""
        path = self.path
        if path is None or not path.exists():
            return []
        try:
            rounds = json.loads(path.read_text())["rounds"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("metrics file %s unreadable (%s): starting a new one", path, exc)
            return []
        return [e for e in rounds if isinstance(e, dict) and e.get("round", 0) <= upto]
