"""Chunking of payloads over the broker's packet limit: split, reassemble, refuse, expire."""

from __future__ import annotations

import os
import random

import pytest

from shared.mqtt.chunking import (
    MAGIC,
    PACKET_OVERHEAD,
    ChunkError,
    Reassembler,
    chunk_capacity,
    parse_chunk,
    split,
)
from shared.protocol.topics import chunk_subscription, chunk_topic, split_chunk_topic

TOPIC = "fl/v1/f/global/model"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_chunks_reassemble_in_any_order() -> None:
    payload = os.urandom(10_000)
    chunks = split(payload, 1_000)
    random.Random(3).shuffle(chunks)
    r = Reassembler()

    results = [r.offer(TOPIC, c) for c in chunks]

    assert len(chunks) == 10
    assert results[:-1] == [None] * 9
    assert results[-1] == payload
    assert r.open_transfers == 0 and r.stats.completed == 1


def test_duplicate_chunks_are_ignored() -> None:
    payload = os.urandom(3_000)
    chunks = split(payload, 1_000)
    r = Reassembler()

    assert r.offer(TOPIC, chunks[0]) is None
    assert r.offer(TOPIC, chunks[0]) is None
    assert r.offer(TOPIC, chunks[1]) is None
    assert r.offer(TOPIC, chunks[2]) == payload
    assert r.stats.duplicates == 1


def test_payload_of_exactly_one_chunk_round_trips() -> None:
    payload = b"x" * 1_000
    (only,) = split(payload, 1_000)

    assert Reassembler().offer(TOPIC, only) == payload


def test_corrupt_chunk_is_refused_by_its_hash() -> None:
    chunks = split(os.urandom(2_000), 1_000)
    bad = bytearray(chunks[1])
    bad[-1] ^= 0xFF
    r = Reassembler()

    with pytest.raises(ChunkError, match="hash mismatch"):
        r.offer(TOPIC, bytes(bad))
    assert r.stats.corrupt == 1


def test_not_a_chunk_is_refused() -> None:
    with pytest.raises(ChunkError, match="magic"):
        parse_chunk(b"FMQ\x01 a frame")


def test_missing_chunk_times_out_and_is_cleaned_up() -> None:
    clock = FakeClock()
    chunks = split(os.urandom(3_000), 1_000)
    r = Reassembler(timeout_s=10, clock=clock)
    r.offer(TOPIC, chunks[0])
    r.offer(TOPIC, chunks[1])

    clock.now = 11
    expired = r.expire()

    assert len(expired) == 1 and r.open_transfers == 0 and r.reserved_bytes == 0
    assert r.offer(TOPIC, chunks[2]) is None  # a fresh, incomplete transfer now


def test_concurrent_transfer_cap_refuses_new_transfers() -> None:
    r = Reassembler(max_transfers=2)
    for _ in range(2):
        r.offer(TOPIC, split(os.urandom(2_000), 1_000)[0])

    with pytest.raises(ChunkError, match="transfers already open"):
        r.offer(TOPIC, split(os.urandom(2_000), 1_000)[0])
    assert r.stats.refused == 1


def test_byte_cap_bounds_reserved_memory() -> None:
    r = Reassembler(max_bytes=5_000)
    r.offer(TOPIC, split(os.urandom(4_000), 1_000)[0])

    with pytest.raises(ChunkError, match="reserve more than"):
        r.offer(TOPIC, split(os.urandom(2_000), 1_000)[0])
    assert r.reserved_bytes == 4_000


def test_payload_over_the_size_limit_is_refused_at_its_first_chunk() -> None:
    r = Reassembler(max_payload=1_500)

    with pytest.raises(ChunkError, match="payload limit"):
        r.offer(TOPIC, split(os.urandom(2_000), 1_000)[0])


def test_transfers_of_different_payloads_do_not_mix() -> None:
    old, new = os.urandom(3_000), os.urandom(3_000)
    old_chunks, new_chunks = split(old, 1_000), split(new, 1_000)
    r = Reassembler()

    # A late joiner sees a stale retained chunk next to fresh ones: only the fresh completes.
    assert r.offer(TOPIC, old_chunks[2]) is None
    assert r.offer(TOPIC, new_chunks[0]) is None
    assert r.offer(TOPIC, new_chunks[1]) is None
    assert r.offer(TOPIC, new_chunks[2]) == new
    assert r.open_transfers == 1  # the stale one waits for its timeout


def test_chunk_contradicting_its_transfer_is_refused() -> None:
    a = split(os.urandom(3_000), 1_000, transfer_id="same")
    b = split(os.urandom(4_000), 1_000, transfer_id="same")
    r = Reassembler()
    r.offer(TOPIC, a[0])

    with pytest.raises(ChunkError, match="contradicts"):
        r.offer(TOPIC, b[1])


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
