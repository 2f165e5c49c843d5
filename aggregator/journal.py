"""Journal of the open round: what was announced and which updates were accepted.

Design (the simplest that makes "resume the same round, lose no accepted update, apply none
twice" true with O(model) memory): every accepted update's frame is stored as received in
``journal/round-<r>/<client>.fmq`` (atomic write) and *then* a line is appended to
``journal/round-<r>.jsonl`` (fsync) — all before its receipt is sent. On restart the
aggregator replays the journaled frames, one at a time, through the same intake into a fresh
running sum. A frame written without its journal line was never acknowledged: the agent
re-sends it and it is counted then. Frames are the compressed updates (int8: ¼ of fp32), so
disk use is O(selected clients × update) for the open round only: the round's files are
deleted once its checkpoint is written, so an update is in the journal or in the checkpoint,
never in both. Replaying in journal order adds the deltas in the original order, so the
resumed sum is the same sum.

JSONL records::

    {"event": "announce", "round": r, "base_hash": h, "selected": [...], "deadline": t,
     "extensions": k, "rng_state": {...}, "run": e}
    {"event": "accepted", "round": r, "client": c, "num_samples": n, "sha256": s}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.files import fsync_dir, write_atomic

log = logging.getLogger("fedmq.aggregator.journal")

_ROUND_FILE = re.compile(r"round-(\d{1,9})\.jsonl")


@dataclass
class JournaledRound:
    """What the journal knows about one round."""

    round: int
    announce: dict[str, Any]  # the last announce record
    accepted: list[dict[str, Any]] = field(default_factory=list)  # in acceptance order


class RoundJournal:
    """Append-only per-round journal under ``<state_dir>/journal``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "journal"

    def _log(self, round_id: int) -> Path:
        return self.dir / f"round-{round_id}.jsonl"

    def _frames(self, round_id: int) -> Path:
        return self.dir / f"round-{round_id}"

    def _append(self, round_id: int, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._log(round_id)
        new = not path.exists()
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(self.dir)

    def announce(
        self,
        round_id: int,
        base_hash: str,
        selected: list[str],
        deadline: float,
        extensions: int,
        rng_state: dict[str, Any],
        run: int | None = None,
    ) -> None:
        """Record an announcement (first or re-announced) *before* it is published."""
        self._append(
            round_id,
            {
                "event": "announce",
                "round": round_id,
                "base_hash": base_hash,
                "selected": sorted(selected),
                "deadline": deadline,
                "extensions": extensions,
                "rng_state": rng_state,
                # Before the first checkpoint, the only durable record of the run.
                "run": run,
            },
        )

    def accept(
        self, round_id: int, client_id: str, num_samples: int, payload: bytes, site: bool = False
    ) -> None:
        """Persist an accepted update (frame, then journal line) before its receipt;
        ``site``: a site's partial aggregate (replayed as one, docs/sites.md)."""
        write_atomic(self._frames(round_id) / f"{client_id}.fmq", payload)
        record = {
            "event": "accepted",
            "round": round_id,
            "client": client_id,
            "num_samples": num_samples,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        if site:
            record["site"] = True
        self._append(round_id, record)

    @staticmethod
    def sites(jr: JournaledRound) -> list[str]:
        """The contributors of ``jr`` whose journaled update is a site's partial."""
        return [str(rec["client"]) for rec in jr.accepted if rec.get("site")]

    def load(self, round_id: int) -> JournaledRound | None:
        """The journaled state of ``round_id``; None when it was never announced."""
        path = self._log(round_id)
        if not path.exists():
            return None
        found: JournaledRound | None = None
        for rec in _records(path):
            if rec.get("event") == "announce":
                if found is None:
                    found = JournaledRound(round_id, rec)
                else:
                    found.announce = rec
            elif (
                rec.get("event") == "accepted"
                and found is not None
                and all(a["client"] != rec.get("client") for a in found.accepted)
            ):
                found.accepted.append(rec)
        return found

    def frames(self, jr: JournaledRound) -> Iterator[tuple[str, bytes]]:
        """(client, frame) of every journaled update, in acceptance order, hash-checked."""
        for rec in jr.accepted:
            client = str(rec["client"])
            try:
                payload = (self._frames(jr.round) / f"{client}.fmq").read_bytes()
            except OSError as exc:
                log.error("journaled update of %s unreadable: %s", client, exc)
                continue
            if hashlib.sha256(payload).hexdigest() != rec.get("sha256"):
                log.error("journaled update of %s does not match its hash: skipped", client)
                continue
            yield client, payload

    def clear_through(self, round_id: int) -> None:
        """Delete the journal of every round ≤ ``round_id`` (they are in the checkpoint)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            m = _ROUND_FILE.fullmatch(path.name)
            if m and int(m.group(1)) <= round_id:
                path.unlink(missing_ok=True)
                shutil.rmtree(self._frames(int(m.group(1))), ignore_errors=True)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed lines; a torn last line (crash mid-append) is skipped with a log line."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: torn journal line skipped", path, n)
            continue
        if isinstance(rec, dict):
            yield rec
