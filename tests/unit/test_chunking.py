"""Chunk messages: splitting, parsing, and the geometry that binds offsets to indexes."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.mqtt.chunking import (
    MAGIC,
    MIN_CHUNK_BYTES,
    PACKET_OVERHEAD,
    ChunkError,
    chunk_capacity,
    parse_chunk,
    split,
)
from shared.protocol.topics import chunk_subscription, chunk_topic, split_chunk_topic

TOPIC = "fl/v1/f/global/model"
MIB = 1024 * 1024


def forged_chunk(body: bytes, *, i: int, n: int, off: int, total: int, tid: str = "t") -> bytes:
    """A chunk message with whatever header an attacker chooses (hashes consistent)."""
    head = {
        "id": tid,
        "i": i,
        "n": n,
        "off": off,
        "total": total,
        "sha": "0" * 64,
        "csha": hashlib.sha256(body).hexdigest(),
    }
    raw = json.dumps(head).encode()
    return MAGIC + struct.pack("<H", len(raw)) + raw + body


def test_corrupt_chunk_is_refused_by_its_hash() -> None:
    chunks = split(os.urandom(2 * MIN_CHUNK_BYTES), MIN_CHUNK_BYTES)
    bad = bytearray(chunks[1])
    bad[-1] ^= 0xFF

    with pytest.raises(ChunkError, match="hash mismatch"):
        parse_chunk(bytes(bad))


def test_not_a_chunk_is_refused() -> None:
    with pytest.raises(ChunkError, match="magic"):
        parse_chunk(b"FMQ\x01 a frame")


def test_chunk_at_offset_zero_with_a_later_index_is_refused() -> None:
    # Finding 1: every chunk claimed offset 0 and a fresh index, and all were stored.
    body = os.urandom(4 * MIN_CHUNK_BYTES)

    with pytest.raises(ChunkError, match="offset is not 5 × the chunk size"):
        parse_chunk(forged_chunk(body, i=5, n=8, off=0, total=8 * len(body)))


def test_chunk_count_that_cannot_hold_the_declared_length_is_refused() -> None:
    # The flood's own shape: 1 MiB chunks of a 1 MiB payload "in 100,000 chunks".
    body = bytes(MIB)

    with pytest.raises(ChunkError, match="cannot hold"):
        parse_chunk(forged_chunk(body, i=0, n=100_000, off=0, total=MIB))


def test_chunks_under_the_minimum_size_are_refused() -> None:
    body = b"x" * 10

    with pytest.raises(ChunkError, match="under 1024 bytes"):
        parse_chunk(forged_chunk(body, i=0, n=3, off=0, total=25))


def test_last_chunk_must_end_at_the_declared_length() -> None:
    body = os.urandom(100)
    cap = MIN_CHUNK_BYTES

    with pytest.raises(ChunkError, match="must end at the declared length"):
        parse_chunk(forged_chunk(body, i=2, n=3, off=2 * cap, total=2 * cap + 500))


def test_single_chunk_must_hold_the_whole_payload() -> None:
    with pytest.raises(ChunkError, match="whole payload"):
        parse_chunk(forged_chunk(b"abc", i=0, n=1, off=0, total=10))


@given(size=st.integers(1, 40_000), capacity=st.integers(MIN_CHUNK_BYTES, 9_000))
def test_every_chunk_split_makes_passes_the_geometry_check(size: int, capacity: int) -> None:
    payload = bytes(size)

    parsed = [parse_chunk(c) for c in split(payload, capacity)]

    assert b"".join(body for _, body in parsed) == payload
    assert all(h.offset == h.index * capacity for h, _ in parsed)


def test_chunk_capacity_respects_the_broker_limit() -> None:
    assert chunk_capacity(1_000_000, None) == 1_000_000
    assert chunk_capacity(1_000_000, 256 * 1024) == 256 * 1024 - PACKET_OVERHEAD
    assert all(len(c) <= 256 * 1024 for c in split(os.urandom(700_000), 256 * 1024 - 2048))


def test_chunk_messages_start_with_magic() -> None:
    assert all(c.startswith(MAGIC) for c in split(b"abc", 2))


def test_chunk_topics_round_trip() -> None:
    assert split_chunk_topic(chunk_topic(TOPIC, 12)) == (TOPIC, 12)
    assert split_chunk_topic(TOPIC) is None
    assert split_chunk_topic("fl/v1/f/chunk/x") is None
    assert chunk_subscription("fl/v1/f/round/+/update/+") == "fl/v1/f/round/+/update/+/chunk/+"
    assert chunk_subscription("fl/v1/f/#") is None
