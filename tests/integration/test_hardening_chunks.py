"""Chunked uploads cannot exhaust or starve the aggregator (real TLS broker, real processes).

The broker is configured by `fedmq broker init` (TLS, passwords, ACL, its size and queue
limits); the attacker is a provisioned device, ``pi-evil``, using only its own topics. Run with
``-rP`` to see the figures each test measures (docs/security.md quotes them).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import queue
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.ops import provision
from aggregator.ops.local_broker import LocalBroker, free_port
from shared.mqtt.chunking import MAGIC, split
from shared.protocol.topics import Topics, chunk_subscription, chunk_topic
from shared.runtime.data import ArrayDataset, save_npz
from tests.conftest import require_mosquitto
from tests.integration import federation as fed
from tests.integration.test_security import DEVICES, SecureBroker, _client, add_identity

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
EVIL = "pi-evil"
# The tests' own reader of update topics (and, as any device, of global/meta). Not the
# aggregator's login: the broker uses the username as client id, so a second "aggregator"
# connection would take over the running aggregator's session (and it would take it back),
# every second.
WATCHER = "watcher"
CHECK = f"{T.root}/check"  # the watcher's marker topic: it is routed after what came before
WATCHER_RULES = (
    "topic read fl/v1/+/round/+/update/+",
    "topic read fl/v1/+/round/+/update/+/chunk/+",
    "topic readwrite fl/v1/+/check",
)
MIB = 1024 * 1024
FLOOD_CHUNKS = 600  # finding 1: 600 MiB of fake chunks
RETAINED_CHUNKS = 100  # under the broker's 128 MiB queue cap: all delivered at subscription
# Finding 4: before the fix, 32 open transfers (of all senders together) filled the aggregator
# and every further chunk was refused, "32 transfers already open".
OLD_SLOTS = 32
# What the aggregator's peak RSS may grow by while it reads the flood (the fix holds none of
# it; before the fix it grew by the whole flood).
RSS_ALLOWANCE_MIB = 150
# fp32 updates (≈ 3 MB after zstd) are chunked; int8 ones of this data stay under 1 MB.
CNN = ("--model", "cnn", "--input-shape", "1,28,28", "--codec", "fp32", "--no-onnx")


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[SecureBroker]:
    """The provisioned TLS broker of test_security, the attacker's device and the watcher."""
    require_mosquitto()
    root = tmp_path / "pki"
    port = free_port()
    provision.broker_init(root, port=port, bind="127.0.0.1", federation=fed.FEDERATION)
    for name in (*DEVICES, EVIL):
        provision.device_add(root, name)
    add_identity(root, WATCHER, *WATCHER_RULES)
    broker = LocalBroker(tmp_path / "run", port=port, template=root / "mosquitto.conf")
    broker.start()
    try:
        yield SecureBroker(root, broker)
    finally:
        broker.stop()


def _fake_chunk(index: int, body: bytes, body_sha: str) -> bytes:
    """Finding 1's chunk: index ``index`` of 100,000 of a 1 MiB payload, at offset 0."""
    head = {"id": "flood", "i": index, "n": 100_000, "off": 0, "total": MIB, "sha": "0" * 64}
    raw = json.dumps({**head, "csha": body_sha}).encode()
    return MAGIC + struct.pack("<H", len(raw)) + raw + body


def _flood(client: mqtt.Client, topic: str, count: int, *, retain: bool = False) -> None:
    """Publish ``count`` fake 1 MiB chunks on ``topic``'s chunk topics (QoS 1, acknowledged)."""
    body = os.urandom(MIB)
    sha = hashlib.sha256(body).hexdigest()
    pending: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
    for i in range(count):
        message = _fake_chunk(i, body, sha)
        pending.append(client.publish(chunk_topic(topic, i), message, qos=1, retain=retain))
        if len(pending) > 16:  # paho would otherwise buffer the whole flood in memory
            pending.popleft().wait_for_publish(60)
    for info in pending:
        info.wait_for_publish(60)


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` (VmRSS now, VmHWM the peak so far), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _start_aggregator(
    sb: SecureBroker, workdir: Path, *extra: str, rounds: int, clients: int
) -> Popen[bytes]:
    """The aggregator with its provisioned config, waiting for ``clients`` agents."""
    agg_toml = sb.root / "identities" / "aggregator" / "aggregator.toml"
    return fed.start_aggregator(
        sb.url, workdir, "--config", str(agg_toml), *extra, rounds=rounds, min_clients=clients
    )


def _start_agents(sb: SecureBroker, workdir: Path, data: list[Path]) -> list[Popen[bytes]]:
    """One agent per data file (pi-0, pi-1, …), each with its provisioned config."""
    return [
        fed.start_agent(
            sb.url, name, path, workdir, "--config", str(sb.root / "devices" / name / "agent.toml")
        )
        for name, path in zip(DEVICES, data, strict=False)
    ]


def _answered(client: mqtt.Client, receipts: fed.Inbox) -> None:
    """Publish junk on pi-evil's update topic until a receipt for it comes back.

    The broker drops what is over the aggregator's queue cap (after a flood, the junk too), so
    it is re-sent like an agent's outbox would. A receipt means the aggregator has read
    everything published before it.
    """
    for _ in range(24):
        client.publish(T.update(1, EVIL), b"not a frame", qos=1).wait_for_publish(10)
        with contextlib.suppress(queue.Empty):
            receipts.get(timeout=5)
            return
    raise AssertionError("no receipt from the aggregator within 2 minutes")


def _finish(agg: Popen[bytes], agents: list[Popen[bytes]], workdir: Path, n: int) -> list[int]:
    """Exit codes of the aggregator and its agents once the federation is over."""
    code = fed.wait_exit(agg, 300, workdir / "aggregator.log")
    return [code, *fed.wait_agents(agents, list(DEVICES[:n]), workdir)]


def _evil_counts(workdir: Path, kind: str) -> list[int]:
    """The counts of ``kind`` on the aggregator's aggregated report lines about pi-evil."""
    log = (workdir / "aggregator.log").read_text(errors="replace")
    return [int(n) for n in re.findall(rf"{EVIL}: (?:\d+ [a-z-]+, )*(\d+) {kind}", log)]


def _evil_reported(workdir: Path) -> int:
    """Everything the aggregator reported about pi-evil's chunks, whatever their fate."""
    log = (workdir / "aggregator.log").read_text(errors="replace")
    counts = re.findall(rf"{EVIL}: ([^(]*)\(last:", log)
    return sum(int(n) for line in counts for n in re.findall(r"(\d+) [a-z-]+", line))


def test_fake_chunk_flood_leaves_aggregator_memory_bounded_and_rounds_complete(
    hardened: SecureBroker, tmp_path: Path
) -> None:
    watch = _client(hardened, WATCHER, WATCHER)
    ready = fed.collect(watch, T.global_meta)
    evil = _client(hardened, EVIL, EVIL)
    receipts = fed.collect(evil, T.receipt_any_round(EVIL))
    data = fed.write_client_data(tmp_path / "data", 3)
    agg, agents = _start_aggregator(hardened, tmp_path, rounds=3, clients=3), []
    try:
        fed.next_on(ready, T.global_meta, 120)  # up, its model published, waiting for agents
        before = _rss_mib(agg.pid)
        _flood(evil, T.update(1, EVIL), FLOOD_CHUNKS)
        _answered(evil, receipts)
        peak = _rss_mib(agg.pid, "VmHWM")
        agents = _start_agents(hardened, tmp_path, data)
        codes = _finish(agg, agents, tmp_path, 3)
    finally:
        fed.stop([agg, *agents])

    rounds = fed.metrics(tmp_path)
    times = [round(r["round_time_s"], 1) for r in rounds]
    refused = _evil_counts(tmp_path, "malformed")
    print(f"aggregator RSS {before:.0f} MiB before {FLOOD_CHUNKS} MiB of fake chunks, peak after")
    print(f"{peak:.0f} MiB; {sum(refused)} chunks reached it, all refused, reported in")
    print(f"{len(refused)} log lines; round times {times} s")
    assert peak - before < RSS_ALLOWANCE_MIB
    assert codes == [0, 0, 0, 0]
    assert [r["participants"] for r in rounds] == [list(DEVICES)] * 3
    # Every fake chunk that reached the aggregator (the broker drops what is over the
    # aggregator's queue cap) was refused, reported in a few lines rather than one per chunk.
    assert 0 < sum(refused) <= FLOOD_CHUNKS and len(refused) <= 10


def _retained_updates(watch: mqtt.Client) -> list[str]:
    """Update topics (and their chunks) on which the broker holds a retained message.

    ``watch`` is the watcher's one connection: each subscription is handed the retained
    messages again, ahead of the marker published after it.
    """
    inbox = fed.collect(watch, T.update_any, str(chunk_subscription(T.update_any)), CHECK)
    watch.publish(CHECK, b"end", qos=1).wait_for_publish(10)
    got = fed.until(inbox, fed.on(CHECK), fed.BROKER_WAIT, "the marker")
    return [m.topic for m in got if m.retain and m.topic != CHECK]


def test_retained_update_chunks_are_cleared_from_the_broker(
    hardened: SecureBroker, tmp_path: Path
) -> None:
    evil = _client(hardened, EVIL, EVIL)
    receipts = fed.collect(evil, T.receipt_any_round(EVIL))
    _flood(evil, T.update(1, EVIL), RETAINED_CHUNKS, retain=True)  # parked before any aggregator
    watch = _client(hardened, WATCHER, WATCHER)
    parked = len(_retained_updates(watch))
    ready = fed.collect(watch, T.global_meta)
    data = fed.write_client_data(tmp_path / "data", 3)
    agg, agents = _start_aggregator(hardened, tmp_path, rounds=2, clients=3), []
    try:
        fed.next_on(ready, T.global_meta, 120)
        _flood(evil, T.update(2, EVIL), RETAINED_CHUNKS, retain=True)  # and while it runs
        _answered(evil, receipts)
        left = _retained_updates(watch)
        agents = _start_agents(hardened, tmp_path, data)
        codes = _finish(agg, agents, tmp_path, 3)
    finally:
        fed.stop([agg, *agents])

    print(f"retained update chunks on the broker: {parked} before the aggregator started,")
    print(f"{len(left)} once it had run (another {RETAINED_CHUNKS} published meanwhile)")
    assert parked == RETAINED_CHUNKS
    assert left == []
    assert codes == [0, 0, 0, 0]
    assert [r["participants"] for r in fed.metrics(tmp_path)] == [list(DEVICES)] * 2
    assert sum(_evil_counts(tmp_path, "retained")) == 2 * RETAINED_CHUNKS


def _cnn_data(directory: Path, clients: int) -> list[Path]:
    """28×28 images for the FedAvg CNN (1.66 M parameters)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for name in [f"client-{i}.npz" for i in range(clients)] + ["eval.npz"]:
        x = rng.integers(0, 255, size=(60, 1, 28, 28), dtype=np.uint8)
        save_npz(directory / name, ArrayDataset(x=x, y=rng.integers(0, 4, size=60)))
        paths.append(directory / name)
    return paths[:clients]


def _open_transfers(
    client: mqtt.Client, stop: threading.Event, opened: list[int], first: threading.Event
) -> None:
    """Finding 4's attacker: 32 new transfers that never finish, again every 0.5 s."""
    topic = chunk_topic(T.update(1, EVIL), 0)
    while True:
        for _ in range(OLD_SLOTS):
            client.publish(topic, split(os.urandom(4096), 2048)[0], qos=1)
            opened[0] += 1
        first.set()
        if stop.wait(0.5):
            return


def test_device_opening_transfers_does_not_starve_chunked_cnn_updates(
    hardened: SecureBroker, tmp_path: Path
) -> None:
    watch = _client(hardened, WATCHER, WATCHER)
    ready = fed.collect(watch, T.global_meta)
    evil = _client(hardened, EVIL, EVIL)
    receipts = fed.collect(evil, T.receipt_any_round(EVIL))
    stop, first, opened = threading.Event(), threading.Event(), [0]
    attack = threading.Thread(target=_open_transfers, args=(evil, stop, opened, first), daemon=True)
    data = _cnn_data(tmp_path / "data", 2)
    short = ("--round-timeout", "40", "--max-extensions", "1")
    agg = _start_aggregator(hardened, tmp_path, *CNN, *short, rounds=2, clients=2)
    agents: list[Popen[bytes]] = []
    try:
        fed.next_on(ready, T.global_meta, 120)  # subscribed: every transfer from now on reaches it
        attack.start()
        assert first.wait(fed.BROKER_WAIT), "the attacker's first transfers were not sent"
        _answered(evil, receipts)  # the aggregator has read them, before any honest chunk
        early = opened[0]  # at most this many reached it before the agents started
        agents = _start_agents(hardened, tmp_path, data)
        codes = _finish(agg, agents, tmp_path, 2)
    finally:
        stop.set()
        if attack.ident is not None:
            attack.join(10)
        fed.stop([agg, *agents])

    rounds = fed.metrics(tmp_path) if (tmp_path / "metrics.json").exists() else []
    times = [round(r["round_time_s"], 1) for r in rounds]
    # Each of the attacker's transfers is one chunk, which the aggregator reports as refused
    # or dropped (all but its last, still open when it stops): a lower bound of what reached it.
    reached = _evil_reported(tmp_path)
    during = reached - early  # at least this many reached it while the agents ran
    superseded = sum(_evil_counts(tmp_path, "superseded"))
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace") for n in DEVICES[:2]}
    resent = [n for n, text in logs.items() if "re-sending the unacknowledged" in text]
    print(f"{EVIL} opened {opened[0]} transfers; {OLD_SLOTS} to {early} reached the aggregator")
    print(f"before the agents started, at least {during} while they ran; {superseded} superseded")
    print(f"exit codes {codes}; round times {times} s; updates re-sent by {resent}")
    # The attack was in place before the first honest chunk (before the fix, these alone held
    # every transfer slot for 120 s) and went on throughout both rounds ...
    assert during >= OLD_SLOTS
    # ... and each round still took both agents' chunked updates, each at its first send.
    assert codes == [0, 0, 0]
    assert [r["participants"] for r in rounds] == [list(DEVICES[:2])] * 2
    assert all(r["bytes_up"] > 2 * 1_000_000 for r in rounds)  # both updates were chunked
    assert resent == []
    assert superseded == reached  # it only ever competed with itself: nothing refused as busy


def test_broker_disconnects_a_device_sending_a_packet_over_the_limit(
    hardened: SecureBroker,
) -> None:
    watch = _client(hardened, WATCHER, WATCHER)
    seen = fed.collect(watch, T.update_any)
    evil = _client(hardened, EVIL, EVIL)
    dropped = threading.Event()
    evil.on_disconnect = lambda *_a: dropped.set()

    evil.publish(T.update(1, EVIL), bytes(3_000_000), qos=1)  # 3 MB: over the 2 MB limit

    assert dropped.wait(fed.BROKER_WAIT), "the broker kept the connection"
    honest = _client(hardened, "pi-0", "pi-0")
    honest.publish(T.update(1, "pi-0"), b"marker", qos=1).wait_for_publish(10)
    got = fed.until(seen, fed.on(T.update(1, "pi-0")), fed.BROKER_WAIT, "pi-0's marker")
    assert [m.topic for m in got] == [T.update(1, "pi-0")]
