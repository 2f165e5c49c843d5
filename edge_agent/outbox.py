"""The agent's durable outbox: an update survives a crash until the aggregator's receipt.

paho keeps unacknowledged QoS 1 publishes only in memory, and a broker PUBACK says nothing
about the aggregator having counted the update. So an encoded update is written to disk
(temporary file, fsync, rename, directory fsync) *before* it is published and deleted only
when a final receipt arrives (:func:`receipt_is_final`). After a reconnect or a restart the
agent re-sends it; duplicates are harmless because the aggregator counts at most one update
per (round, client) and answers ``duplicate`` to the rest. What each receipt code
(:mod:`shared.protocol.receipts`) means for the stored update is decided here, once.

One file per round, ``outbox/update-<round>.fmq``, holding the exact frame that was sent:
re-sending never re-trains, and an outbox entry for the open round is the proof that this
round was already trained.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from shared.files import is_temporary, write_atomic
from shared.protocol.frames import FrameError, read_header
from shared.protocol.receipts import ReceiptCode

log = logging.getLogger("fedmq.agent.outbox")

_NAME = re.compile(r"update-(\d{1,9})\.fmq")
# Refusals that say "not now" rather than "never": the update must stay and be re-sent
# (an aggregator restarting has no round open yet; a re-announced round comes later; a
# rate-limited update was not read, and the re-send timer paces the next try).
RETRYABLE_CODES: frozenset[ReceiptCode] = frozenset(
    {"no-round", "wrong-round", "rate-limited", "busy"}
)
# The aggregator summed the update ("duplicate": it summed an earlier copy of it).
COUNTED_CODES: frozenset[ReceiptCode] = frozenset({"accepted", "duplicate"})
# Final refusals that say the update came too late, not that it was wrong: its mass is still
# owed to error feedback (an invalid or over-large update is not given back, it would only be
# refused again). "no-round" is not among them: it is not final, the update is re-sent.
MISSED_CODES: frozenset[ReceiptCode] = frozenset({"late", "stale-base", "stale"})


def receipt_is_final(code: ReceiptCode) -> bool:
    """True when re-sending the same bytes cannot change the aggregator's answer."""
    return code not in RETRYABLE_CODES


class Outbox:
    """Unacknowledged updates of one agent, one file per round."""

    def __init__(self, state_dir: Path, federation: str, client_id: str) -> None:
        self.dir = Path(state_dir) / "outbox"
        self.federation = federation
        self.client_id = client_id

    def _path(self, round_id: int) -> Path:
        return self.dir / f"update-{round_id}.fmq"

    def put(self, round_id: int, payload: bytes) -> None:
        """Store ``payload`` durably: a crash leaves the old state or the new file, never half."""
        write_atomic(self._path(round_id), payload)

    def get(self, round_id: int) -> bytes | None:
        """The stored update for ``round_id``, or None."""
        try:
            return self._path(round_id).read_bytes()
        except FileNotFoundError:
            return None

    def base_hash(self, round_id: int) -> str | None:
        """The base-model hash the stored update of ``round_id`` was trained on."""
        payload = self.get(round_id)
        if payload is None:
            return None
        try:
            return read_header(payload).base_hash
        except FrameError:
            return None

    def remove(self, round_id: int) -> None:
        """Forget the update of ``round_id`` (its receipt was final, or the round is over)."""
        self._path(round_id).unlink(missing_ok=True)

    def rounds(self) -> list[int]:
        """Rounds with a stored update that belongs to this federation and client, sorted.

        Files that are unreadable or someone else's are deleted with a log line.
        """
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            m = _NAME.fullmatch(path.name)
            if m is None:
                if is_temporary(path.name):
                    path.unlink(missing_ok=True)  # a temp file of a crashed write
                continue
            problem = self._problem(path, int(m.group(1)))
            if problem:
                log.warning("outbox entry %s discarded: %s", path, problem)
                path.unlink(missing_ok=True)
            else:
                found.append(int(m.group(1)))
        return sorted(found)

    def _problem(self, path: Path, round_id: int) -> str:
        try:
            head = read_header(path.read_bytes())
        except (OSError, FrameError) as exc:
            return f"unreadable ({exc})"
        if head.federation != self.federation or head.client_id != self.client_id:
            return f"belongs to {head.federation}/{head.client_id}"
        if head.round != round_id or head.kind != "update":
            return "file name and frame disagree"
        return ""

    def drop_before(self, round_id: int) -> list[int]:
        """Delete updates of rounds before ``round_id`` (they would only be late)."""
        old = [r for r in self.rounds() if r < round_id]
        for r in old:
            self.remove(r)
        return old
