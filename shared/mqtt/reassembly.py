"""Putting chunked payloads back together within per-sender and global bounds.

A chunk message names its transfer (:mod:`shared.mqtt.chunking`); the topic it came on names
its *sender*, through a key function the transport supplies (fedmq's is the client-id level of
an update topic, which the broker's ACL lets a device publish only under its own id), so this
module knows nothing of fedmq's topic layout. Every bound counts chunk bytes actually held,
never the lengths chunks declare:

- per transfer: a declared length of at most ``max_payload``, and chunks bound to their
  offsets (:func:`~shared.mqtt.chunking.chunk_size_of`): a transfer never holds more;
- per sender: at most ``sender_transfers`` open transfers and ``sender_bytes`` held. A new
  transfer beyond them supersedes the sender's oldest one: an honest sender publishes one
  payload after the other, so a new one means the old one was abandoned (a re-send after a
  lost chunk, say). A sender therefore only ever competes with itself;
- all senders together: at most ``max_transfers`` open and ``max_bytes`` held (the backstop
  when many senders misbehave at once); what would pass them is refused;
- time: an incomplete transfer is dropped ``timeout_s`` after its first chunk, by
  :meth:`Reassembler.expire`, which the transport also runs periodically, so memory is given
  back even when no further chunk arrives.

Every refusal and drop is counted per sender in a bounded :class:`RefusalTally`, which the
transport reports as one log line per sender per interval rather than one per chunk.
Pure: no MQTT, no threads, no logging; the clock is injected.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.mqtt.chunking import ChunkError, ChunkHeader, chunk_size_of, parse_chunk

MIB = 1024 * 1024
#: What can happen to a chunk or a transfer besides completing (the tally's columns).
DROP_KINDS = ("malformed", "too-large", "busy", "superseded", "expired", "retained")

_Key = tuple[str, str]  # (topic, transfer id)


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds on payloads being reassembled (bytes are chunk bytes actually held)."""

    max_payload: int = 256 * MIB  # declared length of one payload
    # Two, so a receiver of retained chunked models that sees a stale chunk of the previous
    # model before the fresh ones still completes the fresh one.
    sender_transfers: int = 2
    sender_bytes: int = 256 * MIB
    max_transfers: int = 1024  # every sender together
    max_bytes: int = 512 * MIB  # every sender together
    timeout_s: float = 120.0  # after a transfer's first chunk

    def __post_init__(self) -> None:
        for name in ("max_payload", "sender_transfers", "sender_bytes", "max_transfers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("max_bytes and timeout_s must be positive")

    @classmethod
    def one_update_per_sender(cls, max_update_bytes: int) -> ReassemblyLimits:
        """An aggregator's intake: each sender holds one transfer of at most one update."""
        return cls(
            max_payload=max_update_bytes,
            sender_transfers=1,
            sender_bytes=max_update_bytes,
            max_bytes=max(cls.max_bytes, max_update_bytes),  # room for one update at least
        )


@dataclass(frozen=True)
class SenderReport:
    """What was refused or dropped from one sender since the last report."""

    sender: str
    counts: tuple[tuple[str, int], ...]  # (kind, count) in DROP_KINDS order, non-zero only
    last_reason: str

    def line(self) -> str:
        """One log line: ``pi-7: 812 malformed, 1 superseded (last: …)``."""
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts)
        return f"{self.sender}: {counts} (last: {self.last_reason})"


@dataclass
class _SenderCounts:
    counts: dict[str, int] = field(default_factory=dict)
    last_reason: str = ""


class RefusalTally:
    """Refusals and drops per sender until :meth:`drain`; at most ``max_senders`` entries.

    Past that, senders are counted together under :data:`OTHERS`, so a flood of distinct
    sender names cannot grow it.
    """

    OTHERS = "(other senders)"

    def __init__(self, max_senders: int = 256) -> None:
        self.max_senders = max_senders
        self._by_sender: dict[str, _SenderCounts] = {}

    def add(self, sender: str, kind: str, reason: str) -> None:
        """Count one ``kind`` (one of DROP_KINDS) for ``sender``, remembering its reason."""
        if sender not in self._by_sender and len(self._by_sender) >= self.max_senders:
            sender = self.OTHERS
        entry = self._by_sender.setdefault(sender, _SenderCounts())
        entry.counts[kind] = entry.counts.get(kind, 0) + 1
        entry.last_reason = reason

    def drain(self) -> list[SenderReport]:
        """Everything counted since the previous drain, one report per sender; then reset."""
        reports = [
            SenderReport(
                sender,
                tuple((k, entry.counts[k]) for k in DROP_KINDS if entry.counts.get(k)),
                entry.last_reason,
            )
            for sender, entry in self._by_sender.items()
        ]
        self._by_sender = {}
        return reports


@dataclass
class _Transfer:
    sender: str
    identity: tuple[int, int, str, int]  # chunk count, total length, whole hash, chunk size
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


@dataclass
class ReassemblyStats:
    """Counters for logs and tests."""

    completed: int = 0
    duplicates: int = 0
    corrupt: int = 0  # malformed chunks and payloads
    refused: int = 0  # over the size limit or the global caps
    superseded: int = 0
    expired: int = 0


def topic_is_sender(topic: str) -> str:
    """The default key function: every topic is a sender of its own."""
    return topic


class Reassembler:
    """Collects chunk messages per (topic, transfer) and returns whole payloads."""

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        *,
        sender_of: Callable[[str], str] = topic_is_sender,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self.sender_of = sender_of
        self.clock = clock
        self._open: dict[_Key, _Transfer] = {}  # in the order transfers started
        self._senders: dict[str, list[_Key]] = {}  # each sender's open transfers, oldest first
        self._sender_held: dict[str, int] = {}
        self.held_bytes = 0
        self.stats = ReassemblyStats()
        self.tally = RefusalTally()

    @property
    def open_transfers(self) -> int:
        """How many transfers are incomplete."""
        return len(self._open)

    def sender_held(self, sender: str) -> int:
        """Chunk bytes held for ``sender``'s incomplete transfers."""
        return self._sender_held.get(sender, 0)

    def offer(self, topic: str, message: bytes) -> bytes | None:
        """Add one chunk of a payload for ``topic``; the whole payload once it is complete.

        Raises ChunkError for a malformed chunk, one that contradicts its transfer, a transfer
        over the limits, or a reassembled payload whose hash is wrong; each is also counted
        in :attr:`tally` for the sender.
        """
        self.expire()
        sender = self.sender_of(topic)
        try:
            head, body = parse_chunk(message)
            size = chunk_size_of(head, len(body))
        except ChunkError as exc:
            raise self._refused(sender, "malformed", str(exc)) from None
        key = (topic, head.transfer_id)
        identity = (head.count, head.total, head.sha256, size)
        transfer = self._open.get(key) or self._admit(key, sender, head, identity)
        if transfer.identity != identity:
            why = f"chunk {head.index} contradicts transfer {head.transfer_id} on {topic}"
            raise self._refused(sender, "malformed", why)
        if head.index in transfer.parts:
            self.stats.duplicates += 1
            return None
        self._hold(key, transfer, len(body))
        transfer.parts[head.index] = body
        if len(transfer.parts) < head.count:
            return None
        self._remove(key)
        payload = b"".join(transfer.parts[i] for i in range(head.count))
        if len(payload) != head.total or hashlib.sha256(payload).hexdigest() != head.sha256:
            why = f"transfer {head.transfer_id} on {topic}: whole-payload mismatch"
            raise self._refused(sender, "malformed", why)
        self.stats.completed += 1
        return payload

    def _admit(
        self, key: _Key, sender: str, head: ChunkHeader, identity: tuple[int, int, str, int]
    ) -> _Transfer:
        limits = self.limits
        largest = min(limits.max_payload, limits.sender_bytes)
        if head.total > largest:
            why = f"transfer {head.transfer_id} on {key[0]}: {head.total} bytes exceed {largest}"
            raise self._refused(sender, "too-large", why)
        own = self._senders.get(sender, [])
        while len(own) >= limits.sender_transfers:
            self._drop(own[0], "superseded", f"superseded by transfer {head.transfer_id}")
        if len(self._open) >= limits.max_transfers:
            why = f"{len(self._open)} transfers open (cap {limits.max_transfers})"
            raise self._refused(sender, "busy", why)
        transfer = _Transfer(sender, identity, self.clock())
        self._open[key] = transfer
        self._senders.setdefault(sender, []).append(key)
        return transfer

    def _hold(self, key: _Key, transfer: _Transfer, nbytes: int) -> None:
        """Count ``nbytes`` more for ``transfer``: its sender's older transfers give way first."""
        sender, limits = transfer.sender, self.limits
        own = self._senders[sender]
        while self.sender_held(sender) + nbytes > limits.sender_bytes and own[0] != key:
            self._drop(own[0], "superseded", "its sender's newer transfer needs the room")
        why = ""
        if self.sender_held(sender) + nbytes > limits.sender_bytes:
            why = f"over the sender's {limits.sender_bytes} bytes"
        elif self.held_bytes + nbytes > limits.max_bytes:
            why = f"{self.held_bytes} bytes held by all senders (cap {limits.max_bytes})"
        if why:
            # Without this chunk the transfer can never complete: free what it holds.
            self._remove(key)
            raise self._refused(sender, "busy", f"transfer {key[1]} on {key[0]} dropped: {why}")
        transfer.held += nbytes
        self._sender_held[sender] = self.sender_held(sender) + nbytes
        self.held_bytes += nbytes

    def expire(self) -> list[_Key]:
        """Drop transfers incomplete ``timeout_s`` after their first chunk; their keys."""
        now, timeout = self.clock(), self.limits.timeout_s
        stale = []
        for key, transfer in self._open.items():  # oldest first: stop at the first fresh one
            if now - transfer.started <= timeout:
                break
            stale.append(key)
        for key in stale:
            t = self._open[key]
            why = f"incomplete after {timeout:.0f}s ({len(t.parts)}/{t.identity[0]} chunks)"
            self._drop(key, "expired", why)
        return stale

    def _refused(self, sender: str, kind: str, why: str) -> ChunkError:
        if kind == "malformed":
            self.stats.corrupt += 1
        else:
            self.stats.refused += 1
        self.tally.add(sender, kind, why)
        return ChunkError(why)

    def _drop(self, key: _Key, kind: str, why: str) -> None:
        transfer = self._remove(key)
        if kind == "expired":
            self.stats.expired += 1
        else:
            self.stats.superseded += 1
        self.tally.add(transfer.sender, kind, f"transfer {key[1]} on {key[0]} {why}")

    def _remove(self, key: _Key) -> _Transfer:
        transfer = self._open.pop(key)
        own = self._senders[transfer.sender]
        own.remove(key)
        if not own:
            del self._senders[transfer.sender]
        left = self._sender_held.pop(transfer.sender, 0) - transfer.held
        if left:
            self._sender_held[transfer.sender] = left
        self.held_bytes -= transfer.held
        return transfer
