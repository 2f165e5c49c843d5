"""ONNX export (parity with torch), ONNX frames, and the torch-free predict path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.downloads import model_frame
from aggregator.onnx_export import PARITY_TOLERANCE, export_verified
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import OnnxFrameError, decode_onnx_frame
from shared.protocol.topics import Topics, parse
from shared.runtime.data import ArrayDataset, save_npz

REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10)


@pytest.fixture(scope="module")
def lenet_export():  # type: ignore[no-untyped-def]
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(3)
    params = get_params(build_model("lenet5"))
    batch = np.random.default_rng(0).uniform(0, 1, size=(32, 1, 28, 28)).astype(np.float32)
    done = export_verified(SPEC, params, federation="fed", round_id=4, batch=batch)
    return params, batch, done


def test_lenet5_onnx_logits_match_torch(lenet_export) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    import torch

    from shared.runtime.modelio import set_params
    from shared.runtime.models import build_model

    params, batch, done = lenet_export
    model = build_model("lenet5").eval()
    set_params(model, params)
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(done.onnx, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": batch})[0]

    assert np.max(np.abs(got - want)) <= PARITY_TOLERANCE
    assert (got.argmax(1) == want.argmax(1)).all()
    assert done.parity.max_abs_diff <= PARITY_TOLERANCE and done.parity.same_argmax
    assert session.run(None, {"input": batch[:3]})[0].shape == (3, 10)  # dynamic batch axis


def test_onnx_frame_round_trips_and_names_the_model(lenet_export) -> None:  # type: ignore[no-untyped-def]
    _, _, done = lenet_export

    frame = decode_onnx_frame(done.frame, federation="fed")

    assert frame.onnx == done.onnx
    assert frame.header.round == 4 and frame.header.input_shape == (1, 28, 28)
    assert frame.header.num_classes == 10 and frame.header.arch == "lenet5"


def test_tampered_onnx_frame_is_rejected(lenet_export) -> None:  # type: ignore[no-untyped-def]
    _, _, done = lenet_export
    tampered = bytearray(done.frame)
    tampered[-10] ^= 0xFF

    with pytest.raises(OnnxFrameError, match="sha256"):
        decode_onnx_frame(bytes(tampered))
    with pytest.raises(OnnxFrameError, match="federation"):
        decode_onnx_frame(done.frame, federation="other")


def test_onnx_topic_is_built_and_parsed() -> None:
    topic = Topics("fed").global_onnx

    assert topic == "fl/v1/fed/global/onnx"
    assert parse(topic).kind == "global_onnx"


def test_export_command_writes_onnx_from_saved_frame(lenet_export, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from aggregator.ops.cli import main

    params, _, _ = lenet_export
    saved = tmp_path / "global_model.fmq"
    saved.write_bytes(model_frame("fed", 2, SPEC, params))

    code = main(["export", str(saved), "--out", str(tmp_path / "m.onnx")])

    assert code == 0
    assert (tmp_path / "m.onnx").read_bytes()[:2] != b"FM"  # plain ONNX protobuf


def test_predict_command_classifies_npz(lenet_export, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, batch, done = lenet_export
    (tmp_path / "m.onnx").write_bytes(done.frame)  # a fedmq frame is accepted too
    labels = _labels(done.onnx, batch)
    save_npz(tmp_path / "d.npz", ArrayDataset((batch * 255).round().astype(np.uint8), labels))
    env = dict(os.environ, PYTHONPATH=str(REPO))

    model, data = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz")

    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "predict", "--model", model, data],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )

    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(batch)
    predicted = [int(line.split("\t")[1]) for line in lines]
    assert np.mean(np.array(predicted) == labels) > 0.9  # uint8 rounding may flip a few
    assert "32 samples" in out.stderr


def _labels(onnx: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": batch})[0].argmax(1), dtype=np.int64)


def test_predict_command_handles_files_larger_than_one_request_batch(  # type: ignore[no-untyped-def]
    lenet_export, tmp_path: Path
) -> None:
    from edge_agent.inference import MAX_BATCH

    _, _, done = lenet_export
    (tmp_path / "m.onnx").write_bytes(done.onnx)
    n = MAX_BATCH + 10
    x = np.random.default_rng(1).integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
    save_npz(tmp_path / "big.npz", ArrayDataset(x, np.zeros(n, dtype=np.int64)))

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "predict",
            "--model",
            str(tmp_path / "m.onnx"),
            str(tmp_path / "big.npz"),
            "--limit",
            "0",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        timeout=120,
    )

    assert out.returncode == 0, out.stderr
    assert f"{n} samples" in out.stderr
