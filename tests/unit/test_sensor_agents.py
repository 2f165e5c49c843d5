"""Agents on CSV sensor data in a whole federation (in-process), and their settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import AgentConfig, add_arguments, from_args
from shared.protocol import messages as msg
from shared.runtime.plugins import PLUGINS_ENV
from shared.runtime.sensors import SensorSource
from shared.settings import SettingsError
from tests.synthetic import WINDOW_CLASSES, WINDOW_SHAPE, write_recording
from tests.unit.inprocess import Federation, T, wait_for

CHANNELS, WINDOW = WINDOW_SHAPE


@pytest.fixture(autouse=True)
def _plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "cnn1d=tests.plugin_models:cnn1d")


def _sensor_settings(**more: object) -> dict[str, object]:
    return {
        "label_column": "label",
        "time_column": "t",
        "columns": ("c0", "c1"),
        "window": WINDOW,
        **more,
    }


def test_agents_train_on_csv_windows_and_a_growing_directory_is_read_every_round(
    fed: Federation,
) -> None:
    now = fed.clock.time()
    static = write_recording(fed.tmp / "pi-0.csv", windows=60, seed=1, mtime=now)
    growing = fed.tmp / "pi-1"
    growing.mkdir()
    write_recording(growing / "0001.csv", windows=40, seed=2, mtime=now - 10)
    write_recording(growing / "0000.csv", windows=40, seed=3, mtime=now - 5000)  # too old
    settings = _sensor_settings(recent_max_age_s=3600.0)
    # A selected device that never trains holds round 1 open until the test moves the clock.
    silent = fed.silent_device("pi-silent")
    fed.start_agent("pi-0", seed=1, data=str(static), val_fraction=0.2, **settings)
    grower = fed.start_agent("pi-1", seed=2, data=str(growing), **settings)
    fed.wait_online("pi-silent", "pi-0", "pi-1")
    fed.start_aggregator(
        rounds=2, min_clients=2, model="cnn1d", input_shape=WINDOW_SHAPE,
        num_classes=WINDOW_CLASSES, eval_data=None, round_timeout=600.0,
    )  # fmt: skip
    wait_for(
        lambda: len(fed.receipts(1, "pi-0")) == len(fed.receipts(1, "pi-1")) == 1,
        "both round-1 updates counted",
    )
    # What pi-1 recorded since: the next round trains on it too.
    write_recording(growing / "0002.csv", windows=30, seed=4, mtime=fed.clock.time())
    silent.leave()
    fed.clock.advance(601.0)
    codes = fed.finish()

    assert set(codes.values()) == {0}
    rounds = fed.rounds()
    assert [r["participants"] for r in rounds] == [["pi-0", "pi-1"]] * 2
    assert rounds[0]["num_samples"] == 48 + 40  # pi-0: 80 % of 60 windows; pi-1: one file
    assert rounds[1]["num_samples"] == 48 + 40 + 30
    assert grower.rounds_trained == 2 and len(grower.data) == 70


def test_an_empty_growing_directory_skips_rounds_until_files_arrive(fed: Federation) -> None:
    empty = fed.tmp / "pi-2"
    empty.mkdir()
    recording = write_recording(fed.tmp / "pi-0.csv", windows=30, seed=1, mtime=fed.clock.time())
    agent = fed.start_agent("pi-2", seed=3, data=str(empty), **_sensor_settings())
    fed.start_agent("pi-0", seed=1, data=str(recording), **_sensor_settings())
    fed.wait_online("pi-0", "pi-2")
    fed.start_aggregator(
        rounds=1, min_clients=1, model="cnn1d", input_shape=WINDOW_SHAPE,
        num_classes=WINDOW_CLASSES, eval_data=None, round_timeout=60.0,
    )  # fmt: skip
    wait_for(lambda: len(fed.receipts(1, "pi-0")) == 1, "pi-0's update counted")
    wait_for(lambda: bool(_skips(fed, "pi-2")), "pi-2's status saying it skipped round 1")

    fed.clock.advance(61.0)  # pi-2 sends nothing: the round closes at its deadline
    fed.finish()

    assert any("no .csv or .parquet file" in why for why in _skips(fed, "pi-2"))
    assert fed.rounds()[0]["participants"] == ["pi-0"] and agent.rounds_trained == 0


def _skips(fed: Federation, client_id: str) -> list[str]:
    statuses = [msg.decode(m.payload, msg.AgentStatus) for m in fed.broker.messages(
        T.agent_status(client_id))]  # fmt: skip
    return [s.skipped for s in statuses if s.skipped]


# --- settings ---------------------------------------------------------------------------------
def _agent_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_sensor_flags_make_the_source() -> None:
    cfg = from_args(_agent_args(
        "--client-id", "pi-1", "--data", "d/", "--columns", "ax, ay,az", "--label-column", "act",
        "--label-names", "idle,walk", "--time-column", "ts", "--window", "128", "--stride", "64",
        "--no-normalize", "--recent-files", "3", "--recent-max-age-s", "600", "--max-rows", "500",
    ))  # fmt: skip

    assert cfg.source() == SensorSource(
        columns=("ax", "ay", "az"), label_column="act", label_names=("idle", "walk"),
        time_column="ts", window=128, stride=64, normalize=False, recent_files=3,
        recent_max_age_s=600.0, max_rows=500,
    )  # fmt: skip


def test_sensor_settings_come_from_toml_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nclient-id = "pi-1"\ndata = "d.csv"\ntarget-columns = ["temp"]\n'
        "window = 32\nhorizon = 4\n"
    )
    monkeypatch.setenv("FEDMQ_AGENT_COLUMNS", "temp,load")

    cfg = from_args(_agent_args("--config", str(path)))

    assert cfg.source().horizon == 4 and cfg.columns == ("temp", "load")
    assert cfg.source().task == "regression"


def test_contradictory_sensor_settings_stop_the_agent_naming_them() -> None:
    with pytest.raises(SettingsError, match="horizon needs window"):
        from_args(_agent_args(
            "--client-id", "pi-1", "--data", "d.csv", "--target-columns", "t", "--horizon", "3"
        ))  # fmt: skip


def test_image_agents_need_no_sensor_settings() -> None:
    cfg = AgentConfig(client_id="pi-1", data="x.npz")

    assert not cfg.source().configured and np.isfinite(cfg.max_rows)


def test_a_bad_new_file_costs_the_round_not_the_agent(fed: Federation) -> None:
    now = fed.clock.time()
    growing = fed.tmp / "pi-1"
    growing.mkdir()
    write_recording(growing / "0001.csv", windows=20, seed=2, mtime=now - 10)
    recording = write_recording(fed.tmp / "pi-0.csv", windows=30, seed=1, mtime=now)
    silent = fed.silent_device("pi-silent")  # holds round 1 open until the clock moves
    fed.start_agent("pi-0", seed=1, data=str(recording), **_sensor_settings())
    grower = fed.start_agent("pi-1", seed=2, data=str(growing), **_sensor_settings())
    fed.wait_online("pi-silent", "pi-0", "pi-1")
    fed.start_aggregator(
        rounds=2, min_clients=1, model="cnn1d", input_shape=WINDOW_SHAPE,
        num_classes=WINDOW_CLASSES, eval_data=None, round_timeout=60.0,
    )  # fmt: skip
    wait_for(
        lambda: len(fed.receipts(1, "pi-0")) == len(fed.receipts(1, "pi-1")) == 1,
        "both round-1 updates counted",
    )
    (growing / "0002.csv").write_text("t,c0,c1,label\n1,0.5,oops,0\n")  # a broken new file
    silent.leave()
    fed.clock.advance(61.0)
    wait_for(lambda: len(fed.receipts(2, "pi-0")) == 1, "pi-0's round-2 update counted")
    wait_for(lambda: bool(_skips(fed, "pi-1")), "pi-1 skipping round 2")

    fed.clock.advance(61.0)  # pi-1 sends nothing for round 2: it closes at its deadline
    codes = fed.finish()

    assert set(codes.values()) == {0} and grower.rounds_trained == 1
    (why,) = _skips(fed, "pi-1")
    assert why.startswith("data not usable this round:") and "'oops' is not a number" in why
