"""ONNX models are signed like the weights; a device that pins the key serves nothing else."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.onnx_export import export_verified
from edge_agent.serve import InferenceServer, ServeConfig
from shared.mqtt.memory import MemoryBroker
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import decode_onnx_frame, encode_onnx_frame
from shared.protocol.signing import (
    ONNX_CONTEXT,
    SignatureError,
    generate_keypair,
    public_pem,
    sign_model,
    verify_model,
)

SPEC = ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4)
FED = "fed"


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_keypair()


def _export(key, round_id: int):  # type: ignore[no-untyped-def]
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(round_id)
    params = get_params(build_model(SPEC.arch, SPEC.input_shape, SPEC.num_classes))
    batch = np.random.default_rng(0).uniform(0, 1, size=(8, 1, 8, 8)).astype(np.float32)
    return export_verified(
        SPEC, params, federation=FED, round_id=round_id, batch=batch, signing_key=key
    )


def _server(tmp_path: Path, key) -> InferenceServer:  # type: ignore[no-untyped-def]
    pem = tmp_path / "model.pub"
    pem.write_bytes(public_pem(key))
    cfg = ServeConfig(federation=FED, client_id="pi-1", model_public_key=str(pem))
    return InferenceServer(cfg, MemoryBroker().connector)


def test_exported_onnx_frame_carries_a_verifiable_signature(key) -> None:  # type: ignore[no-untyped-def]
    head = decode_onnx_frame(_export(key, 3).frame).header

    verify_model(key.public_key(), FED, 3, head.onnx_sha256, head.signature, ONNX_CONTEXT)


def test_weights_signature_does_not_verify_an_onnx_model(key) -> None:  # type: ignore[no-untyped-def]
    head = decode_onnx_frame(_export(key, 3).frame).header
    weights_sig = sign_model(key, FED, 3, head.onnx_sha256)  # other domain

    with pytest.raises(SignatureError):
        verify_model(key.public_key(), FED, 3, head.onnx_sha256, weights_sig, ONNX_CONTEXT)


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
