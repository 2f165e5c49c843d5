"""On-device data: the formats a device may hold (npz, IDX, image folders), and splits.

Only numpy is imported at module load: torch, torchvision and PIL are imported
inside the few functions that need them, because an edge device that merely
reports its status must not pay the start-up cost of ``import torch``.
"""

from __future__ import annotations

import gzip
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

ACCEPTED_FORMATS = (
    "a .npz file with arrays 'x' (N,H,W), (N,C,H,W), (N,C,L) or (N,F) and 'y' (N,) labels "
    "or float targets; "
    "IDX files (a directory with *images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz], "
    "or the path of the images file); "
    "an image folder in torchvision ImageFolder layout (root/<class>/<image>)"
)


class DataFormatError(ValueError):
    """Raised when data on disk (or in memory) is not in an accepted format."""


Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class ArrayDataset:
    """An in-memory dataset: samples ``x`` and their labels or targets ``y``.

    ``x`` is ``(N, *sample)`` with a sample of 1 to 3 dimensions: an image ``(C, H, W)``, a
    sensor window ``(C, L)``, a feature vector ``(F,)``. It is uint8 (pixels, scaled to
    ``[0, 1]`` for training) or floating point. Floating-point *images* (4-D ``x``) must lie in
    ``[0, 1]`` (unscaled 0..255 pixels would silently wreck training); other floating-point
    samples, e.g. sensor readings, may take any finite value.

    ``y`` says the task: integer labels ``>= 0`` (classification, stored as int64, ``(N,)``)
    or floating-point targets (regression, stored as float32, ``(N,)`` or ``(N, outputs)``).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        """Validate shapes and dtypes so that bad data fails here, not mid-training."""
        x, y = np.asarray(self.x), np.asarray(self.y)
        if not 2 <= x.ndim <= 4:
            raise DataFormatError(
                f"x must be (N, *sample) with a sample of 1 to 3 dims, e.g. 4-D (N, C, H, W), "
                f"got shape {x.shape}"
            )
        if len(x) != len(y):
            raise DataFormatError(f"x and y lengths differ: {len(x)} samples vs {len(y)} labels")
        _check_x(x)
        floating = np.issubdtype(y.dtype, np.floating)
        y = _regression_targets(y) if floating else _class_labels(y)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.y)

    @property
    def task(self) -> Task:
        """``regression`` when ``y`` holds floating-point targets, else ``classification``."""
        return "regression" if self.y.dtype == np.float32 else "classification"

    @property
    def num_classes(self) -> int:
        """Largest label plus one (0 for an empty or a regression dataset)."""
        if self.task == "regression" or not len(self.y):
            return 0
        return int(self.y.max()) + 1

    @property
    def num_outputs(self) -> int:
        """Targets per sample of a regression dataset (1 for ``(N,)`` targets)."""
        return int(self.y.shape[1]) if self.y.ndim == 2 else 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape, e.g. ``(C, H, W)``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The samples at positions ``idx`` (copied, so the parent can be freed)."""
        return ArrayDataset(self.x[idx], self.y[idx])

    def as_float(self) -> np.ndarray:
        """``x`` as float32 (uint8 pixels scaled to ``[0, 1]``)."""
        if self.x.dtype == np.uint8:
            return self.x.astype(np.float32) / np.float32(255.0)
        return self.x.astype(np.float32, copy=False)

    def shaped(self, input_shape: tuple[int, ...]) -> ArrayDataset:
        """This data with samples of shape ``input_shape`` (a model's), without copying.

        The shapes may differ only by dimensions of size 1, e.g. ``(1, C, L)`` samples for a
        ``(C, L)`` model; anything else raises :class:`DataFormatError` naming both.
        """
        want = tuple(int(d) for d in input_shape)
        if self.input_shape == want:
            return self
        if [d for d in self.input_shape if d != 1] != [d for d in want if d != 1]:
            raise DataFormatError(
                f"samples of shape {self.input_shape} do not fit the model's input {want}"
            )
        return ArrayDataset(self.x.reshape(len(self.x), *want), self.y)


def _check_x(x: np.ndarray) -> None:
    """Refuse sample values training cannot use (see :class:`ArrayDataset`)."""
    if np.issubdtype(x.dtype, np.floating):
        if len(x) and not np.isfinite(x).all():
            raise DataFormatError("float x must be finite (no NaN or infinity)")
        # A float image outside [0, 1] is almost always unscaled 0..255 pixels or
        # already-normalised data; either would silently wreck training.
        if x.ndim == 4 and len(x) and not (x.min() >= 0.0 and x.max() <= 1.0):
            raise DataFormatError("float x must be finite and scaled to [0, 1]")
    elif x.dtype != np.uint8:
        raise DataFormatError(f"x must be uint8 or floating point, got {x.dtype}")


def _class_labels(y: np.ndarray) -> np.ndarray:
    """``y`` as int64 class labels, or DataFormatError."""
    if y.ndim != 1:
        raise DataFormatError(f"labels y must be 1-D (N,), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(
            f"y must have an integer dtype (labels) or a float one (targets), got {y.dtype}"
        )
    if len(y) and int(y.min()) < 0:
        raise DataFormatError(f"labels must be >= 0, found {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _regression_targets(y: np.ndarray) -> np.ndarray:
    """``y`` as float32 regression targets, or DataFormatError."""
    if y.ndim not in (1, 2):
        raise DataFormatError(f"targets y must be (N,) or (N, outputs), got shape {y.shape}")
    out = y.astype(np.float32, copy=False)
    if len(out) and not np.isfinite(out).all():
        raise DataFormatError("targets y must be finite (no NaN or infinity)")
    return out


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IMAGES_RE = re.compile(r"^(?P<prefix>.*?)[-_.]?images[-_.]idx3[-_.]ubyte(?:\.gz)?$")
_LABELS_RE = re.compile(r"^(?P<prefix>.*?)[-_.]?labels[-_.]idx1[-_.]ubyte(?:\.gz)?$")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped, detected by content) into an array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise DataFormatError(f"{path}: truncated or invalid IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DataFormatError(
            f"{path}: IDX header declares dims {dims} ({expected} data bytes) "
            f"but the file holds {actual} data bytes (truncated or corrupt)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def load_idx_pair(images_path: Path, labels_path: Path) -> ArrayDataset:
    """Load an images/labels IDX pair into uint8 ``(N, 1, H, W)`` / int64 labels."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{images_path}: expected uint8 images of 3 dims (N,H,W), "
            f"got {images.dtype} with shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{labels_path}: expected 1-D integer labels, got {labels.shape}")
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return ArrayDataset(images[:, None, :, :], labels.astype(np.int64))


def idx_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
    """Map prefix -> (images, labels) for every complete IDX pair in ``directory``.

    Uncompressed files win over ``.gz`` twins (torchvision keeps both) because
    they load faster.
    """
    found: dict[str, dict[str, Path]] = {}
    for entry in sorted(directory.iterdir(), key=lambda p: p.name.endswith(".gz")):
        for kind, pattern in (("images", _IMAGES_RE), ("labels", _LABELS_RE)):
            match = pattern.match(entry.name)
            if match and entry.is_file():
                found.setdefault(match["prefix"], {}).setdefault(kind, entry)
    return {p: (f["images"], f["labels"]) for p, f in found.items() if len(f) == 2}


def _choose_pair(directory: Path, pairs: dict[str, tuple[Path, Path]]) -> tuple[Path, Path]:
    """Pick the single IDX pair, or the ``train`` one when several exist."""
    if len(pairs) == 1:
        return next(iter(pairs.values()))
    if "train" in pairs:
        return pairs["train"]
    raise DataFormatError(
        f"{directory}: several IDX pairs {sorted(pairs)} and none with prefix 'train'; "
        "pass the path of the images file to choose one"
    )


def _labels_sibling(images_path: Path) -> Path:
    """Find the labels IDX file that belongs to ``images_path``."""
    prefix = _IMAGES_RE.match(images_path.name)
    pairs = idx_pairs(images_path.parent)
    if prefix is None or prefix["prefix"] not in pairs:
        raise DataFormatError(f"{images_path}: no matching *labels-idx1-ubyte[.gz] file beside it")
    return pairs[prefix["prefix"]][1]


# ------------------------------------------------------------------ other formats


def _load_npz(path: Path) -> ArrayDataset:
    """Load ``x``/``y`` arrays from an ``.npz`` file, adding a channel axis if needed."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("x", "y") if key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataFormatError(f"{path}: cannot read as .npz ({exc})") from exc
    if set(arrays) != {"x", "y"}:
        raise DataFormatError(f"{path}: npz must hold arrays 'x' and 'y', found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3 and _grayscale_images(x):
        x = x[:, None, :, :]
    try:
        return ArrayDataset(x, y)
    except DataFormatError as exc:
        raise DataFormatError(f"{path}: {exc}") from exc


def _grayscale_images(x: np.ndarray) -> bool:
    """True when a 3-D ``x`` is ``(N, H, W)`` grayscale images: uint8 pixels, or floats scaled
    to ``[0, 1]``. Other 3-D arrays are ``(N, C, L)`` sensor windows and keep their shape
    (a model taking ``(C, L)`` samples accepts ``(1, C, L)`` ones too: ArrayDataset.shaped).
    """
    if x.dtype == np.uint8:
        return True
    if not np.issubdtype(x.dtype, np.floating) or not len(x):
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0)


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def _looks_like_image_folder(directory: Path) -> bool:
    """True if some subdirectory of ``directory`` holds an image file."""
    return any(
        sub.is_dir() and any(f.suffix.lower() in _IMAGE_SUFFIXES for f in sub.iterdir())
        for sub in directory.iterdir()
    )


def _load_image_folder(directory: Path) -> ArrayDataset:
    """Load a torchvision ``ImageFolder`` tree as uint8 ``(N, C, H, W)``."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        samples = ImageFolder(str(directory)).samples  # lists files; decodes nothing yet
    except (FileNotFoundError, OSError) as exc:
        raise DataFormatError(f"{directory}: not a usable ImageFolder tree ({exc})") from exc
    images = []
    for file, _ in samples:
        with Image.open(file) as img:
            img.load()
            images.append(img)
    # Only keep one channel when every image is grayscale: a single colour image
    # forces RGB so that no colour information is thrown away.
    mode = "L" if all(img.mode in _GRAY_MODES for img in images) else "RGB"
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DataFormatError(
            f"{directory}: images must all have the same size, found (H, W) sizes {sorted(sizes)}"
        )
    x = np.stack(arrays)
    x = x[:, None, :, :] if mode == "L" else x.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in samples], dtype=np.int64)
    return ArrayDataset(np.ascontiguousarray(x), y)


def load_device_data(path: str | Path) -> ArrayDataset:
    """Load a device's local dataset, detecting its format from the path.

    Accepts an ``.npz`` file, IDX files (a directory or the images file) or an
    ImageFolder tree; anything else raises :class:`DataFormatError`.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or directory; accepted: {ACCEPTED_FORMATS}")
    if path.suffix.lower() in (".csv", ".parquet"):
        raise DataFormatError(
            f"{path}: CSV/Parquet sensor data is read with its column settings (label-column "
            "or target-columns, docs/configuration.md); here give an .npz of prepared samples"
        )
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path)
    if path.is_file() and _IMAGES_RE.match(path.name):
        return load_idx_pair(path, _labels_sibling(path))
    if path.is_dir():
        pairs = idx_pairs(path)
        if pairs:
            return load_idx_pair(*_choose_pair(path, pairs))
        if _looks_like_image_folder(path):
            return _load_image_folder(path)
    raise DataFormatError(f"{path}: unrecognised data format; accepted: {ACCEPTED_FORMATS}")


def save_npz(path: str | Path, ds: ArrayDataset) -> None:
    """Write ``ds`` as a compressed ``.npz`` readable by :func:`load_device_data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=ds.x, y=ds.y)


def train_val_split(
    ds: ArrayDataset, val_fraction: float, rng: np.random.Generator
) -> tuple[ArrayDataset, ArrayDataset]:
    """Random split into (train, validation) with ``round(N * val_fraction)`` validation samples."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = rng.permutation(len(ds))
    n_val = round(len(ds) * val_fraction)
    return ds.subset(np.sort(perm[n_val:])), ds.subset(np.sort(perm[:n_val]))
