"""A real federation: Mosquitto, one aggregator process and agent processes over TCP."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame, tensors_hash
from shared.protocol.topics import Topics
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)


def _drain(inbox: fed.Inbox) -> list[mqtt.MQTTMessage]:
    """What has arrived so far."""
    out = []
    while not inbox.empty():
        out.append(inbox.get())
    return out


def test_three_agents_complete_three_rounds(broker: LocalBroker, tmp_path: Path) -> None:
    clients = fed.write_client_data(tmp_path / "data", 3)
    agg = fed.start_aggregator(broker.url, tmp_path, rounds=3, min_clients=3)
    agents = [fed.start_agent(broker.url, f"pi-{i}", p, tmp_path) for i, p in enumerate(clients)]
    try:
        code = fed.wait_exit(agg, 180, tmp_path / "aggregator.log")
        agent_codes = fed.wait_agents(agents, [f"pi-{i}" for i in range(3)], tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert code == 0
    assert agent_codes == [0, 0, 0]  # agents leave when the federation finishes
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == ["pi-0", "pi-1", "pi-2"] for r in rounds)
    assert all(r["num_samples"] == 3 * 270 for r in rounds)  # 10% held out for validation
    assert rounds[-1]["test_accuracy"] > 0.9  # 4 classes: chance is 0.25
    assert rounds[-1]["local_val_accuracy"] is not None
    assert all(r["bytes_up"] > 0 and r["train_loss"] is not None for r in rounds)


def test_late_agent_gets_retained_model(
    broker: LocalBroker, tmp_path: Path, mqtt_client: Any
) -> None:
    clients = fed.write_client_data(tmp_path / "data", 3)
    watcher = mqtt_client(broker.url)
    inbox = fed.collect(watcher, T.global_meta)
    agg = fed.start_aggregator(broker.url, tmp_path, rounds=2, min_clients=3)
    procs = [agg] + [fed.start_agent(broker.url, f"pi-{i}", clients[i], tmp_path) for i in (0, 1)]
    try:
        # The initial model is published before the third agent exists: it can only get it
        # from the broker's retained copy, and round 1 cannot start without it.
        initial = json.loads(fed.next_on(inbox, T.global_meta, timeout=60).payload)
        assert initial["round"] == 0
        procs.append(fed.start_agent(broker.url, "pi-late", clients[2], tmp_path))
        assert fed.wait_exit(agg, 180, tmp_path / "aggregator.log") == 0
    finally:
        fed.stop(procs)
    rounds = fed.metrics(tmp_path)
    assert all("pi-late" in r["participants"] for r in rounds)

    late_reader = mqtt_client(broker.url)
    models = fed.collect(late_reader, T.global_model)
    retained = fed.next_on(models, T.global_model, timeout=10)
    frame = decode_frame(retained.payload)
    assert retained.retain
    assert frame.header.round == 2
    assert (
        tensors_hash(frame.tensors) == frame.header.meta["model_hash"] == rounds[-1]["model_hash"]
    )


def test_malformed_updates_get_receipts_and_round_completes(
    broker: LocalBroker, tmp_path: Path, mqtt_client: Any
) -> None:
    clients = fed.write_client_data(tmp_path / "data", 3)
    intruder = mqtt_client(broker.url, client_id="intruder")
    inbox = fed.collect(intruder, T.round_start(1), T.receipt_any_round("intruder"))
    agg = fed.start_aggregator(broker.url, tmp_path, rounds=3, min_clients=3)
    agents = [fed.start_agent(broker.url, f"pi-{i}", p, tmp_path) for i, p in enumerate(clients)]
    try:
        fed.next_on(inbox, T.round_start(1), timeout=90)
        intruder.publish(T.update(1, "intruder"), b"\x00not a frame", qos=1)
        foreign = encode_frame(
            FrameHeader(
                kind="update",
                federation="other",
                round=1,
                codec="fp32",
                client_id="intruder",
                num_samples=5,
            ),
            {"w": np.zeros(3, np.float32)},
        ).payload
        intruder.publish(T.update(1, "intruder"), foreign, qos=1)
        receipts = [
            json.loads(fed.next_on(inbox, T.receipt(1, "intruder"), 30).payload) for _ in range(2)
        ]
        assert fed.wait_exit(agg, 180, tmp_path / "aggregator.log") == 0
    finally:
        fed.stop([agg, *agents])

    assert [r["status"] for r in receipts] == ["rejected", "rejected"]
    assert receipts[0]["reason"].startswith("undecodable")
    assert "not ours" in receipts[1]["reason"]
    rounds = fed.metrics(tmp_path)
    assert len(rounds) == 3 and all(r["accepted"] == 3 for r in rounds)
    assert rounds[0]["rejected"] >= 1


def test_agents_follow_int8_global_deltas_and_a_late_agent_catches_up_in_full(
    broker: LocalBroker, tmp_path: Path, mqtt_client: Any
) -> None:
    names = ["pi-0", "pi-1", "pi-late"]
    clients = fed.write_client_data(tmp_path / "data", 3)
    metas = fed.collect(mqtt_client(broker.url), T.global_meta)
    starts = fed.collect(mqtt_client(broker.url), T.round_start(2))
    agg = fed.start_aggregator(broker.url, tmp_path, "--no-onnx", rounds=4, min_clients=2)
    procs = [agg] + [fed.start_agent(broker.url, f"pi-{i}", clients[i], tmp_path) for i in (0, 1)]
    try:
        initial = json.loads(fed.next_on(metas, T.global_meta, 60).payload)
        while json.loads(fed.next_on(metas, T.global_meta, 60).payload)["round"] < 1:
            pass
        procs.append(_join_between_rounds_1_and_2(broker.url, clients[2], procs, starts, tmp_path))
        assert fed.wait_exit(agg, 180, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(procs[1:], names, tmp_path)
    finally:
        fed.resume(procs)
        fed.stop(procs)

    assert codes == [0, 0, 0]
    assert initial["round"] == 0
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["download_codec"] == "int8" for r in rounds)
    # (a) Every round published an int8 delta several times smaller than the full model.
    assert all(r["model_bytes"] > 3.5 * r["delta_bytes"] > 0 for r in rounds)
    _assert_downloads(rounds, initial["nbytes"])
    # (b) Everybody ends with the aggregator's model; early agents only ever applied
    # deltas after the initial model, pi-late fetched model 1 in full once.
    final = rounds[-1]["model_hash"]
    for name in names:
        log = (tmp_path / f"{name}.log").read_text()
        assert f"holding the global model of round 4: {final}" in log, name
        assert f"{name} unsubscribed from {T.global_model}" in log, name
        full = log.count("(full model,")
        applied = log.count("(delta, int8,")
        assert (full, applied) == ((1, 3) if name == "pi-late" else (1, 4)), (name, full, applied)
    late = (tmp_path / "pi-late.log").read_text()
    assert re.findall(r"global model of round (\d+): \w+ \(full model,", late) == ["1"]


def _join_between_rounds_1_and_2(
    url: str, data: Path, procs: list[Any], starts: fed.Inbox, tmp_path: Path
) -> Any:
    """Start pi-late once model 1 is out, so that it gets model 1, and only it, in full.

    The aggregator (``procs[0]``) is paused right after model 1: pi-late can get model 1
    only from the retained full model. It drops the full-model topic once it holds model 1
    and a round on it is announced; the transport logs "unsubscribed from" when the broker
    has confirmed it, and no newer model may be published before that line.
    """
    agg, early = procs[0], procs[1:3]
    fed.pause([agg])
    late = fed.start_agent(url, "pi-late", data, tmp_path)
    late_log = tmp_path / "pi-late.log"
    fed.wait_for(fed.logged(late_log, "global model of round 1:"), 60, "pi-late's model 1")
    dropped = fed.logged(late_log, f"pi-late unsubscribed from {T.global_model}")
    # Seconds after the pause: whatever the aggregator had sent has reached the watcher.
    if any(m.payload for m in _drain(starts)):
        # pi-late got round 2's retained announcement: it drops the topic while the
        # aggregator is still paused.
        fed.wait_for(dropped, 60, "pi-late following deltas only")
        fed.resume([agg])
    else:
        # Round 2 is announced only once the aggregator goes on: hold the early agents so
        # that round 2 (and model 2) cannot complete before pi-late has dropped the topic.
        fed.pause(early)
        fed.resume([agg])
        fed.wait_for(dropped, 60, "pi-late following deltas only")
        fed.resume(early)
    return late


def _assert_downloads(rounds: list[dict[str, Any]], initial: int) -> None:
    """bytes_down is what the agents measured and reported with their updates.

    Since its previous update, an early agent downloaded exactly the previous round's delta
    (round 1: the initial full model); pi-late, before its first update, the retained full
    model 1 and delta 1, then every delta up to the round before.
    """
    first_late = min(r["round"] for r in rounds if "pi-late" in r["participants"])
    assert first_late in (2, 3, 4)
    delta = {r["round"]: r["delta_bytes"] for r in rounds}
    for r in rounds:
        n = r["round"]
        early = 2 * (initial if n == 1 else delta[n - 1])
        late_bytes = 0
        if n == first_late:
            late_bytes = rounds[0]["model_bytes"] + sum(delta[k] for k in range(1, n))
        elif n > first_late:
            late_bytes = delta[n - 1]
        assert r["bytes_down"] == early + late_bytes, n
        if n > 1 and n != first_late:
            assert r["bytes_down"] / r["accepted"] < r["model_bytes"] / 3.5
