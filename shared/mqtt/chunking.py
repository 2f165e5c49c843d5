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

Every chunk of a transfer but the last has the same size ``c`` (the sender's chunk capacity,
at least :data:`MIN_CHUNK_BYTES`), so a chunk's offset is bound to its index (``off = i·c``)
and the chunks of a transfer never hold more than its declared length
(:func:`chunk_size_of` checks it). :mod:`shared.mqtt.reassembly` puts chunks back together
within per-sender and global bounds. Pure: no MQTT, no clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

from shared.protocol.topics import chunk_topic

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


class ChunkPlanner:
    """The messages that carry a payload: itself, or its chunks, plus retained clean-up.

    Remembers, per topic, how many retained chunks it last published there, so that a smaller
    retained payload clears the chunks it no longer uses.
    """

    def __init__(self) -> None:
        self._retained_chunks: dict[str, int] = {}

    def plan(
        self, topic: str, payload: bytes, retain: bool, capacity: int
    ) -> list[tuple[str, bytes]]:
        previous = self._retained_chunks.get(topic, 0) if retain else 0
        if len(payload) <= capacity:
            if retain:
                self._retained_chunks.pop(topic, None)
            # A retained whole message replaces retained chunks: clear them.
            return [(topic, payload)] + [(chunk_topic(topic, i), b"") for i in range(previous)]
        chunks = split(payload, capacity)
        plan = [(chunk_topic(topic, i), c) for i, c in enumerate(chunks)]
        if retain:
            self._retained_chunks[topic] = len(chunks)
            plan += [(chunk_topic(topic, i), b"") for i in range(len(chunks), previous)]
            plan.append((topic, b""))  # no stale unchunked copy next to the chunks
        return plan


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
    chunk_size_of(head, len(body))  # before hashing: a misshapen chunk costs no SHA-256
    if hashlib.sha256(body).hexdigest() != head.chunk_sha256:
        raise ChunkError(f"chunk {head.index} of transfer {head.transfer_id}: hash mismatch")
    return head, body


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def chunk_size_of(head: ChunkHeader, body_len: int) -> int:
    """The transfer's chunk size ``c`` implied by one chunk; ChunkError when inconsistent.

    Chunk ``i`` of ``n`` starts at ``i·c``; every chunk but the last holds exactly ``c``
    bytes, the last one the rest (1…c bytes), and ``n`` is the fewest chunks of ``c`` bytes
    that hold ``total``. So no two chunks overlap and their bodies add up to ``total``:
    a transfer can never hold more than the length it declared.
    """
    n, i, off, total = head.count, head.index, head.offset, head.total
    where = f"chunk {i} of {n} (offset {off}, {body_len} bytes, total {total})"
    if n == 1:
        if off != 0 or body_len != total:
            raise ChunkError(f"{where}: a single chunk must hold the whole payload")
        return total
    if i < n - 1:
        size = body_len
    elif off % (n - 1) == 0:
        size = off // (n - 1)
    else:
        raise ChunkError(f"{where}: the last offset is not a multiple of {n - 1}")
    if size < MIN_CHUNK_BYTES:
        raise ChunkError(f"{where}: chunks under {MIN_CHUNK_BYTES} bytes are refused")
    if off != i * size:
        raise ChunkError(f"{where}: offset is not {i} × the chunk size {size}")
    if not (n - 1) * size < total <= n * size:
        raise ChunkError(f"{where}: {n} chunks of {size} bytes cannot hold {total} bytes")
    if i == n - 1 and off + body_len != total:
        raise ChunkError(f"{where}: the last chunk must end at the declared length")
    return size
