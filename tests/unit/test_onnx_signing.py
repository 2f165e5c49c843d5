"""ONNX models are signed like the weights; a device that pins the key serves nothing else.

Version-2 frames sign every header field (run, round, hashes, input shape, classes, arch,
opset); a relabelled header or a version-1 frame (whose signature covered only the ONNX hash)
is refused by a pinned server.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.onnx_export import export_verified
from edge_agent.serve import InferenceServer, ServeConfig
from shared.mqtt.memory import MemoryBroker
from shared.protocol.claims import sign_model_v2, verify_onnx_frame
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import MAGIC_V1, decode_onnx_frame, encode_onnx_frame
from shared.protocol.signing import SignatureError, generate_keypair, public_pem

SPEC = ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4)
FED = "fed"


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_keypair()


def _export(key, round_id: int, run: int = 0):  # type: ignore[no-untyped-def]
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(round_id)
    params = get_params(build_model(SPEC.arch, SPEC.input_shape, SPEC.num_classes))
    batch = np.random.default_rng(0).uniform(0, 1, size=(8, 1, 8, 8)).astype(np.float32)
    return export_verified(
        SPEC, params, federation=FED, round_id=round_id, batch=batch, signing_key=key, run=run
    )


def _server(tmp_path: Path, key) -> InferenceServer:  # type: ignore[no-untyped-def]
    pem = tmp_path / "model.pub"
    pem.write_bytes(public_pem(key))
    cfg = ServeConfig(federation=FED, client_id="pi-1", model_public_key=str(pem))
    return InferenceServer(cfg, MemoryBroker().connector)


def test_exported_onnx_frame_is_version_2_with_a_verifiable_header_signature(key) -> None:  # type: ignore[no-untyped-def]
    frame = decode_onnx_frame(_export(key, 3, run=7).frame)

    verify_onnx_frame(key.public_key(), frame)
    assert frame.version == 2 and frame.header.run == 7


def test_a_model_signature_does_not_verify_an_onnx_header(key) -> None:  # type: ignore[no-untyped-def]
    frame = decode_onnx_frame(_export(key, 3).frame)
    head = frame.header
    weights_sig = sign_model_v2(key, FED, head.run, 3, head.onnx_sha256)  # other domain
    forged = replace(frame, header=replace(head, signature=weights_sig))

    with pytest.raises(SignatureError, match="bad signature"):
        verify_onnx_frame(key.public_key(), forged)


def test_pinned_server_serves_a_signed_model(key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)

    server.on_model(_export(key, 2).frame)

    assert server.model is not None and server.model.header.round == 2


def test_pinned_server_refuses_unsigned_and_foreign_signed_models(key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    unsigned = _export(None, 2).frame
    foreign = _export(generate_keypair(), 2).frame

    server.on_model(unsigned)
    server.on_model(foreign)

    assert server.model is None and server.swaps == 0


def test_pinned_server_refuses_a_signed_model_relabelled_to_a_newer_round(
    key, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    good = decode_onnx_frame(_export(key, 2).frame)
    server.on_model(encode_onnx_frame(good.header, good.onnx))
    relabelled = encode_onnx_frame(replace(good.header, round=9), good.onnx)

    server.on_model(relabelled)

    assert server.model is not None and server.model.header.round == 2


def test_pinned_server_refuses_rollback_to_an_older_signed_model(key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    server.on_model(_export(key, 5).frame)

    server.on_model(_export(key, 4).frame)

    assert server.model is not None and server.model.header.round == 5


@pytest.mark.parametrize(
    "relabel",
    [
        {"input_shape": (1, 4, 16)},
        {"num_classes": 5},
        {"arch": "cnn"},
        {"opset": 18},
        {"run": 8},
        {"model_hash": "f" * 64},
    ],
    ids=["input-shape", "num-classes", "arch", "opset", "run", "model-hash"],
)
def test_pinned_server_refuses_a_signed_model_with_a_relabelled_header_field(
    key, tmp_path: Path, relabel: dict[str, Any]
) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    good = decode_onnx_frame(_export(key, 2, run=7).frame)

    server.on_model(encode_onnx_frame(replace(good.header, **relabel), good.onnx))

    assert server.model is None and server.swaps == 0


def test_pinned_server_refuses_a_version_1_frame_as_an_unsigned_header(
    key, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    v1 = MAGIC_V1 + _export(key, 2).frame[len(MAGIC_V1) :]

    server.on_model(v1)

    assert server.model is None
    assert "ONNX frame version 1 has an unsigned header" in caplog.text


def test_unpinned_server_still_serves_a_version_1_frame() -> None:
    cfg = ServeConfig(federation=FED, client_id="pi-1")
    server = InferenceServer(cfg, MemoryBroker().connector)
    v1 = MAGIC_V1 + _export(None, 2).frame[len(MAGIC_V1) :]

    server.on_model(v1)

    assert server.model is not None and server.model.header.run == 0


def test_pinned_server_moves_to_a_newer_run_and_refuses_an_older_one(key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = _server(tmp_path, key)
    server.on_model(_export(key, 9, run=5).frame)

    server.on_model(_export(key, 1, run=6).frame)  # a new run starts again at round 1
    server.on_model(_export(key, 20, run=4).frame)  # a replay of an older run

    assert server.model is not None
    assert (server.model.header.run, server.model.header.round) == (6, 1)
