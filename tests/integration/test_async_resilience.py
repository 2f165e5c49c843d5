"""Nothing lost, nothing counted twice, in the asynchronous mode (docs/async.md): faults
injected into a real federation (Mosquitto, the aggregator and agents as processes).

With K = 3 and three devices, every version window must count each device's update exactly
once (a device counts at most once per window), so each version's participants are all three
and their staleness 0; a lost or doubled update would show in the metrics. No test sleeps:
each waits for the message or state it needs (the same steps as tests/integration/
test_resilience.py for synchronous rounds; an agent killed before its receipt is there, run in
both modes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.protocol.topics import Topics
from tests.conftest import require_mosquitto
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
SAMPLES = 270  # 300 per client, 10 % held out for validation
ASYNC = ("--mode", "async", "--buffer", "3", "--max-staleness", "2", "--no-onnx")
NAMES = ["pi-0", "pi-1", "pi-2"]


def _agent(url: str, i: int, data: Path, tmp: Path) -> Any:
    return fed.start_agent(url, f"pi-{i}", data, tmp, "--state-dir", str(tmp / f"state-pi-{i}"))


def _status(topic: str, *states: str) -> Callable[[mqtt.MQTTMessage], bool]:
    return lambda m: (
        m.topic == topic and bool(m.payload) and json.loads(m.payload)["state"] in states
    )


def _assert_each_version_counts_each_device_once(tmp: Path, versions: int) -> None:
    entries = fed.metrics(tmp)
    assert [r["round"] for r in entries] == list(range(1, versions + 1))
    for r in entries:
        assert r["mode"] == "async"
        assert r["participants"] == NAMES and r["staleness"] == [0, 0, 0]
        assert r["accepted"] == 3 and r["num_samples"] == 3 * SAMPLES


def _finish(agg: Any, agents: list[Any], tmp: Path) -> int:
    try:
        return fed.wait_exit(agg, 60, tmp / "aggregator.log")
    finally:
        fed.stop([agg, *agents])


@pytest.fixture
def data(tmp_path: Path) -> list[Path]:
    return fed.write_client_data(tmp_path / "data", 3)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    require_mosquitto()
    b = LocalBroker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


def test_a_broker_killed_mid_version_loses_nothing(
    broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = broker.url
    pi2 = T.agent_status("pi-2")
    inbox = fed.collect(mqtt_client(url), pi2, T.update(1, "pi-0"), T.update(1, "pi-1"))
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    procs = list(agents)
    try:
        # pi-2 is paused once online: window 1 cannot reach K = 3 without it, so the broker
        # dies mid-version however fast the others train.
        fed.until(inbox, _status(pi2, "online"), 60, "pi-2 online")
        fed.pause(agents[2:])
        agg = fed.start_aggregator(url, tmp_path, *ASYNC, rounds=3, min_clients=3)
        procs.insert(0, agg)
        updates = [T.update(1, "pi-0"), T.update(1, "pi-1")]
        fed.until_each(inbox, updates, 60, "pi-0's and pi-1's version-1 updates")
        broker.kill()
        for name in ("aggregator", "pi-0", "pi-1"):
            lost = fed.logged(tmp_path / f"{name}.log", "lost the broker")
            fed.wait_for(lost, 30, f"{name} noticing the broker is gone")
        broker.restart()
        fed.resume(agents[2:])  # finds its connection dead, reconnects, trains version 1
        code = _finish(agg, agents, tmp_path)
    finally:
        fed.resume(procs)
        fed.stop(procs)
    assert code == 0
    _assert_each_version_counts_each_device_once(tmp_path, 3)


def test_the_aggregator_killed_mid_buffer_resumes_losing_nothing(
    broker: LocalBroker, tmp_path: Path, data: list[Path], mqtt_client: Any
) -> None:
    url = broker.url
    state = tmp_path / "agg-state"
    flags = (*ASYNC, "--state-dir", str(state))
    pi2 = T.agent_status("pi-2")
    inbox = fed.collect(mqtt_client(url), pi2)
    agents = [_agent(url, i, p, tmp_path) for i, p in enumerate(data)]
    procs = list(agents)
    try:
        # pi-2 is paused: window 1 holds pi-0's and pi-1's journaled updates when it dies.
        fed.until(inbox, _status(pi2, "online"), 60, "pi-2 online")
        fed.pause(agents[2:])
        agg = fed.start_aggregator(url, tmp_path, *flags, rounds=2, min_clients=3)
        procs.insert(0, agg)
        journal = state / "journal" / "round-1.jsonl"
        fed.wait_for(
            lambda: journal.exists() and journal.read_text().count('"accepted"') == 2,
            60,
            "pi-0's and pi-1's updates in the journal",
        )
        agg.kill()  # kill -9: no clean shutdown
        agg.wait()
        agg = procs[0] = fed.start_aggregator(url, tmp_path, *flags, rounds=2, min_clients=3)
        fed.resume(agents[2:])
        code = _finish(agg, agents, tmp_path)
    finally:
        fed.resume(procs)
        fed.stop(procs)
    assert code == 0
    _assert_each_version_counts_each_device_once(tmp_path, 2)
    history = json.loads((state / "checkpoint.json").read_text())["history"]
    assert [sorted(h["bases"]) for h in history] == [NAMES, NAMES]  # each counted once
    assert not list((state / "journal").glob("round-*.jsonl"))  # applied: journal dropped
