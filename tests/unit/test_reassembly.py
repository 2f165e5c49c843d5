"""Reassembling chunked payloads: order, duplicates, per-sender quotas, byte caps, expiry."""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from shared.mqtt.chunking import MIN_CHUNK_BYTES, ChunkError, split
from shared.mqtt.reassembly import Reassembler, ReassemblyLimits, RefusalTally
from shared.protocol.topics import Topics, quota_key
from tests.unit.test_chunking import MIB, forged_chunk

CAP = MIN_CHUNK_BYTES
TOPIC = "fl/v1/f/global/model"
T = Topics("f")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunks_of(size: int, tid: str | None = None) -> list[bytes]:
    return split(os.urandom(size), CAP, transfer_id=tid)


def intake(max_update_bytes: int = 64 * CAP, **changes: int) -> Reassembler:
    """An aggregator's reassembler: fedmq's sender key, one update per sender."""
    limits = replace(ReassemblyLimits.one_update_per_sender(max_update_bytes), **changes)
    return Reassembler(limits, sender_of=quota_key)


# --- reassembly --------------------------------------------------------------------------
def test_chunks_reassemble_in_any_order() -> None:
    payload = os.urandom(10 * CAP)
    chunks = split(payload, CAP)
    random.Random(3).shuffle(chunks)
    r = Reassembler()

    results = [r.offer(TOPIC, c) for c in chunks]

    assert results[:-1] == [None] * 9 and results[-1] == payload
    assert r.open_transfers == 0 and r.held_bytes == 0 and r.stats.completed == 1


def test_duplicate_chunks_are_ignored() -> None:
    payload = os.urandom(3 * CAP)
    chunks = split(payload, CAP)
    r = Reassembler()

    assert [r.offer(TOPIC, c) for c in (chunks[0], chunks[0], chunks[1])] == [None] * 3
    assert r.offer(TOPIC, chunks[2]) == payload
    assert r.stats.duplicates == 1


def test_payload_of_exactly_one_chunk_round_trips() -> None:
    payload = b"x" * CAP
    (only,) = split(payload, CAP)

    assert Reassembler().offer(TOPIC, only) == payload


def test_transfers_of_different_payloads_do_not_mix() -> None:
    old, new = os.urandom(3 * CAP), os.urandom(3 * CAP)
    old_chunks, new_chunks = split(old, CAP), split(new, CAP)
    r = Reassembler()

    # A late joiner sees a stale retained chunk next to fresh ones: only the fresh completes.
    assert r.offer(TOPIC, old_chunks[2]) is None
    assert [r.offer(TOPIC, c) for c in new_chunks] == [None, None, new]
    assert r.open_transfers == 1  # the stale one waits for its timeout


def test_chunk_contradicting_its_transfer_is_refused() -> None:
    a = chunks_of(3 * CAP, tid="same")
    b = chunks_of(4 * CAP, tid="same")
    r = Reassembler()
    r.offer(TOPIC, a[0])

    with pytest.raises(ChunkError, match="contradicts"):
        r.offer(TOPIC, b[1])
    assert r.stats.corrupt == 1


# --- finding 1: the bytes held are bounded and counted ------------------------------------
def test_flood_of_chunks_at_offset_zero_holds_nothing() -> None:
    r = intake(max_update_bytes=64 * MIB)
    body = os.urandom(64 * CAP)

    for i in range(1, 200):
        with pytest.raises(ChunkError):
            r.offer(T.update(1, "pi-evil"), forged_chunk(body, i=i, n=100_000, off=0, total=MIB))

    assert r.held_bytes == 0 and r.open_transfers == 0 and r.stats.corrupt == 199


def test_held_bytes_are_the_bodies_of_the_chunks_held() -> None:
    chunks = split(os.urandom(4 * CAP + 10), CAP)
    r = Reassembler()

    for c in chunks[:3]:
        r.offer(TOPIC, c)

    assert r.held_bytes == 3 * CAP and r.sender_held(TOPIC) == 3 * CAP
    r.offer(TOPIC, chunks[4])
    assert r.held_bytes == 3 * CAP + 10
    r.offer(TOPIC, chunks[3])
    assert r.held_bytes == 0 and r.sender_held(TOPIC) == 0


def test_global_byte_cap_drops_the_transfer_that_would_pass_it() -> None:
    r = Reassembler(ReassemblyLimits(max_bytes=5 * CAP))
    first = chunks_of(4 * CAP)
    second = chunks_of(4 * CAP)
    for c in first[:3]:
        r.offer("a", c)
    r.offer("b", second[0])
    r.offer("b", second[1])

    with pytest.raises(ChunkError, match="held by all senders"):
        r.offer("b", second[2])
    assert r.held_bytes == 3 * CAP and r.open_transfers == 1  # b's doomed transfer is freed


def test_global_transfer_cap_refuses_new_transfers() -> None:
    r = Reassembler(ReassemblyLimits(max_transfers=2))
    r.offer("a", chunks_of(2 * CAP)[0])
    r.offer("b", chunks_of(2 * CAP)[0])

    with pytest.raises(ChunkError, match="transfers open"):
        r.offer("c", chunks_of(2 * CAP)[0])
    assert r.stats.refused == 1


def test_payload_over_one_update_is_refused_at_its_first_chunk() -> None:
    r = intake(max_update_bytes=3 * CAP)

    with pytest.raises(ChunkError, match="exceed"):
        r.offer(T.update(1, "pi-0"), chunks_of(4 * CAP)[0])
    assert r.open_transfers == 0


# --- finding 4: quotas per sender ---------------------------------------------------------
def test_a_sender_holds_one_transfer_a_new_one_supersedes_the_old() -> None:
    r = intake()

    for _ in range(50):
        r.offer(T.update(1, "pi-evil"), chunks_of(8 * CAP)[0])

    assert r.open_transfers == 1 and r.sender_held("pi-evil") == CAP
    assert r.stats.superseded == 49


def test_a_senders_transfers_on_other_topics_count_against_the_same_quota() -> None:
    r = intake()

    for round_id in range(1, 40):
        r.offer(T.update(round_id, "pi-evil"), chunks_of(8 * CAP)[0])

    assert r.open_transfers == 1


def test_one_sender_opening_transfers_does_not_starve_the_others() -> None:
    r = intake(max_transfers=32)
    honest = os.urandom(5 * CAP)
    honest_chunks = split(honest, CAP)
    results = []

    for c in honest_chunks:
        for _ in range(32):  # the attacker opens 32 transfers between honest chunks
            r.offer(T.update(1, "pi-evil"), chunks_of(2 * CAP)[0])
        results.append(r.offer(T.update(1, "pi-0"), c))

    assert results[-1] == honest
    assert r.stats.refused == 0


def test_a_senders_older_transfer_gives_way_to_its_newest_bytes() -> None:
    r = Reassembler(ReassemblyLimits(sender_transfers=2, sender_bytes=4 * CAP))
    old, new = chunks_of(4 * CAP), chunks_of(4 * CAP)
    for c in [*old[:3], new[0]]:
        r.offer(TOPIC, c)

    r.offer(TOPIC, new[1])  # 5 chunks would pass the sender's 4: the old transfer goes

    assert r.held_bytes == 2 * CAP and r.open_transfers == 1 and r.stats.superseded == 1


# --- expiry --------------------------------------------------------------------------------
def test_incomplete_transfer_expires_and_frees_its_bytes() -> None:
    clock = FakeClock()
    chunks = chunks_of(3 * CAP)
    r = Reassembler(ReassemblyLimits(timeout_s=10), clock=clock)
    r.offer(TOPIC, chunks[0])
    r.offer(TOPIC, chunks[1])

    clock.now = 11
    expired = r.expire()

    assert len(expired) == 1 and r.open_transfers == 0 and r.held_bytes == 0
    assert r.offer(TOPIC, chunks[2]) is None  # a fresh, incomplete transfer now


def test_expiry_keeps_transfers_younger_than_the_timeout() -> None:
    clock = FakeClock()
    r = Reassembler(ReassemblyLimits(timeout_s=10), clock=clock)
    r.offer("a", chunks_of(2 * CAP)[0])
    clock.now = 5
    r.offer("b", chunks_of(2 * CAP)[0])

    clock.now = 12

    assert r.expire() and r.open_transfers == 1


# --- the tally behind the aggregated log lines ----------------------------------------------
def test_refusals_are_tallied_per_sender_and_drained_once() -> None:
    r = intake()
    for i in range(1, 100):
        with pytest.raises(ChunkError):
            r.offer(T.update(1, "pi-evil"), forged_chunk(bytes(CAP), i=i, n=200, off=0, total=MIB))
    r.offer(T.update(1, "pi-0"), chunks_of(3 * CAP)[0])
    r.offer(T.update(1, "pi-0"), chunks_of(3 * CAP)[0])

    reports = {rep.sender: rep for rep in r.tally.drain()}

    assert reports["pi-evil"].counts == (("malformed", 99),)
    assert reports["pi-0"].counts == (("superseded", 1),)
    assert reports["pi-evil"].line().startswith("pi-evil: 99 malformed (last: chunk 99 of 200")
    assert r.tally.drain() == []


def test_tally_counts_senders_beyond_its_bound_together() -> None:
    tally = RefusalTally(max_senders=2)

    for name in ("a", "b", "c", "d"):
        tally.add(name, "busy", "full")

    assert [rep.sender for rep in tally.drain()] == ["a", "b", RefusalTally.OTHERS]


def test_the_quota_key_of_update_topics_is_their_client_id() -> None:
    assert quota_key(T.update(3, "pi-7")) == "pi-7"
    assert quota_key(T.agent_status("pi-7")) == "pi-7"
    assert quota_key(T.infer_request("pi-7", "app")) == "app"  # the requester
    assert quota_key(T.global_model) == T.global_model
    assert quota_key("not/a/fedmq/topic") == "not/a/fedmq/topic"


def test_one_update_per_sender_leaves_room_for_an_update_over_the_global_default() -> None:
    limits = ReassemblyLimits.one_update_per_sender(1024 * MIB)

    assert limits.max_bytes == limits.sender_bytes == limits.max_payload == 1024 * MIB


def test_limits_refuse_nonsense_values() -> None:
    with pytest.raises(ValueError, match="sender_transfers"):
        ReassemblyLimits(sender_transfers=0)
