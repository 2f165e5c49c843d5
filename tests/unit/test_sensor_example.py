"""The sensor example's conversion: recordings → per-device CSV directories, the non-IID split,
the held-out windows and the centralised baseline, on generated recordings (no sktime)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from shared.runtime.data import save_npz
from shared.runtime.plugins import PLUGINS_ENV
from shared.runtime.sensors import SensorSource, load_sensor_data

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "sensor-cnn"
sys.path.insert(0, str(EXAMPLE))  # importable whether or not the example is installed

from sensor_cnn import centralised, devices  # noqa: E402
from sensor_cnn.datasets import DATASETS, Recordings, from_nested  # noqa: E402

CHANNELS = ("c0", "c1")
NAMES = ("idle", "walk", "run")
START = datetime(2024, 5, 6, 9, 0, 0)


def _recordings(lengths: list[int], labels: list[int], seed: int = 0) -> Recordings:
    rng = np.random.default_rng(seed)
    series = [rng.normal(label, 1.0, size=(2, n)) for n, label in zip(lengths, labels, strict=True)]
    return Recordings(series, np.array(labels), NAMES, CHANNELS, period_s=0.1)


def _source(window: int, stride: int, normalize: bool = False) -> SensorSource:
    return SensorSource(
        columns=CHANNELS, label_column="activity", label_names=NAMES, time_column="time",
        window=window, stride=stride, normalize=normalize,
    )  # fmt: skip


def test_the_split_places_every_recording_on_exactly_one_device() -> None:
    labels = np.repeat(np.arange(9), 30)

    parts = devices.split_non_iid(labels, devices=6, alpha=0.5, seed=0, min_recordings=10)

    placed = np.sort(np.concatenate(parts))
    assert np.array_equal(placed, np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 10


def test_the_split_skews_each_devices_label_mix() -> None:
    labels = np.repeat(np.arange(9), 30)

    parts = devices.split_non_iid(labels, devices=6, alpha=0.5, seed=0, min_recordings=10)

    counts = np.array(devices.label_counts(labels, parts, 9))
    shares = counts / counts.sum(axis=1, keepdims=True)
    assert shares.max() > 3 * (1 / 9)  # some speaker is far over its IID share somewhere
    assert (counts == 0).any()  # and some device never hears some speaker


def test_the_split_is_seeded() -> None:
    labels = np.repeat(np.arange(4), 10)

    first = devices.split_non_iid(labels, 4, 0.5, seed=3, min_recordings=4)
    again = devices.split_non_iid(labels, 4, 0.5, seed=3, min_recordings=4)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_each_recording_becomes_one_csv_of_timestamped_channels(tmp_path: Path) -> None:
    recs = _recordings([5, 6], [2, 0])

    paths = devices.write_recordings(tmp_path / "pi", recs, np.array([0, 1]), "activity", START)

    lines = paths[0].read_text().splitlines()
    assert lines[0] == "time,c0,c1,activity"
    assert lines[1].startswith("2024-05-06T09:00:00.000000,") and lines[1].endswith(",run")
    assert lines[2].startswith("2024-05-06T09:00:00.100000,")
    assert len(lines) == 1 + 5
    assert sorted(p.name for p in (tmp_path / "pi").iterdir()) == ["rec-0000.csv", "rec-0001.csv"]


def test_files_are_dated_by_their_recordings_in_order(tmp_path: Path) -> None:
    recs = _recordings([5, 6, 7], [0, 1, 2])

    paths = devices.write_recordings(tmp_path / "pi", recs, np.array([2, 0, 1]), "activity", START)

    mtimes = [p.stat().st_mtime for p in paths]
    assert mtimes == sorted(mtimes) and len(set(mtimes)) == 3
    assert mtimes[0] == pytest.approx(START.timestamp() + 0.6, abs=1e-3)  # its last reading


def test_the_agent_cuts_the_files_into_the_recordings_windows(tmp_path: Path) -> None:
    recs = _recordings([8, 6], [1, 2])
    devices.write_recordings(tmp_path / "pi", recs, np.array([0, 1]), "activity", START)

    data = load_sensor_data(tmp_path / "pi", _source(window=4, stride=2), now=0.0)

    # 8 rows: windows at 0, 2, 4; 6 rows: at 0, 2 (never across the two files)
    assert data.x.shape == (5, 2, 4)
    assert data.y.tolist() == [1, 1, 1, 2, 2]
    np.testing.assert_allclose(data.x[1], recs.series[0][:, 2:6], rtol=1e-5)
    np.testing.assert_allclose(data.x[4], recs.series[1][:, 2:6], rtol=1e-5)


def test_held_out_windows_are_standardised_with_their_own_statistics(tmp_path: Path) -> None:
    recs = _recordings([20] * 6, [0, 1, 2, 0, 1, 2])
    devices.write_recordings(tmp_path / "test", recs, np.arange(6), "activity", START)
    aged = SensorSource(**{**_source(5, 5, normalize=True).__dict__, "recent_max_age_s": 1.0})

    windows = devices.held_out_windows(tmp_path / "test", aged)  # every file, however old

    assert windows.x.shape == (24, 2, 5)
    np.testing.assert_allclose(windows.x.mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(windows.x.std(axis=(0, 2)), 1.0, atol=1e-4)


def test_recordings_refuse_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="not \\(2, L\\)"):
        Recordings([np.zeros((3, 5))], np.array([0]), NAMES, CHANNELS, 0.1)


class _Nested:
    """sktime's nested table, as far as from_nested reads it: a cell per channel."""

    def __init__(self, rows: list[list[list[float]]]) -> None:
        self.rows = rows
        self.shape = (len(rows), len(rows[0]))
        self.iloc = self

    def __getitem__(self, key: tuple[int, int]) -> list[float]:
        return self.rows[key[0]][key[1]]


def test_sktimes_labels_become_the_example_class_names() -> None:
    info = DATASETS["japanese-vowels"]
    rows = [[[float(c)] * n for c in range(12)] for n in (7, 9)]

    recs = from_nested(_Nested(rows), ["3", "9"], info)

    assert [recs.class_names[i] for i in recs.labels] == ["speaker3", "speaker9"]
    assert [s.shape for s in recs.series] == [(12, 7), (12, 9)]


def test_the_baseline_trains_the_aggregators_initial_model_and_evaluates_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "cnn1d=tests.plugin_models:cnn1d")
    from tests.synthetic import WINDOW_CLASSES, WINDOW_SHAPE, make_windows

    train, held_out = make_windows(120, seed=1), make_windows(60, seed=2)
    save_npz(tmp_path / "eval.npz", held_out)
    cfg = AggregatorConfig(
        model="cnn1d", input_shape=WINDOW_SHAPE, num_classes=WINDOW_CLASSES, lr=0.1,
        local_epochs=2,
    )  # fmt: skip
    parts = [train.subset(np.arange(60)), train.subset(np.arange(60, 120))]

    baseline = centralised.train_centralised(cfg, parts, tmp_path / "eval.npz", rounds=3)

    assert baseline.samples == 120 and len(baseline.accuracy) == 3
    assert baseline.accuracy[-1] > 0.8  # 3 classes: chance is 1/3
