"""On-device inference with onnxruntime: no torch, no training stack.

Classifiers answer class ids and confidences, regression models their values; built-in and
plugin models alike (the ONNX frame's header says the sample shape and the task).
Used by ``fedmq-agent predict`` (predict files) and ``fedmq-agent serve``
(:mod:`edge_agent.serve`: answer prediction requests over MQTT). Imports numpy, onnxruntime
and the protocol modules only (never torch or :mod:`shared.runtime` beyond its data loaders),
so a Pi that only infers needs the ``inference`` extra and ~10x less memory than a training agent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.protocol.onnx_frame import OnnxHeader, decode_onnx_frame, is_onnx_frame, sha256
from shared.runtime.data import load_device_data

log = logging.getLogger("fedmq.inference")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
MAX_BATCH = 4096


class InferenceError(ValueError):
    """A model or an input cannot be used for inference."""


@dataclass(frozen=True)
class Predictions:
    """A batch's predictions: class ids and their softmax confidence (classification), or the
    predicted values, ``(N, outputs)`` (regression)."""

    labels: np.ndarray | None = None
    confidence: np.ndarray | None = None
    values: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of samples predicted."""
        found = self.values if self.values is not None else self.labels
        return 0 if found is None else len(found)

    def as_json(self) -> dict[str, Any]:
        """The ``predictions`` (and ``confidence``) of a JSON reply: a classifier's answer is
        unchanged (class ids, confidences), a regression model's is a list of values per sample.
        """
        if self.values is not None:
            return {"predictions": [[float(v) for v in row] for row in self.values]}
        assert self.labels is not None and self.confidence is not None
        return {
            "predictions": [int(p) for p in self.labels],
            "confidence": [round(float(c), 6) for c in self.confidence],
        }


def concat(parts: list[Predictions]) -> Predictions:
    """Predictions of consecutive batches as one."""
    if parts and parts[0].values is not None:
        return Predictions(values=np.concatenate([p.values for p in parts if p.values is not None]))
    labels = [p.labels for p in parts if p.labels is not None]
    conf = [p.confidence for p in parts if p.confidence is not None]
    return Predictions(labels=np.concatenate(labels), confidence=np.concatenate(conf))


class OnnxModel:
    """An onnxruntime session over one verified model: a classifier (labels + confidence) or
    a regression model (values), as its frame's header says (a bare ``.onnx``: ``task``)."""

    def __init__(
        self,
        onnx: bytes,
        header: OnnxHeader | None = None,
        threads: int = 1,
        task: str = "classification",
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise InferenceError(f"onnxruntime cannot load the model: {exc}") from exc
        self.header = header
        self.task = header.task if header else task
        self.sha256 = sha256(onnx)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape: tuple[int, ...] = (
            tuple(header.input_shape) if header else _static_shape(self.session)
        )

    @classmethod
    def from_bytes(cls, data: bytes, threads: int = 1, task: str = "classification") -> OnnxModel:
        """A raw ``.onnx`` file (a ``task`` model) or a fedmq ONNX frame (verified against its
        SHA-256; its header names the task)."""
        if is_onnx_frame(data):
            frame = decode_onnx_frame(data)
            return cls(frame.onnx, frame.header, threads)
        return cls(data, None, threads, task)

    def predict(self, x: np.ndarray) -> Predictions:
        """Predictions for a batch (uint8 pixels 0..255 or float32 samples)."""
        batch = prepare(x, self.input_shape)
        try:
            out = self.session.run(None, {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidArgument errors
            raise InferenceError(f"onnxruntime could not run the model: {exc}") from exc
        out = np.asarray(out).reshape(len(batch), -1)
        if self.task == "regression":
            return Predictions(values=out.astype(np.float32, copy=False))
        z = out - out.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        labels = probs.argmax(axis=1)
        return Predictions(labels=labels, confidence=probs[np.arange(len(labels)), labels])

    def describe(self) -> dict[str, Any]:
        """Identity of the model being served (for responses and logs)."""
        h = self.header
        return {
            "round": h.round if h else None,
            "model_hash": h.model_hash if h else None,
            "onnx_sha256": self.sha256,
        }


def _static_shape(session: Any) -> tuple[int, ...]:
    dims = session.get_inputs()[0].shape[1:]
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) for d in dims):
        raise InferenceError(f"model input shape {dims} is not a static shape of 1 to 3 dims")
    return tuple(dims)


def prepare(
    x: np.ndarray, input_shape: tuple[int, ...], max_batch: int | None = MAX_BATCH
) -> np.ndarray:
    """A float32 ``(N, *input_shape)`` batch from uint8 pixels (scaled to [0, 1]) or floats.

    Accepts one sample, a batch, N×H×W for a one-channel image model, and samples whose
    shape differs from the model's only by dimensions of size 1. ``max_batch`` bounds what
    one request may ask; local files pass None.
    """
    arr = np.asarray(x)
    want = tuple(input_shape)
    if arr.ndim == len(want):  # one sample
        arr = arr[None]
    if len(want) == 3 and arr.ndim == 3 and want[0] == 1:  # N×H×W grayscale
        arr = arr[:, None]
    if arr.ndim >= 1 and tuple(arr.shape[1:]) != want and _same_but_ones(arr.shape[1:], want):
        arr = arr.reshape(len(arr), *want)
    if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
        raise InferenceError(f"input shape {arr.shape} does not match model input {want}")
    if max_batch is not None and len(arr) > max_batch:
        raise InferenceError(f"batch of {len(arr)} exceeds {max_batch}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InferenceError("input has non-finite values")
    return out


def _same_but_ones(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return [d for d in got if d != 1] == [d for d in want if d != 1]


# --- inputs from files ------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """Samples to predict, their names, and their labels (int) or targets (float) when the
    files carry them."""

    x: np.ndarray
    names: list[str]
    labels: np.ndarray | None


def load_inputs(paths: list[Path], input_shape: tuple[int, ...]) -> Inputs:
    """Read .npz / IDX files and images (files or directories, via PIL) into one batch."""
    xs: list[np.ndarray] = []
    names: list[str] = []
    ys: list[np.ndarray | None] = []
    for path in paths:
        images = _image_files(path)
        if images:
            xs.append(np.stack([_read_image(f, input_shape) for f in images]))
            names += [str(f) for f in images]
            ys.append(None)
            continue
        data = load_device_data(path)
        xs.append(prepare(data.x, input_shape, max_batch=None))
        names += [f"{path}[{i}]" for i in range(len(data))]
        ys.append(data.y)
    if not xs:
        raise InferenceError("no inputs")
    known = [y for y in ys if y is not None]
    same_kind = len(known) == len(ys) and len({y.dtype.kind for y in known}) == 1
    return Inputs(np.concatenate(xs), names, np.concatenate(known) if same_kind else None)


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
    if path.is_dir() and not any(p.name.endswith(("ubyte", "ubyte.gz")) for p in path.iterdir()):
        return sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    return []


def _read_image(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    if len(input_shape) != 3:
        raise InferenceError(f"{path}: an image, but the model takes {input_shape} samples")
    try:
        from PIL import Image
    except ImportError:
        raise InferenceError(f"{path}: reading images needs Pillow (pip install pillow)") from None
    channels, height, width = input_shape
    with Image.open(path) as img:
        sized = img.convert("L" if channels == 1 else "RGB").resize((width, height))
        arr = np.asarray(sized, dtype=np.float32) / np.float32(255.0)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)
