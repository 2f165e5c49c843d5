"""Splitting payloads larger than the broker's packet limit into chunks, and reassembling them.

Mosquitto 2.1 refuses packets over 2,000,000 bytes by default and the FedAvg CNN alone is
6.65 MB in fp32, so a payload over the chunk limit travels as several *chunk messages* on
``<topic>/chunk/<i>`` (see :func:`shared.protocol.topics.chunk_topic`). Each chunk message is
self-describing::

    b"FMC\\x01" | u16 header length | header (UTF-8 JSON) | chunk bytes

    header = {"id": transfer id, "i": index, "n": count, "off": offset, "total": length,
              "sha": sha256 of the whole payload, "csha": sha256 of this chunk}

so chunks are reassembled in any order, duplicates are ignored, a corrupt chunk is refused
(its own hash) and a reassembled payload is checked against the whole hash. Chunks of
different transfers never mix (the transfer id), which is what keeps *retained* chunked
models consistent: a late joiner that sees a stale chunk of an older model next to fresh
ones simply never completes the stale transfer, which times out.

:class:`Reassembler` bounds memory: at most ``max_transfers`` incomplete transfers and
``max_bytes`` declared bytes at once; an incomplete transfer is dropped after ``timeout_s``.
Pure: no MQTT; the clock is injected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAGIC = b"FMC\x01"
_HEAD_LEN = struct.Struct("<H")
MAX_HEADER_BYTES = 1024
# Room left in every MQTT packet for the fixed header, topic, properties and our header.
PACKET_OVERHEAD = 2048
MIN_CHUNK_BYTES = 1024
DEFAULT_MAX_CHUNK_BYTES = 1_000_000  # half of Mosquitto 2.1's default max_packet_size
MAX_CHUNKS = 100_000


class ChunkError(ValueError):
    """A chunk message is malformed, corrupt, or does not fit its transfer."""


@dataclass(frozen=True)
class ChunkHeader:
    """What one chunk message says about itself and its transfer."""

    transfer_id: str
    index: int
    count: int
    offset: int
    total: int
    sha256: str  # of the whole payload
    chunk_sha256: str


def chunk_capacity(max_chunk_bytes: int, broker_max_packet: int | None) -> int:
    """Largest chunk body that fits both our limit and the broker's advertised packet limit."""
    limit = max_chunk_bytes
    if broker_max_packet:
        limit = min(limit, broker_max_packet - PACKET_OVERHEAD)
    return max(MIN_CHUNK_BYTES, limit)


def needs_chunking(payload: bytes, capacity: int) -> bool:
    """True when ``payload`` does not fit in a single message of ``capacity`` bytes."""
    return len(payload) > capacity


def split(payload: bytes, capacity: int, transfer_id: str | None = None) -> list[bytes]:
    """Cut ``payload`` into chunk messages whose bodies hold at most ``capacity`` bytes."""
    if capacity < 1:
        raise ChunkError(f"chunk capacity must be positive, got {capacity}")
    tid = transfer_id or os.urandom(8).hex()
    whole = hashlib.sha256(payload).hexdigest()
    count = max(1, -(-len(payload) // capacity))
    if count > MAX_CHUNKS:
        raise ChunkError(f"{len(payload)} bytes would need {count} chunks (max {MAX_CHUNKS})")
    out = []
    for i in range(count):
        body = payload[i * capacity : (i + 1) * capacity]
        head = {
            "id": tid,
            "i": i,
            "n": count,
            "off": i * capacity,
            "total": len(payload),
            "sha": whole,
            "csha": hashlib.sha256(body).hexdigest(),
        }
        head_bytes = json.dumps(head, separators=(",", ":")).encode()
        out.append(MAGIC + _HEAD_LEN.pack(len(head_bytes)) + head_bytes + body)
    return out


def parse_chunk(message: bytes) -> tuple[ChunkHeader, bytes]:
    """Split a chunk message into its validated header and body; raise ChunkError."""
    if len(message) < len(MAGIC) + _HEAD_LEN.size or not message.startswith(MAGIC):
        raise ChunkError("not a chunk message (bad magic)")
    (head_len,) = _HEAD_LEN.unpack_from(message, len(MAGIC))
    start = len(MAGIC) + _HEAD_LEN.size
    if head_len > MAX_HEADER_BYTES or start + head_len > len(message):
        raise ChunkError(f"chunk header length {head_len} is invalid")
    try:
        raw = json.loads(message[start : start + head_len])
        head = ChunkHeader(
            transfer_id=str(raw["id"]),
            index=_int(raw["i"]),
            count=_int(raw["n"]),
            offset=_int(raw["off"]),
            total=_int(raw["total"]),
            sha256=str(raw["sha"]),
            chunk_sha256=str(raw["csha"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ChunkError(f"chunk header unreadable: {exc}") from exc
    body = message[start + head_len :]
    if not (0 <= head.index < head.count <= MAX_CHUNKS and len(head.transfer_id) <= 64):
        raise ChunkError(f"chunk index {head.index} of {head.count} is out of range")
    if head.offset + len(body) > head.total:
        raise ChunkError(f"chunk {head.index} overruns the declared length {head.total}")
    if hashlib.sha256(body).hexdigest() != head.chunk_sha256:
        raise ChunkError(f"chunk {head.index} of transfer {head.transfer_id}: hash mismatch")
    return head, body


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


@dataclass
class _Transfer:
    head: ChunkHeader
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass
class ReassemblyStats:
    """Counters for logs and tests."""

    completed: int = 0
    duplicates: int = 0
    corrupt: int = 0
    refused: int = 0  # over the transfer/byte caps or the size limit
    expired: int = 0


class Reassembler:
    """Collects chunk messages per (topic, transfer) and returns whole payloads."""

    def __init__(
        self,
        *,
        max_transfers: int = 32,
        max_bytes: int = 512 * 1024 * 1024,
        max_payload: int = 256 * 1024 * 1024,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self.timeout_s = timeout_s
        self.clock = clock
        self._open: dict[tuple[str, str], _Transfer] = {}
        self.stats = ReassemblyStats()

    @property
    def reserved_bytes(self) -> int:
        """Declared size of every incomplete transfer (the memory bound is enforced on it)."""
        return sum(t.head.total for t in self._open.values())

    @property
    def open_transfers(self) -> int:
        """How many transfers are incomplete."""
        return len(self._open)

    def offer(self, topic: str, message: bytes) -> bytes | None:
        """Add one chunk of a payload for ``topic``; the whole payload once it is complete.

        Raises ChunkError for a corrupt chunk, one that contradicts its transfer, a
        transfer over the caps, or a reassembled payload whose hash is wrong.
        """
        self.expire()
        try:
            head, body = parse_chunk(message)
        except ChunkError:
            self.stats.corrupt += 1
            raise
        key = (topic, head.transfer_id)
        transfer = self._open.get(key) or self._admit(key, head)
        if _identity(transfer.head) != _identity(head):
            self.stats.corrupt += 1
            raise ChunkError(f"chunk {head.index} contradicts transfer {head.transfer_id}")
        if head.index in transfer.parts:
            self.stats.duplicates += 1
            return None
        transfer.parts[head.index] = body
        if len(transfer.parts) < head.count:
            return None
        del self._open[key]
        payload = b"".join(transfer.parts[i] for i in range(head.count))
        if len(payload) != head.total or hashlib.sha256(payload).hexdigest() != head.sha256:
            self.stats.corrupt += 1
            raise ChunkError(f"transfer {head.transfer_id} on {topic}: whole-payload mismatch")
        self.stats.completed += 1
        return payload

    def _admit(self, key: tuple[str, str], head: ChunkHeader) -> _Transfer:
        problem = ""
        if head.total > self.max_payload:
            problem = f"{head.total} bytes exceed the payload limit {self.max_payload}"
        elif len(self._open) >= self.max_transfers:
            problem = f"{len(self._open)} transfers already open (cap {self.max_transfers})"
        elif self.reserved_bytes + head.total > self.max_bytes:
            problem = f"would reserve more than {self.max_bytes} bytes"
        if problem:
            self.stats.refused += 1
            raise ChunkError(f"transfer {head.transfer_id} on {key[0]} refused: {problem}")
        transfer = _Transfer(head, self.clock())
        self._open[key] = transfer
        return transfer

    def expire(self) -> list[tuple[str, str]]:
        """Drop incomplete transfers older than the timeout; return their (topic, id) keys."""
        now = self.clock()
        stale = [k for k, t in self._open.items() if now - t.started > self.timeout_s]
        for key in stale:
            t = self._open.pop(key)
            self.stats.expired += 1
            log.warning(
                "incomplete transfer %s on %s dropped after %.0fs (%d/%d chunks)",
                key[1],
                key[0],
                self.timeout_s,
                len(t.parts),
                t.head.count,
            )
        return stale


def _identity(head: ChunkHeader) -> tuple[int, int, str]:
    return head.count, head.total, head.sha256
