"""A plugin model on CSV sensor data over a real broker, with real processes.

The plugin (``tests/plugin_models.py``) is installed the way a package installs one: a
``dist-info`` directory with a ``fedmq.models`` entry point, on the processes' ``PYTHONPATH``.
A device with another version of it is named by ``FEDMQ_MODEL_PLUGINS`` (which wins over
installed entry points).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.protocol import messages as msg
from shared.protocol.topics import Topics
from shared.runtime.data import save_npz
from shared.runtime.plugins import ENTRY_POINT_GROUP, PLUGINS_ENV
from shared.runtime.sensors import channel_statistics, standardized
from tests.integration import federation as fed
from tests.synthetic import WINDOW_CLASSES, WINDOW_SHAPE, make_windows, write_recording

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
CHANNELS, WINDOW = WINDOW_SHAPE
SENSOR_FLAGS = (
    "--label-column", "label", "--time-column", "t", "--columns", "c0,c1",
    "--window", str(WINDOW),
)  # fmt: skip
MODEL_FLAGS = (
    "--model", "cnn1d", "--input-shape", f"{CHANNELS},{WINDOW}",
    "--num-classes", str(WINDOW_CLASSES), "--lr", "0.1", "--local-epochs", "2",
)  # fmt: skip


def _installed_plugin(root: Path) -> dict[str, str]:
    """A dist-info declaring ``cnn1d``, as ``pip install`` of a plugin package leaves it."""
    dist = root / "sensor_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sensor-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ncnn1d = tests.plugin_models:cnn1d\n"
    )
    return {"PYTHONPATH": str(root)}


def _device_files(workdir: Path, devices: int) -> list[Path]:
    """Each device's CSV recording, and the held-out windows normalised as a device does."""
    data = workdir / "data"
    data.mkdir(parents=True)
    held_out = make_windows(300, seed=999)
    mean, std = channel_statistics(held_out.x)
    save_npz(data / "eval.npz", standardized(held_out, mean, std))
    return [write_recording(data / f"pi-{i}.csv", windows=120, seed=i + 1) for i in range(devices)]


def test_a_plugin_cnn_trains_on_csv_windows_and_its_accuracy_rises(
    broker: LocalBroker, tmp_path: Path
) -> None:
    plugin = _installed_plugin(tmp_path / "site")
    files = _device_files(tmp_path, 3)
    # One device records into a directory, re-read at every round.
    growing = tmp_path / "data" / "pi-2-dir"
    growing.mkdir()
    files[2].rename(growing / "0001.csv")
    sources = [files[0], files[1], growing]
    agg = fed.start_aggregator(
        broker.url, tmp_path, *MODEL_FLAGS, rounds=4, min_clients=3, env=plugin
    )
    agents = [
        fed.start_agent(broker.url, f"pi-{i}", s, tmp_path, *SENSOR_FLAGS, env=plugin)
        for i, s in enumerate(sources)
    ]
    try:
        code = fed.wait_exit(agg, 240, tmp_path / "aggregator.log")
        agent_codes = fed.wait_agents(agents, ["pi-0", "pi-1", "pi-2"], tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert code == 0 and agent_codes == [0, 0, 0]
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["accepted"] == 3 and r["task"] == "classification" for r in rounds)
    assert all(r["num_samples"] == 3 * 108 for r in rounds)  # 120 windows, 10 % validate
    assert rounds[-1]["test_loss"] < rounds[0]["test_loss"]
    assert rounds[-1]["test_accuracy"] >= rounds[0]["test_accuracy"]
    assert rounds[-1]["test_accuracy"] > 0.8  # 3 classes: chance is 1/3
    log = (tmp_path / "aggregator.log").read_text()
    assert "model cnn1d (tests.plugin_models:cnn1d from sensor-plugin 1.0)" in log


def test_a_device_with_another_plugin_version_is_refused_with_the_fingerprints_named(
    broker: LocalBroker, tmp_path: Path, mqtt_client: Any
) -> None:
    plugin = _installed_plugin(tmp_path / "site")
    files = _device_files(tmp_path, 3)
    watcher = mqtt_client(broker.url)
    names = ("pi-0", "pi-1", "pi-odd")
    inbox = fed.collect(
        watcher, T.round_start(1), T.receipt_any_round("pi-odd"), *map(T.agent_status, names)
    )
    newer = {**plugin, PLUGINS_ENV: "cnn1d=tests.plugin_models:cnn1d_wider"}
    procs = [
        fed.start_agent(broker.url, name, data, tmp_path, *SENSOR_FLAGS, env=env)
        for name, data, env in zip(names, files, (plugin, plugin, newer), strict=True)
    ]
    try:
        # All three online before the round: the selection invites pi-odd too.
        fed.until_each(inbox, map(T.agent_status, names), 120, "the three agents online")
        agg = fed.start_aggregator(
            broker.url, tmp_path, *MODEL_FLAGS, rounds=1, min_clients=2, env=plugin
        )
        procs.append(agg)
        announced = msg.decode(fed.next_on(inbox, T.round_start(1), 120).payload, msg.RoundStart)
        receipt = json.loads(fed.next_on(inbox, T.receipt(1, "pi-odd"), 120).payload)
        assert fed.wait_exit(agg, 180, tmp_path / "aggregator.log") == 0
    finally:
        fed.stop(procs)

    ours = announced.fingerprint
    assert "pi-odd" in announced.selected and len(ours) == 64
    assert receipt["status"] == "rejected" and receipt["code"] == "wrong-model"
    assert ours in receipt["reason"]
    odd_log = (tmp_path / "pi-odd.log").read_text()
    refusal = next(line for line in odd_log.splitlines() if "fingerprint mismatch" in line)
    theirs = refusal.split("this device ")[1].split()[0]
    assert ours in refusal and len(theirs) == 64 and theirs != ours
    assert theirs in receipt["reason"]
    (applied,) = fed.metrics(tmp_path)  # pi-odd declined it: the round went on without it
    assert applied["participants"] == ["pi-0", "pi-1"] and applied["rejected"] == 1
    assert np.isfinite(applied["test_accuracy"])
