"""Nothing lost: faults injected into a real federation (Mosquitto, aggregator, agents).

Every test asserts on outcomes — rounds applied, updates counted (metrics and the
aggregator's checkpoint history), models — never on log text (a log line at most tells a
test when to go on). No test sleeps: each waits for the message or state it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from safetensors.numpy import load_file as st_load_file

from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.netproxy import NetProxy
from shared.mqtt.transport import MqttTransport
from shared.protocol import messages as msg
from shared.protocol.frames import decode_frame, tensors_hash
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset, save_npz
from tests.conftest import require_mosquitto
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
SAMPLES = 270  # 300 per client, 10 % held out for validation


# --- helpers -----------------------------------------------------------------------------
def _agent(url: str, i: int, data: Path, tmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    """An agent with its own state dir (its outbox), so tests never share one."""
    state = str(tmp / f"state-pi-{i}")
    return fed.start_agent(url, f"pi-{i}", data, tmp, "--state-dir", state, *extra)


def _json_on(messages: list[mqtt.MQTTMessage], topic_prefix: str) -> list[dict[str, Any]]:
    """The JSON bodies of the non-empty messages under ``topic_prefix``."""
    return [
        json.loads(m.payload) for m in messages if m.topic.startswith(topic_prefix) and m.payload
    ]


def _status(topic: str, *states: str) -> Callable[[mqtt.MQTTMessage], bool]:
    """A :func:`fed.until` condition: a status message on ``topic`` in one of ``states``."""
    return lambda m: (
        m.topic == topic and bool(m.payload) and json.loads(m.payload)["state"] in states
    )


# The aggregator's last word (a clean stop's status, or its will): published after every
# receipt and decision it sent, so a watcher holding it has all of them.
_AGGREGATOR_DONE = _status(T.aggregator_status, "finished", "offline")


def _finish(agg: subprocess.Popen[bytes], agents: list[subprocess.Popen[bytes]], tmp: Path) -> int:
    try:
        return fed.wait_exit(agg, 50, tmp / "aggregator.log")
    finally:
        fed.stop([agg, *agents])


def _history(state_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((state_dir / "checkpoint.json").read_text())["history"])


def _assert_each_round_counted_once(tmp: Path, rounds: int, clients: int = 3) -> None:
    entries = fed.metrics(tmp)
    assert [r["round"] for r in entries] == list(range(1, rounds + 1))
    names = [f"pi-{i}" for i in range(clients)]
    for r in entries:
        assert r["participants"] == names
        assert r["accepted"] == clients and r["num_samples"] == clients * SAMPLES


@pytest.fixture
def data(tmp_path: Path) -> list[Path]:
    return fed.write_client_data(tmp_path / "data", 3)


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    require_mosquitto()
    b = LocalBroker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


# --- 7. large payloads ---------------------------------------------------------------------
def _cnn_data(directory: Path, clients: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(clients + 1):
        n = 60 if i < clients else 40
        x = rng.integers(0, 255, size=(n, 1, 28, 28), dtype=np.uint8)
        ds = ArrayDataset(x=x, y=rng.integers(0, 4, size=n).astype(np.int64))
        path = directory / (f"client-{i}.npz" if i < clients else "eval.npz")
        save_npz(path, ds)
        paths.append(path)
    return paths[:clients]


@pytest.mark.parametrize("max_packet", [2_000_000, 256 * 1024])
def test_cnn_fp32_model_and_updates_cross_a_packet_limited_broker(
    tmp_path: Path, max_packet: int
) -> None:
    require_mosquitto()
    clients = _cnn_data(tmp_path / "data", 2)
    cnn = ("--model", "cnn", "--input-shape", "1,28,28", "--codec", "fp32", "--no-onnx")
    with LocalBroker(tmp_path / "broker", extra_config=f"max_packet_size {max_packet}") as b:
        agg = fed.start_aggregator(b.url, tmp_path, *cnn, rounds=1, min_clients=2)
        agents = [_agent(b.url, i, p, tmp_path) for i, p in enumerate(clients)]
        assert _finish(agg, agents, tmp_path) == 0
        (entry,) = fed.metrics(tmp_path)
        # A late joiner fetches the retained chunked model and gets the applied one.
        late = MqttTransport(b.url, "late-reader", subscriptions=[(T.global_model, 1)]).start()
        try:
            item = late.inbox.get(timeout=20)
        finally:
            late.stop()
        broker_log = b.log_text()
    # fp32 deltas compress (zstd) to ~3 MB each: still over both packet limits.
    assert entry["accepted"] == 2 and entry["bytes_up"] > 2 * 2_000_000
    frame = decode_frame(item.payload)
    assert item.topic == T.global_model and len(item.payload) > 6_000_000  # zstd of 6.65 MB
    assert tensors_hash(frame.tensors) == entry["model_hash"]
    assert sum(v.size for v in frame.tensors.values()) > 1_600_000
    assert "oversize" not in broker_log.lower()


# --- 2 & 6. agent outbox: killed before its receipt; duplicates ---------------------------
# The asynchronous mode (docs/async.md) with K = 3 of three devices: every version window must
# count each device once, at staleness 0 (tests/integration/test_async_resilience.py: the rest).
ASYNC = ("--mode", "async", "--buffer", "3", "--max-staleness", "2", "--no-onnx")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_agent_killed_before_its_receipt_is_counted_once(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any, mode: str
) -> None:
    url = small_broker.url
    pi2 = T.agent_status("pi-2")
    inbox = fed.collect(mqtt_client(url), T.round_start(1), pi2, T.update(1, "pi-2"))
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    procs = list(agents)
    outbox = tmp_path / "state-pi-2" / "outbox" / "update-1.fmq"
    try:
        # pi-2 waits (paused) until the aggregator is paused in round 1: its update is then
        # certainly sent, and in its outbox, before any receipt can come.
        fed.until(inbox, _status(pi2, "online"), 60, "pi-2 online")
        fed.pause(agents[2:])
        extra = ASYNC if mode == "async" else ()
        agg = fed.start_aggregator(url, tmp_path, *extra, rounds=2, min_clients=3)
        procs.insert(0, agg)
        fed.next_on(inbox, T.round_start(1), 30)
        fed.pause([agg])
        fed.resume(agents[2:])
        fed.wait_for(outbox.exists, 20, "pi-2's update in its outbox")
        agents[2].kill()
        agents[2].wait()
        fed.until(inbox, _status(pi2, "offline"), 30, "the killed pi-2's will")
        agents[2] = procs[-1] = _agent(url, 2, data[2], tmp_path)
        fed.until(inbox, _status(pi2, "online"), 60, "the restarted pi-2 online")
        fed.until(inbox, fed.on(T.update(1, "pi-2")), 30, "pi-2's update re-sent from its outbox")
        fed.resume([agg])
        code = _finish(agg, agents, tmp_path)
    finally:
        fed.resume(procs)
        fed.stop(procs)
    assert code == 0
    _assert_each_round_counted_once(tmp_path, 2)
    if mode == "async":
        assert all(
            r["mode"] == "async" and r["staleness"] == [0, 0, 0] for r in fed.metrics(tmp_path)
        )
    assert not outbox.exists()  # its receipt arrived: the outbox let it go


def test_same_update_delivered_twice_is_counted_once(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = small_broker.url
    spy = mqtt_client(url, client_id="spy")
    inbox = fed.collect(spy, T.update(1, "pi-0"), T.receipt_any_round("pi-0"), T.aggregator_status)
    # Two rounds: the aggregator is still running when the copies of round 1 arrive, so each
    # copy gets its receipt ("duplicate" while round 1 is open, "late" once it closed).
    agg = fed.start_aggregator(url, tmp_path, rounds=2, min_clients=3)
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    try:
        update = fed.next_on(inbox, T.update(1, "pi-0"), 40).payload
        for _ in range(2):
            spy.publish(T.update(1, "pi-0"), update, qos=1).wait_for_publish(5)
        code = _finish(agg, agents, tmp_path)
        done = fed.until(inbox, _AGGREGATOR_DONE, 30, "the aggregator's final status")
    finally:
        fed.stop([agg, *agents])
    receipts = _json_on(done, T.receipt(1, "pi-0"))
    assert code == 0
    _assert_each_round_counted_once(tmp_path, 2)
    assert [r["status"] for r in receipts].count("accepted") == 1
    assert len(receipts) == 3
    assert all(r["reason"].startswith(("duplicate", "late")) for r in receipts if r["reason"])


# --- 3. aggregator killed mid-round -----------------------------------------------------
def _run(url: str, tmp: Path, data: list[Path], kill: bool, strategy: tuple[str, ...] = ()) -> Path:
    """Two rounds; with ``kill``, the aggregator is SIGKILLed mid-round 1 and restarted.
    ``strategy``: more aggregator flags (a server optimizer, clipping).

    pi-2 is paused (SIGSTOP) before round 1 opens, so the round is certainly open with
    pi-0's and pi-1's updates journaled when the aggregator dies; it resumes afterwards.
    """
    state = tmp / "agg-state"
    args = ("--state-dir", str(state), "--no-onnx", *strategy)
    statuses = MqttTransport(url, f"watch-{tmp.name}", subscriptions=[(T.agent_status("pi-2"), 1)])
    statuses.start()
    agents = [_agent(url, i, data[i], tmp) for i in (2, 0, 1)]
    try:
        if kill:
            while b'"online"' not in statuses.inbox.get(timeout=30).payload:
                pass
            fed.pause(agents[:1])
        agg = fed.start_aggregator(url, tmp, *args, rounds=2, min_clients=3)
        if kill:
            journal = state / "journal" / "round-1.jsonl"
            fed.wait_for(
                lambda: journal.exists() and journal.read_text().count('"accepted"') == 2,
                40,
                "pi-0's and pi-1's updates in the journal",
            )
            agg.kill()  # kill -9: no clean shutdown
            agg.wait()
            agg = fed.start_aggregator(url, tmp, *args, rounds=2, min_clients=3)
            fed.resume(agents[:1])
        assert _finish(agg, agents, tmp) == 0
    finally:
        statuses.stop()
        fed.resume(agents)
        fed.stop(agents)
    return state


# FedAdam's moments and the adaptive clipping bound (round 1 held until its median norm is
# known, then clipped to it) are checkpointed; after kill -9 they resume bit for bit.
STRATEGIES = {
    "default": (),
    "fedadam-adaptive-clip": ("--strategy", "fedadam", "--server-lr", "0.01", "--clip-lr", "0.5"),
}


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_aggregator_killed_mid_round_resumes_and_counts_each_update_once(
    tmp_path: Path, data: list[Path], strategy: tuple[str, ...]
) -> None:
    require_mosquitto()
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "data").symlink_to(tmp_path / "data")
    # The reference (uninterrupted) federation runs alongside, on its own broker.
    with (
        LocalBroker(tmp_path / "b1") as b1,
        LocalBroker(tmp_path / "b2") as b2,
        ThreadPoolExecutor(1) as pool,
    ):
        reference = pool.submit(_run, b1.url, ref_dir, data, False, strategy)
        state = _run(b2.url, tmp_path, data, kill=True, strategy=strategy)
        ref_state = reference.result(timeout=60)

    history = _history(state)
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["accepted"] == {f"pi-{i}": SAMPLES for i in range(3)} for h in history)
    _assert_each_round_counted_once(tmp_path, 2)
    assert not list((state / "journal").glob("round-*.jsonl"))  # applied: journal dropped
    # Same seed, same updates, each once: the same model as the uninterrupted run.
    ref = st_load_file(str(ref_state / "checkpoint.safetensors"))
    got = st_load_file(str(state / "checkpoint.safetensors"))
    assert ref.keys() == got.keys()
    assert all(np.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    if strategy:  # the optimizer's moments and the clipping bound came back with the model
        assert any(k.startswith("server_opt/m/") for k in got)
        assert _strategy_meta(state) == _strategy_meta(ref_state)


def _strategy_meta(state_dir: Path) -> dict[str, Any]:
    """The checkpoint's strategy state besides its tensors (step count, clipping bound)."""
    strategy: dict[str, Any] = json.loads((state_dir / "checkpoint.json").read_text())["strategy"]
    return strategy


# --- 5. deadlines: a silent agent, a starved round --------------------------------------
def _ghost(client: mqtt.Client, name: str) -> None:
    """An agent that announces itself online and then never trains."""
    status = msg.AgentStatus(client_id=name, state="online", num_samples=300)
    client.publish(T.agent_status(name), status.to_json(), qos=1, retain=True).wait_for_publish(5)


def test_silent_agent_does_not_block_a_round(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = small_broker.url
    ghost = mqtt_client(url, client_id="ghost")
    _ghost(ghost, "ghost")
    decisions = fed.collect(ghost, T.round_decision(1), T.agent_status_any, T.aggregator_status)
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    online: set[str] = set()
    while len(online) < 3:  # all real agents up first: the ghost alone is in the way
        m = decisions.get(timeout=30)
        if m.topic != T.agent_status("ghost") and b'"online"' in m.payload:
            online.add(m.topic)
    agg = fed.start_aggregator(url, tmp_path, "--round-timeout", "8", rounds=1, min_clients=3)
    code = _finish(agg, agents, tmp_path)
    done = fed.until(decisions, _AGGREGATOR_DONE, 30, "the aggregator's final status")
    assert code == 0
    _assert_each_round_counted_once(tmp_path, 1)  # ghost was selected but never counted
    seen = _json_on(done, f"{T.root}/round/")
    # (The round may be extended once: the ghost can fill the quorum of 3 online agents
    # before the third real one is up, so the first selection lacks it.)
    final = {d["round"]: d["decision"] for d in seen}
    assert final == {1: "applied"}
    assert "failed" not in [d["decision"] for d in seen]


def test_starved_round_is_extended_then_fails_with_a_clear_exit_code(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = small_broker.url
    ghost = mqtt_client(url, client_id="ghost")
    _ghost(ghost, "ghost")
    pi0 = T.agent_status("pi-0")
    decisions = fed.collect(ghost, T.round_decision(1), T.aggregator_status, pi0)
    # pi-0's update must be counted before the first deadline whatever the load: it loads
    # torch before going online, and the aggregator starts once it is online.
    agents = [_agent(url, 0, data[0], tmp_path, "--warm-up")]
    fed.until(
        decisions,
        lambda m: m.topic == pi0 and b'"online"' in m.payload,
        60,
        "pi-0 online and warmed up",
    )
    extra = ("--round-timeout", "10", "--max-extensions", "1", "--on-starved", "retry")
    agg = fed.start_aggregator(url, tmp_path, *extra, rounds=1, min_clients=2)
    code = _finish(agg, agents, tmp_path)
    done = fed.until(decisions, _AGGREGATOR_DONE, 30, "the aggregator's final status")
    assert code == 3
    seen = _json_on(done, T.round_decision(1))
    assert [d["decision"] for d in seen] == ["retried", "failed"]
    assert seen[-1]["accepted"] == 1 and seen[-1]["min_clients"] == 2


# --- 1. broker killed and restarted mid-round ---------------------------------------------
def test_broker_killed_mid_round_federation_completes(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = small_broker.url
    pi2 = T.agent_status("pi-2")
    inbox = fed.collect(mqtt_client(url), pi2, T.update(1, "pi-0"), T.update(1, "pi-1"))
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    procs = list(agents)
    try:
        # pi-2 is paused once online: round 1 opens with it selected and cannot close
        # without it, so the broker dies mid-round however fast the rounds run.
        fed.until(inbox, _status(pi2, "online"), 60, "pi-2 online")
        fed.pause(agents[2:])
        agg = fed.start_aggregator(url, tmp_path, "--no-onnx", rounds=3, min_clients=3)
        procs.insert(0, agg)
        updates = [T.update(1, "pi-0"), T.update(1, "pi-1")]
        fed.until_each(inbox, updates, 60, "pi-0's and pi-1's round-1 updates")
        small_broker.kill()
        # Restart only once every running client has noticed: the federation is cut off.
        for name in ("aggregator", "pi-0", "pi-1"):
            lost = fed.logged(tmp_path / f"{name}.log", "lost the broker")
            fed.wait_for(lost, 30, f"{name} noticing the broker is gone")
        small_broker.restart()
        fed.resume(agents[2:])  # finds its connection dead, reconnects, trains round 1
        code = _finish(agg, agents, tmp_path)
    finally:
        fed.resume(procs)
        fed.stop(procs)
    assert code == 0
    _assert_each_round_counted_once(tmp_path, 3)


# --- 4. network cut between one agent and the broker --------------------------------------
def test_agent_behind_a_cut_link_reconnects_and_its_update_arrives(
    small_broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = small_broker.url
    pi2 = T.agent_status("pi-2")
    inbox = fed.collect(mqtt_client(url), T.round_start(1), pi2)
    with NetProxy(small_broker.host, small_broker.port) as proxy:
        agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data[:2])]
        agents.append(_agent(proxy.url, 2, data[2], tmp_path))
        procs = list(agents)
        try:
            # pi-2 is paused once online and the link cut once round 1 is open: its update
            # can only arrive over a reconnection (round 1 cannot close without it).
            fed.until(inbox, _status(pi2, "online"), 60, "pi-2 online")
            fed.pause(agents[2:])
            agg = fed.start_aggregator(url, tmp_path, "--no-onnx", rounds=2, min_clients=3)
            procs.insert(0, agg)
            fed.next_on(inbox, T.round_start(1), 40)
            proxy.cut()
            fed.resume(agents[2:])
            fed.wait_for(lambda: proxy.refused > 0, 30, "pi-2 retrying while the link is down")
            proxy.heal()
            code = _finish(agg, agents, tmp_path)
        finally:
            fed.resume(procs)
            fed.stop(procs)
        reconnected = proxy.accepted >= 2
    assert code == 0
    assert reconnected
    _assert_each_round_counted_once(tmp_path, 2)


def test_persistent_broker_keeps_a_retained_chunked_model_across_a_restart(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    persistence = (fed.REPO / "broker_config" / "mosquitto-persistence.conf").read_text()
    model = os.urandom(3_000_000)  # over the 2 MB packet limit: retained as chunks
    limit = "max_packet_size 2000000\n"
    with LocalBroker(tmp_path / "broker", extra_config=persistence + limit) as b:
        writer = MqttTransport(b.url, "writer").start()
        writer.publish(T.global_model, model, retain=True)
        writer.stop()
        b.stop()  # a clean stop saves mosquitto.db
        b.start()
        reader = MqttTransport(b.url, "reader", subscriptions=[(T.global_model, 1)]).start()
        try:
            item = reader.inbox.get(timeout=10)
        finally:
            reader.stop()
    assert item.retain and item.payload == model
