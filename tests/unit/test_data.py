"""Unit tests for datasets, on-device formats and partitioners (generated data only)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.ops.datasets import (
    load_named_dataset,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from shared.runtime.data import (
    ArrayDataset,
    DataFormatError,
    load_device_data,
    read_idx,
    save_npz,
    train_val_split,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in IDX format (magic 0x0000080N, big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_pair(
    directory: Path, prefix: str, n: int, gz: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write ``<prefix>-images-idx3-ubyte`` / ``-labels-idx1-ubyte`` and return the arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = _idx_bytes(array)
        path = directory / f"{prefix}-{kind}-ubyte{suffix}"
        path.write_bytes(gzip.compress(data) if gz else data)
    return images, labels


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


# ------------------------------------------------------------------ ArrayDataset


def test_dataset_reports_shape_classes_and_length() -> None:
    ds = ArrayDataset(np.zeros((4, 3, 8, 9), np.uint8), np.array([0, 4, 2, 1]))

    assert (len(ds), ds.num_classes, ds.input_shape) == (4, 5, (3, 8, 9))


def test_dataset_stores_labels_as_int64() -> None:
    ds = ArrayDataset(np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 1], dtype=np.uint8))

    assert ds.y.dtype == np.int64


def test_as_float_scales_uint8_to_unit_interval() -> None:
    ds = ArrayDataset(np.full((1, 1, 2, 2), 255, np.uint8), np.array([0]))

    out = ds.as_float()

    assert out.dtype == np.float32
    assert out.max() == pytest.approx(1.0)


def test_subset_selects_matching_images_and_labels() -> None:
    x = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    ds = ArrayDataset(x, np.arange(5))

    sub = ds.subset(np.array([3, 1]))

    assert sub.x.ravel().tolist() == [3, 1]
    assert sub.y.tolist() == [3, 1]


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros(3, np.uint8), np.zeros(3, np.int64), "1 to 3 dims"),
        (np.zeros((1, 1, 1, 2, 2), np.uint8), np.zeros(1, np.int64), "1 to 3 dims"),
        (np.zeros((3, 1, 2, 2), np.uint8), np.zeros(2, np.int64), "lengths differ"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.array(["a", "b"]), "integer"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.zeros((2, 2), np.int64), "1-D"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.array([0.5, np.nan]), "finite"),
        (np.zeros((2, 4), np.float32), np.zeros((2, 2, 2), np.float32), r"\(N, outputs\)"),
        (np.full((2, 4), np.inf, np.float32), np.zeros(2, np.int64), "finite"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.array([0, -1]), ">= 0"),
        (np.full((1, 1, 2, 2), 255.0, np.float32), np.zeros(1, np.int64), r"\[0, 1\]"),
        (np.zeros((1, 1, 2, 2), np.int32), np.zeros(1, np.int64), "uint8"),
    ],
)
def test_dataset_rejects_malformed_arrays(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        ArrayDataset(x, y)


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 1, 5, 4), (6, 3, 5, 4)])
def test_npz_round_trip_preserves_data(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    y = np.arange(6)
    np.savez(tmp_path / "d.npz", x=x, y=y)

    ds = load_device_data(tmp_path / "d.npz")

    expected = x[:, None] if len(shape) == 3 else x
    assert np.array_equal(ds.x, expected)
    assert np.array_equal(ds.y, y)


def test_save_npz_output_loads_back_identically(tmp_path: Path) -> None:
    ds = ArrayDataset(np.random.default_rng(1).random((3, 1, 4, 4), np.float32), np.arange(3))

    save_npz(tmp_path / "sub" / "dev.npz", ds)
    loaded = load_device_data(tmp_path / "sub" / "dev.npz")

    assert np.array_equal(loaded.x, ds.x)
    assert np.array_equal(loaded.y, ds.y)


def test_npz_without_labels_is_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 2, 2), np.uint8))

    with pytest.raises(DataFormatError, match="'y'"):
        load_device_data(tmp_path / "d.npz")


def test_corrupt_npz_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"not a zip file")

    with pytest.raises(DataFormatError, match=r"d\.npz"):
        load_device_data(tmp_path / "d.npz")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_is_parsed(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_idx_pair(tmp_path, "train", 7, gz=gz)

    ds = load_device_data(tmp_path)

    assert np.array_equal(ds.x[:, 0], images)
    assert np.array_equal(ds.y, labels)


def test_idx_directory_prefers_train_pair(tmp_path: Path) -> None:
    _write_idx_pair(tmp_path, "t10k", 3, seed=1)
    _, train_labels = _write_idx_pair(tmp_path, "train", 9, seed=2)

    ds = load_device_data(tmp_path)

    assert np.array_equal(ds.y, train_labels)


def test_idx_images_path_finds_its_labels_sibling(tmp_path: Path) -> None:
    _write_idx_pair(tmp_path, "train", 9, seed=2)
    _, test_labels = _write_idx_pair(tmp_path, "t10k", 4, gz=True, seed=1)

    ds = load_device_data(tmp_path / "t10k-images-idx3-ubyte.gz")

    assert np.array_equal(ds.y, test_labels)


def test_idx_bad_magic_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)

    with pytest.raises(DataFormatError, match="magic"):
        read_idx(tmp_path / "bad.idx")


def test_truncated_idx_is_rejected(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "short.idx").write_bytes(data[:-5])

    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(tmp_path / "short.idx")


def test_idx_length_mismatch_between_images_and_labels_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((4, 2, 2), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))

    with pytest.raises(DataFormatError, match="4 images"):
        load_device_data(tmp_path)


# ------------------------------------------------------------------- ImageFolder


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_grayscale_image_folder_loads_one_channel(tmp_path: Path) -> None:
    for i, cls in enumerate(["cat", "dog", "dog"]):
        _write_png(tmp_path / cls / f"{i}.png", np.full((6, 4), 40 * i, np.uint8))

    ds = load_device_data(tmp_path)

    assert ds.x.shape == (3, 1, 6, 4)
    assert ds.y.tolist() == [0, 1, 1]
    assert ds.x[2, 0, 0, 0] == 80


def test_colour_image_folder_loads_rgb_channels_first(tmp_path: Path) -> None:
    pixel = np.zeros((5, 5, 3), np.uint8)
    pixel[..., 2] = 200
    _write_png(tmp_path / "a" / "x.png", pixel)
    _write_png(tmp_path / "b" / "y.png", np.zeros((5, 5), np.uint8))

    ds = load_device_data(tmp_path)

    assert ds.x.shape == (2, 3, 5, 5)
    assert ds.x[0, 2, 0, 0] == 200


def test_image_folder_with_mixed_sizes_is_rejected(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "x.png", np.zeros((5, 5), np.uint8))
    _write_png(tmp_path / "b" / "y.png", np.zeros((6, 5), np.uint8))

    with pytest.raises(DataFormatError, match="same size"):
        load_device_data(tmp_path)


def test_unrecognised_path_error_names_path_and_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(DataFormatError, match=r"notes\.txt.*npz"):
        load_device_data(tmp_path / "notes.txt")


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        load_device_data(tmp_path / "absent")


# ---------------------------------------------------------------- named datasets


def test_named_dataset_loads_from_explicit_torchvision_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _, labels = _write_idx_pair(raw, "t10k", 5, gz=True)

    ds = load_named_dataset("mnist", train=False, root=tmp_path)

    assert np.array_equal(ds.y, labels)


def test_unknown_named_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_named_dataset("cifar-1000", train=True)


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_expected_shapes() -> None:
    train = load_named_dataset("fmnist", train=True)
    test = load_named_dataset("fashion-mnist", train=False)

    assert train.x.shape == (60000, 1, 28, 28)
    assert len(test) == 10000
    assert train.num_classes == 10


# ------------------------------------------------------------------ partitioners


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_is_a_disjoint_cover(scheme: str) -> None:
    labels = _labels(1003)

    parts = partition(labels, 7, scheme, np.random.default_rng(0))

    assert len(parts) == 7
    _assert_disjoint_cover(parts, 1003)


def test_iid_partition_sizes_differ_by_at_most_one() -> None:
    parts = partition_iid(_labels(1003), 10, np.random.default_rng(0))

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skews_label_distribution() -> None:
    labels = _labels(5000)

    parts = partition_dirichlet(labels, 10, alpha=0.05, rng=np.random.default_rng(0))

    # With alpha -> 0 each client is dominated by few classes; IID would give ~10%.
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.5


def test_dirichlet_large_alpha_is_close_to_uniform() -> None:
    labels = _labels(5000)

    parts = partition_dirichlet(labels, 5, alpha=1000.0, rng=np.random.default_rng(0))

    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert max(top_share) < 0.2


def test_dirichlet_honours_min_size() -> None:
    labels = _labels(2000)
    # Seed 14's first draw leaves a client with only 46 samples, so this exercises resampling.
    unconstrained = partition_dirichlet(labels, 10, 0.3, np.random.default_rng(14), min_size=0)

    parts = partition_dirichlet(labels, 10, 0.3, np.random.default_rng(14), min_size=60)

    assert min(len(p) for p in unconstrained) < 60
    assert min(len(p) for p in parts) >= 60


def test_dirichlet_gives_up_with_clear_error_when_min_size_unreachable() -> None:
    labels = np.zeros(100, np.int64)  # one class: a tiny alpha puts it all on one client

    with pytest.raises(ValueError, match="raise alpha"):
        partition_dirichlet(labels, 4, 1e-4, np.random.default_rng(0), min_size=20, max_retries=5)


def test_dirichlet_is_reproducible_for_a_seed() -> None:
    labels = _labels()

    first = partition_dirichlet(labels, 5, 0.5, np.random.default_rng(7))
    second = partition_dirichlet(labels, 5, 0.5, np.random.default_rng(7))

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_shards_give_each_client_few_labels() -> None:
    labels = np.repeat(np.arange(10), 100)

    parts = partition_shards(labels, 10, 2, np.random.default_rng(0))

    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 2000, "scheme": "iid"}, "cannot split"),
        ({"num_clients": 5, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 5, "scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
        ({"num_clients": 500, "scheme": "shards", "shards_per_client": 3}, "shards"),
        ({"num_clients": 5, "scheme": "pathological"}, "unknown partition scheme"),
    ],
)
def test_partition_rejects_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(_labels(), rng=np.random.default_rng(0), **kwargs)


def test_dirichlet_rejects_min_size_larger_than_data_allows() -> None:
    with pytest.raises(ValueError, match="cannot give each"):
        partition_dirichlet(_labels(100), 10, 0.5, np.random.default_rng(0), min_size=11)


def test_partition_rejects_non_integer_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        partition_iid(np.zeros(10, np.float32), 2, np.random.default_rng(0))


# ---------------------------------------------------------------- train/val split


def test_train_val_split_is_disjoint_with_requested_size() -> None:
    ds = ArrayDataset(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1), np.arange(50))

    train, val = train_val_split(ds, 0.2, np.random.default_rng(0))

    assert (len(train), len(val)) == (40, 10)
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(50))


def test_train_val_split_rejects_fraction_of_one() -> None:
    ds = ArrayDataset(np.zeros((4, 1, 1, 1), np.uint8), np.arange(4))

    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(ds, 1.0, np.random.default_rng(0))


def test_importing_data_module_does_not_import_torch() -> None:
    code = "import sys, shared.runtime.data; print(sorted({'torch', 'PIL'} & set(sys.modules)))"

    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )

    assert out.stdout.strip() == "[]"


# ------------------------------------------------------- sensor samples and regression


@pytest.mark.parametrize("shape", [(5, 3, 16), (5, 7)])
def test_float_sensor_samples_may_take_any_finite_value(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).normal(50.0, 20.0, size=shape).astype(np.float32)

    ds = ArrayDataset(x, np.arange(5))

    assert ds.input_shape == shape[1:]


def test_float_targets_make_a_regression_dataset() -> None:
    ds = ArrayDataset(np.zeros((3, 4), np.float32), np.array([[1.0, 2.0]] * 3))

    assert (ds.task, ds.num_outputs, ds.num_classes, ds.y.dtype) == (
        "regression",
        2,
        0,
        np.float32,
    )


def test_integer_labels_make_a_classification_dataset() -> None:
    ds = ArrayDataset(np.zeros((3, 4), np.float32), np.array([0, 2, 1]))

    assert (ds.task, ds.num_classes) == ("classification", 3)


@pytest.mark.parametrize(
    ("stored", "model"), [((1, 3, 16), (3, 16)), ((3, 16), (1, 3, 16)), ((28, 28), (1, 28, 28))]
)
def test_samples_differing_by_unit_dimensions_fit_the_model(
    stored: tuple[int, ...], model: tuple[int, ...]
) -> None:
    ds = ArrayDataset(np.zeros((2, *stored), np.float32), np.zeros(2, np.int64))

    assert ds.shaped(model).input_shape == model


def test_samples_of_another_shape_do_not_fit_the_model() -> None:
    ds = ArrayDataset(np.zeros((2, 3, 16), np.float32), np.zeros(2, np.int64))

    with pytest.raises(DataFormatError, match=r"\(3, 16\) do not fit the model's input \(3, 8\)"):
        ds.shaped((3, 8))


def test_npz_of_sensor_windows_keeps_its_shape(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(0.0, 5.0, size=(6, 3, 16)).astype(np.float32)
    np.savez(tmp_path / "w.npz", x=x, y=np.linspace(0.0, 1.0, 6))

    ds = load_device_data(tmp_path / "w.npz")

    assert ds.input_shape == (3, 16) and ds.task == "regression"
