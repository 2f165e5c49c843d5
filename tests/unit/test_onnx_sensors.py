"""Plugin and regression models on the inference path: ONNX export, frames, predict, serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.onnx_export import export_verified
from edge_agent.inference import OnnxModel
from edge_agent.serve import InferenceServer, ServeConfig
from shared.clock import ManualClock
from shared.mqtt.base import Session
from shared.mqtt.memory import MemoryBroker
from shared.protocol.claims import sign_onnx_header, verify_onnx_frame
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import decode_onnx_frame
from shared.protocol.signing import generate_keypair
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset, save_npz
from shared.runtime.plugins import PLUGINS_ENV
from tests.synthetic import WINDOW_SHAPE, make_windows

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "cnn1d=tests.plugin_models:cnn1d"
CLASSES = ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, num_classes=3)
VALUES = ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, task="regression", num_outputs=2)


@pytest.fixture(autouse=True)
def _plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)


def _export(spec: ModelSpec, scale: float = 1.0) -> bytes:
    """A verified ONNX frame of a freshly built ``spec`` (weights scaled by ``scale``)."""
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.plugins import build_from_spec

    torch.manual_seed(0)
    params = {n: v * scale for n, v in get_params(build_from_spec(spec)).items()}
    batch = make_windows(16, seed=5).x
    return export_verified(spec, params, federation="fed", round_id=2, batch=batch).frame


def test_a_plugin_classifier_exports_and_predicts_classes() -> None:
    model = OnnxModel.from_bytes(_export(CLASSES))

    pred = model.predict(make_windows(5, seed=1).x)

    assert model.input_shape == WINDOW_SHAPE and model.task == "classification"
    assert pred.labels is not None and pred.confidence is not None and pred.values is None
    assert len(pred) == 5 and set(pred.as_json()) == {"predictions", "confidence"}


def test_a_regression_model_exports_and_predicts_values() -> None:
    frame = decode_onnx_frame(_export(VALUES, scale=300.0))  # large outputs: relative parity
    model = OnnxModel(frame.onnx, frame.header)

    pred = model.predict(make_windows(4, seed=1).x)

    assert (frame.header.task, frame.header.num_outputs) == ("regression", 2)
    assert pred.values is not None and pred.values.shape == (4, 2) and pred.labels is None
    assert list(pred.as_json()) == ["predictions"]
    assert len(pred.as_json()["predictions"][0]) == 2


def test_a_regression_header_is_signed_with_its_task() -> None:
    key = generate_keypair()
    frame = decode_onnx_frame(_export(VALUES))
    signed = decode_onnx_frame(
        _reframe(frame.onnx, sign_onnx_header(key, frame.header)), federation="fed"
    )
    verify_onnx_frame(key.public_key(), signed)

    relabelled = _reframe(frame.onnx, signed.header.__class__(**{
        **signed.header.__dict__, "task": "classification", "num_outputs": 1}))  # fmt: skip

    with pytest.raises(ValueError, match="bad signature"):
        verify_onnx_frame(key.public_key(), decode_onnx_frame(relabelled))


def _reframe(onnx: bytes, header: object) -> bytes:
    from shared.protocol.onnx_frame import encode_onnx_frame

    return encode_onnx_frame(header, onnx)  # type: ignore[arg-type]


def test_a_classifier_frame_header_is_as_before_the_task_field() -> None:
    raw = _export(CLASSES)
    head = json.loads(raw[8 : 8 + int.from_bytes(raw[4:8], "little")])

    assert "task" not in head and "num_outputs" not in head
    assert head["input_shape"] == list(WINDOW_SHAPE)


def test_serve_answers_a_json_request_of_windows_with_values() -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock)
    topics = Topics("fed")
    server = InferenceServer(ServeConfig(federation="fed", client_id="pi-1"), broker.connector)
    server.transport.start()
    server.on_model(_export(VALUES))
    app = broker.connector(Session("app", ((topics.infer_response("pi-1", "app"), 1),))).start()
    x = make_windows(3, seed=2).x.tolist()

    app.publish(topics.infer_request("pi-1", "app"), json.dumps({"id": 7, "x": x}).encode())
    server.handle(server.transport.inbox.get_nowait())
    reply = json.loads(app.inbox.get_nowait().payload)

    assert reply["id"] == 7 and "error" not in reply and "confidence" not in reply
    assert np.asarray(reply["predictions"]).shape == (3, 2)


def test_predict_prints_values_and_the_rmse_of_float_targets(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(_export(VALUES))
    windows = make_windows(6, seed=3)
    save_npz(tmp_path / "d.npz", ArrayDataset(windows.x, np.zeros((6, 2), np.float32)))

    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "predict", "--model", str(tmp_path / "m.onnx"),
         str(tmp_path / "d.npz")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO), **{PLUGINS_ENV: ""}),
    )  # fmt: skip

    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")[1].split(",")) == 2 for line in lines)
    assert "rmse" in out.stderr and "mae" in out.stderr


def test_export_rebuilds_a_saved_regression_plugin_model_with_its_task(tmp_path: Path) -> None:
    import torch

    from aggregator.downloads import model_frame
    from aggregator.ops.cli import main
    from shared.runtime.modelio import get_params
    from shared.runtime.plugins import build_from_spec

    torch.manual_seed(1)
    saved = tmp_path / "global_model.fmq"
    saved.write_bytes(model_frame("fed", 3, VALUES, get_params(build_from_spec(VALUES))))

    code = main(["export", str(saved), "--frame", "--out", str(tmp_path / "m.fmx")])

    head = decode_onnx_frame((tmp_path / "m.fmx").read_bytes()).header
    assert code == 0 and (head.task, head.num_outputs, head.arch) == ("regression", 2, "cnn1d")
