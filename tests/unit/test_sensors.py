"""Sensor data sources (shared/runtime/tables.py, sensors.py) on files the tests write."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.runtime.data import DataFormatError
from shared.runtime.sensors import (
    MAX_WINDOW_VALUES,
    NoDataYet,
    SensorSource,
    load_sensor_data,
    recent_files,
    split_and_normalize,
)
from shared.runtime.tables import PARQUET_EXTRA, read_columns

NOW = 1_800_000_000.0
RNG = np.random.default_rng(0)


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _recording(path: Path, rows: int = 60, start: int = 0, labels: bool = True) -> Path:
    """Timestamps, two channels (a = row number, b = 10 × row number) and a label per row."""
    lines = [
        f"{start + i},{start + i},{10 * (start + i)}" + (f",{(i // 10) % 3}" if labels else "")
        for i in range(rows)
    ]
    return _csv(path, "t,a,b" + (",label" if labels else ""), lines)


def _load(path: Path, **settings: Any) -> Any:
    return load_sensor_data(path, SensorSource(**settings), now=NOW)


# --- tables ----------------------------------------------------------------------------------
def test_a_csv_table_gives_one_feature_vector_per_row(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "temp,current,label", ["20.5,1.5,0", "30.0,2.5,1", "25,2,1"])

    ds = _load(path, label_column="label")

    assert ds.x.tolist() == [[20.5, 1.5], [30.0, 2.5], [25.0, 2.0]]
    assert ds.y.tolist() == [0, 1, 1] and ds.task == "classification"


def test_a_table_with_target_columns_is_a_regression_without_them_as_inputs(
    tmp_path: Path,
) -> None:
    path = _csv(tmp_path / "t.csv", "x1,x2,y1,y2", ["1,2,3,4", "5,6,7,8"])

    one = _load(path, target_columns=("y1",))
    two = _load(path, target_columns=("y1", "y2"))

    assert one.x.tolist() == [[1, 2, 4], [5, 6, 8]] and one.y.tolist() == [3, 7]
    assert two.x.tolist() == [[1, 2], [5, 6]] and two.y.shape == (2, 2)
    assert two.task == "regression" and two.num_outputs == 2


def test_named_columns_and_text_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "when,a,b,state", ["1,1,9,walk", "2,2,8,idle"])

    ds = _load(path, columns=("b",), label_column="state", label_names=("idle", "walk"))

    assert ds.x.tolist() == [[9], [8]] and ds.y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("rows", "settings", "message"),
    [
        (["1,2,0"], {"label_column": "kind"}, r"no column 'kind'; its columns are a, b, label"),
        (["1,x,0"], {"label_column": "label"}, r"line 2, column 'b': 'x' is not a number"),
        (["1,2,0", "1,,1"], {"label_column": "label"}, r"line 3, column 'b': empty value"),
        (["1,nan,0"], {"label_column": "label"}, r"column 'b': 'nan' \(NaN or infinity\)"),
        (["1,inf,0"], {"label_column": "label"}, r"column 'b': 'inf' \(NaN or infinity\)"),
        (["1,2,-1"], {"label_column": "label"}, r"column 'label': label '-1' is not a class"),
        (["1,2,walk"], {"label_column": "label"}, "text labels need label_names"),
        (["1,2,run"], {"label_column": "label", "label_names": ("walk",)}, "not one of"),
        (["1,2"], {"label_column": "label"}, "line 2 has 2 fields, the header has 3"),
        (["1,2,0"] * 4, {"label_column": "label", "max_rows": 3}, "more than 3 rows"),
    ],
    ids=["missing-column", "non-numeric", "empty", "nan", "inf", "negative-label",
         "text-label", "unknown-name", "short-row", "too-many-rows"],
)  # fmt: skip
def test_bad_csv_input_is_refused_naming_where(
    tmp_path: Path, rows: list[str], settings: dict[str, Any], message: str
) -> None:
    path = _csv(tmp_path / "bad.csv", "a,b,label", rows)

    with pytest.raises(DataFormatError, match=message):
        _load(path, **settings)


def test_an_empty_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")

    with pytest.raises(DataFormatError, match="empty CSV file"):
        _load(tmp_path / "e.csv", label_column="label")


def test_read_columns_parses_iso_times_and_numbers(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "t,v", ["2025-01-01T00:00:01+00:00,1", "5,2"])

    cols = read_columns(path, {"t": "time", "v": "number"}, max_rows=10)

    assert cols["t"].tolist() == [1735689601.0, 5.0]


def test_an_unparseable_time_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "t,a,label", ["yesterday,1,0"])

    with pytest.raises(DataFormatError, match="neither a number nor an ISO 8601 time"):
        _load(path, label_column="label", time_column="t")


# --- Parquet ---------------------------------------------------------------------------------
def test_a_parquet_table_reads_like_its_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"temp": [20.5, 30.0], "label": ["on", "off"], "n": [1, 2]})
    pq.write_table(table, tmp_path / "t.parquet")

    ds = _load(tmp_path / "t.parquet", label_column="label", label_names=("off", "on"))

    assert ds.x.tolist() == [[20.5, 1.0], [30.0, 2.0]] and ds.y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"a": [1.0, None], "label": [0, 1]}, r"column 'a', row 2: empty value"),
        ({"a": [1.0, float("nan")], "label": [0, 1]}, r"column 'a', row 2: NaN or infinity"),
        ({"a": ["1", "x"], "label": [0, 1]}, r"column 'a', row 2: 'x' is not a number"),
        ({"a": [1.0, 2.0], "label": [0, -1]}, r"column 'label', row 2: label -1 is not a"),
    ],
    ids=["null", "nan", "text", "negative-label"],
)
def test_bad_parquet_input_is_refused_naming_the_row(
    tmp_path: Path, columns: dict[str, list[Any]], message: str
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")

    with pytest.raises(DataFormatError, match=message):
        _load(tmp_path / "bad.parquet", label_column="label")


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed

    with pytest.raises(DataFormatError, match=r"fedmq\[sensors\]") as caught:
        _load(tmp_path / "t.parquet", label_column="label")

    assert PARQUET_EXTRA in str(caught.value)


# --- time series -----------------------------------------------------------------------------
def test_a_recording_is_cut_into_windows_labelled_by_their_last_row(tmp_path: Path) -> None:
    path = _recording(tmp_path / "r.csv", rows=60)

    ds = _load(path, columns=("a", "b"), label_column="label", window=10, stride=5)

    assert ds.x.shape == (11, 2, 10)  # starts 0, 5, ..., 50
    assert ds.x[1, 0].tolist() == list(range(5, 15))  # channel a of the second window
    assert ds.y.tolist() == [(last // 10) % 3 for last in range(9, 60, 5)]


def test_rows_are_sorted_by_the_time_column(tmp_path: Path) -> None:
    path = _csv(tmp_path / "r.csv", "t,a,label", [f"{t},{t},0" for t in (3, 1, 2, 0)])

    ds = _load(path, label_column="label", time_column="t", window=4)

    assert ds.x[0, 0].tolist() == [0, 1, 2, 3]  # the time column is no feature


def test_a_forecast_targets_the_next_values_of_its_channel(tmp_path: Path) -> None:
    path = _recording(tmp_path / "r.csv", rows=30, labels=False)

    ds = _load(path, columns=("a",), target_columns=("a",), window=8, stride=4, horizon=3)

    assert ds.task == "regression" and ds.y.shape == (5, 3)  # starts 0, 4, ..., 16
    assert ds.y[0].tolist() == [8, 9, 10] and ds.x[0, 0].tolist() == list(range(8))


def test_window_regression_targets_are_the_last_rows_and_no_input(tmp_path: Path) -> None:
    path = _recording(tmp_path / "r.csv", rows=20, labels=False)

    ds = _load(path, target_columns=("b",), time_column="t", window=5)

    assert ds.input_shape == (1, 5)  # channel a only
    assert ds.y.tolist() == [40, 90, 140, 190]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 61}, r"60 rows, fewer than one window needs \(61\)"),
        ({"window": 50, "horizon": 20}, r"fewer than one window needs \(50 \+ horizon 20\)"),
    ],
)
def test_a_recording_shorter_than_one_window_is_refused(
    tmp_path: Path, settings: dict[str, int], message: str
) -> None:
    path = _recording(tmp_path / "r.csv", rows=60, labels=False)

    with pytest.raises(DataFormatError, match=message):
        _load(path, target_columns=("a",), **settings)


def test_windows_beyond_the_memory_bound_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shared.runtime.sensors.MAX_WINDOW_VALUES", 100)
    path = _recording(tmp_path / "r.csv", rows=60)

    with pytest.raises(DataFormatError, match="raise stride"):
        _load(path, label_column="label", window=10, stride=1)
    assert MAX_WINDOW_VALUES > 100


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_column": "l", "target_columns": ("t",)}, "exclude each other"),
        ({"target_columns": ("t",), "horizon": 3}, "horizon needs window"),
        ({"target_columns": ("t", "u"), "window": 4, "horizon": 3}, "exactly one target"),
        ({"target_columns": ("t",), "label_names": ("a",)}, "label-names needs label-column"),
        ({"window": -1}, "window must be ≥ 0"),
        ({"max_rows": 0}, "max-rows must be ≥ 1"),
    ],
)
def test_contradictory_settings_are_refused_by_name(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SensorSource(**settings)


# --- normalisation and the split ---------------------------------------------------------------
def test_normalisation_uses_the_training_split_only_and_applies_it_to_validation(
    tmp_path: Path,
) -> None:
    path = _recording(tmp_path / "r.csv", rows=100)
    source = SensorSource(columns=("a", "b"), label_column="label", window=10)
    data = load_sensor_data(path, source, now=NOW)

    train, val = split_and_normalize(data, source, 0.2, np.random.default_rng(0))

    assert val is not None and (len(train), len(val)) == (8, 2)
    assert np.allclose(train.x.mean(axis=(0, 2)), 0.0, atol=1e-5)
    assert np.allclose(train.x.std(axis=(0, 2)), 1.0, atol=1e-5)
    # The validation windows are the most recent ones, scaled with the training statistics.
    raw_mean, raw_std = data.x[:8].mean(axis=(0, 2)), data.x[:8].std(axis=(0, 2))
    assert np.allclose(val.x[-1, :, -1], (data.x[-1, :, -1] - raw_mean) / raw_std, atol=1e-4)


def test_a_constant_channel_is_not_divided_by_zero(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "a,b,label", [f"{i},5,0" for i in range(10)])
    source = SensorSource(label_column="label")

    train, _ = split_and_normalize(load_sensor_data(path, source, NOW), source, 0.0, RNG)

    assert np.isfinite(train.x).all() and (train.x[:, 1] == 0).all()


def test_no_normalize_keeps_the_readings(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", "a,label", ["100,0", "300,1"])
    source = SensorSource(label_column="label", normalize=False)

    train, _ = split_and_normalize(load_sensor_data(path, source, NOW), source, 0.0, RNG)

    assert train.x.ravel().tolist() == [100, 300]


# --- growing directories -----------------------------------------------------------------------
def _aged(path: Path, age_s: float) -> Path:
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_a_directory_gives_its_files_windows_oldest_first_never_across_files(
    tmp_path: Path,
) -> None:
    _aged(_recording(tmp_path / "b.csv", rows=20, start=1000), age_s=10)
    _aged(_recording(tmp_path / "a.csv", rows=20, start=0), age_s=20)

    ds = _load(tmp_path, columns=("a",), label_column="label", window=10)

    assert [int(w[0, 0]) for w in ds.x] == [0, 10, 1000, 1010]


def test_only_the_newest_files_within_count_and_age_are_read(tmp_path: Path) -> None:
    for i, age in enumerate((300, 200, 100, 5)):
        _aged(_recording(tmp_path / f"f{i}.csv", rows=10, start=100 * i), age_s=age)
    _aged(_recording(tmp_path / ".writing.csv", rows=10), age_s=0)  # a file being written
    (tmp_path / "notes.txt").write_text("not data")

    by_count = recent_files(tmp_path, SensorSource(label_column="label", recent_files=2), NOW)
    by_age = recent_files(tmp_path, SensorSource(label_column="label", recent_max_age_s=150), NOW)

    assert [p.name for p in by_count] == ["f2.csv", "f3.csv"]
    assert [p.name for p in by_age] == ["f2.csv", "f3.csv"]


def test_older_files_beyond_max_rows_are_left_out(tmp_path: Path) -> None:
    for i, age in enumerate((30, 20, 10)):
        _aged(_recording(tmp_path / f"f{i}.csv", rows=10, start=100 * i), age_s=age)

    ds = _load(tmp_path, columns=("a",), label_column="label", max_rows=25)

    assert sorted({int(v) // 100 for v in ds.x[:, 0]}) == [1, 2]  # f0 is over the budget


def test_a_directory_with_nothing_in_the_window_has_no_data_yet(tmp_path: Path) -> None:
    _aged(_recording(tmp_path / "old.csv", rows=10), age_s=1000)

    with pytest.raises(NoDataYet, match="newer than 60s"):
        _load(tmp_path, label_column="label", recent_max_age_s=60)
