"""On-device inference with onnxruntime: no torch, no training stack.

Used by ``fedmq-agent predict`` (classify files) and ``fedmq-agent serve``
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


class OnnxClassifier:
    """An onnxruntime session over one verified model; ``predict`` returns labels + confidence."""

    def __init__(self, onnx: bytes, header: OnnxHeader | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise InferenceError(f"onnxruntime cannot load the model: {exc}") from exc
        self.header = header
        self.sha256 = sha256(onnx)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = header.input_shape if header else _static_shape(self.session)

    @classmethod
    def from_bytes(cls, data: bytes, threads: int = 1) -> OnnxClassifier:
        """A raw ``.onnx`` file or a fedmq ONNX frame (verified against its SHA-256)."""
        if is_onnx_frame(data):
            frame = decode_onnx_frame(data)
            return cls(frame.onnx, frame.header, threads)
        return cls(data, None, threads)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class ids and softmax confidence for a batch (uint8 0..255 or float in [0, 1])."""
        batch = prepare(x, self.input_shape)
        try:
            logits = self.session.run(None, {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidArgument errors
            raise InferenceError(f"onnxruntime could not run the model: {exc}") from exc
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        labels = probs.argmax(axis=1)
        return labels, probs[np.arange(len(labels)), labels]

    def describe(self) -> dict[str, Any]:
        """Identity of the model being served (for responses and logs)."""
        h = self.header
        return {
            "round": h.round if h else None,
            "model_hash": h.model_hash if h else None,
            "onnx_sha256": self.sha256,
        }


def _static_shape(session: Any) -> tuple[int, int, int]:
    dims = session.get_inputs()[0].shape[1:]
    if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
        raise InferenceError(f"model input shape {dims} is not a static C,H,W")
    return (dims[0], dims[1], dims[2])


def prepare(
    x: np.ndarray, input_shape: tuple[int, int, int], max_batch: int | None = MAX_BATCH
) -> np.ndarray:
    """A float32 N×C×H×W batch in [0, 1] from uint8 pixels or floats, with checks.

    ``max_batch`` bounds what one request may ask; local files pass None.
    """
    arr = np.asarray(x)
    if arr.ndim == len(input_shape):  # one sample
        arr = arr[None]
    if arr.ndim == 3 and input_shape[0] == 1:  # N×H×W grayscale
        arr = arr[:, None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(input_shape):
        raise InferenceError(f"input shape {arr.shape} does not match model input {input_shape}")
    if max_batch is not None and len(arr) > max_batch:
        raise InferenceError(f"batch of {len(arr)} exceeds {max_batch}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InferenceError("input has non-finite values")
    return out


# --- inputs from files ------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """Samples to classify, their names, and labels when the files carry them."""

    x: np.ndarray
    names: list[str]
    labels: np.ndarray | None


def load_inputs(paths: list[Path], input_shape: tuple[int, int, int]) -> Inputs:
    """Read .npz / IDX files and images (files or directories, via PIL) into one batch."""
    xs: list[np.ndarray] = []
    names: list[str] = []
    labels: list[np.ndarray] = []
    for path in paths:
        images = _image_files(path)
        if images:
            xs.append(np.stack([_read_image(f, input_shape) for f in images]))
            names += [str(f) for f in images]
            labels.append(np.full(len(images), -1))
            continue
        data = load_device_data(path)
        xs.append(prepare(data.x, input_shape, max_batch=None))
        names += [f"{path}[{i}]" for i in range(len(data))]
        labels.append(data.y)
    if not xs:
        raise InferenceError("no inputs")
    y = np.concatenate(labels)
    return Inputs(np.concatenate(xs), names, y if (y >= 0).all() else None)


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
    if path.is_dir() and not any(p.name.endswith(("ubyte", "ubyte.gz")) for p in path.iterdir()):
        return sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    return []


def _read_image(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise InferenceError(f"{path}: reading images needs Pillow (pip install pillow)") from None
    channels, height, width = input_shape
    with Image.open(path) as img:
        sized = img.convert("L" if channels == 1 else "RGB").resize((width, height))
        arr = np.asarray(sized, dtype=np.float32) / np.float32(255.0)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)
