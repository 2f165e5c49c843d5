"""Encoders return what they sent: bit for bit what decoding their bytes gives.

The agent's error feedback and the aggregator's download step use ``sent`` instead of
decoding their own frames, so it must never differ from the decoder's output, for any codec
family and any input: zeros, subnormals, one element, values near the float32 limit, tensors
the low-rank codec sends dense, fp16-range refusals.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.residual import DeviceFeedback
from shared.compression.lowrank import LowRankCodec
from shared.compression.lowrank import parse as parse_lowrank
from shared.compression.quantize import CodecError, Fp16Codec, Int8Codec, TensorCodec
from shared.compression.registry import resolve_codec
from shared.compression.topk import TopKCodec
from shared.protocol.frames import (
    FrameError,
    decode_frame,
    encode_frame,
    encode_tensors,
    pack_frame,
)
from shared.protocol.global_delta import delta_frame, server_step
from tests.unit.frames import sample_tensors, split_frame, update_header

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal: below it, subnormals

# Every family, and small blocks so that several blocks (and a partial last one) occur.
CODECS: list[TensorCodec] = [
    resolve_codec("fp32"),
    Fp16Codec(),
    Int8Codec(),
    Int8Codec(block=7),
    resolve_codec("topk:0.3"),
    resolve_codec("topk:0.3+fp16"),
    resolve_codec("topk8:0.2"),
    resolve_codec("topk4:0.5"),
    resolve_codec("topk1:0.4"),
    resolve_codec("topk:1+int8"),
    resolve_codec("topk:0.01/min5"),
    TopKCodec("topk:0.6+int4", 0.6, "int4", block=5),
    TopKCodec("topk:0.6+sign", 0.6, "sign", block=3),
    TopKCodec("topk:0.6+int8", 0.6, "int8", block=4),
    resolve_codec("lowrank:2"),  # a flat array: one row, sent dense
]
FRAME_CODECS = [
    "fp32",
    "fp16",
    "int8",
    "topk:0.1",
    "topk:0.1+fp16",
    "topk8:0.1",
    "topk4:0.2",
    "topk1:0.1",
    "topk4:0.01/min3@warmup3",
    "lowrank:1",
    "lowrank:2+int4",
    "lowrank:3+int8",
]

subnormals = st.floats(-F32_TINY, F32_TINY, width=32, allow_subnormal=True)
anything = st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False)
elements = st.one_of(st.just(0.0), subnormals, st.floats(-1e3, 1e3, width=32), anything)
flats = hnp.arrays(np.float32, st.integers(0, 300), elements=elements)
matrices = st.tuples(st.integers(1, 30), st.integers(1, 40)).flatmap(
    lambda mn: hnp.arrays(np.float32, mn, elements=elements)
)


def _assert_bit_identical(sent: np.ndarray, decoded: np.ndarray) -> None:
    assert sent.dtype == decoded.dtype == np.float32
    assert sent.shape == decoded.shape
    assert sent.tobytes() == decoded.tobytes()  # bits: -0.0 and subnormals included


def _check(codec: TensorCodec, flat: np.ndarray, seed: int) -> None:
    """``encode(flat).sent`` is the decoded tensor, or the decoder refuses a non-finite one."""
    try:
        enc = codec.encode(flat, np.random.default_rng(seed))
    except CodecError:  # only fp16 refuses values, those beyond its range
        assert "fp16" in codec.name and float(np.abs(flat).max()) > 65504.0
        return
    try:
        decoded = codec.decode(memoryview(enc.data), flat.size, enc.params)
    except CodecError:  # decoding overflows: the encoder's sent says so too
        assert not np.isfinite(enc.sent).all()
        return
    _assert_bit_identical(enc.sent, decoded)


@FAST
@given(flat=flats, codec=st.sampled_from(CODECS), seed=st.integers(0, 2**32 - 1))
def test_every_value_codec_sends_exactly_what_its_decoder_returns(
    flat: np.ndarray, codec: TensorCodec, seed: int
) -> None:
    _check(codec, flat, seed)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "flat",
    [
        np.zeros(0, np.float32),
        np.array([0.0], np.float32),
        np.array([-1e-45], np.float32),  # the smallest subnormal
        np.zeros(17, np.float32),
        np.array([-0.0, 0.0, 1e-40, -3e-39, 5.0], np.float32),
        np.array([65504.0, -65504.0, 1.0], np.float32),  # the fp16 limit itself
        np.array([F32_MAX, -F32_MAX, 1.0], np.float32),  # int8 scales overflow on decode
    ],
    ids=["empty", "one-zero", "one-subnormal", "zeros", "signed-zeros", "fp16-max", "f32-max"],
)
def test_sent_values_match_the_decoder_on_edge_cases(codec: TensorCodec, flat: np.ndarray) -> None:
    _check(codec, flat, seed=0)


@FAST
@given(
    x=matrices,
    name=st.sampled_from(["lowrank:1", "lowrank:2+int4", "lowrank:3+int8", "lowrank:4+int4"]),
)
def test_low_rank_sends_exactly_what_its_decoder_returns(x: np.ndarray, name: str) -> None:
    codec = parse_lowrank(name)
    enc = codec.encode_tensor(x, np.random.default_rng(0))

    decoded = codec.decode(memoryview(enc.data), x.size, enc.params)

    _assert_bit_identical(enc.sent, decoded)


@pytest.mark.parametrize(
    ("shape", "scale", "rank"),
    [
        ((200, 150), 0.01, 4),  # both sides > 128: randomised SVD
        ((20, 30), 1e13, 0),  # factor scales beyond fp16: sent dense
        ((6,), 0.1, 0),  # a vector: sent dense
        ((3, 3), 0.1, 0),  # factorising would not compress: sent dense
    ],
    ids=["randomised-svd", "fp16-fallback", "vector", "tiny-matrix"],
)
def test_low_rank_sends_exactly_what_its_decoder_returns_on_every_path(
    shape: tuple[int, ...], scale: float, rank: int
) -> None:
    x = np.random.default_rng(3).normal(0, scale, shape).astype(np.float32)
    codec = LowRankCodec("lowrank:4+int4", 4, bits=4)

    enc = codec.encode_tensor(x, np.random.default_rng(0))

    assert enc.params["rank"] == rank  # the path this case is about
    _assert_bit_identical(enc.sent, codec.decode(memoryview(enc.data), x.size, enc.params))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(FRAME_CODECS),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-40, 1e-3, 1.0, 1e4]),  # 1e-40: subnormal values
    round_id=st.integers(1, 6),
)
def test_encode_frame_sends_exactly_what_decode_frame_returns(
    name: str, seed: int, scale: float, round_id: int
) -> None:
    tensors = {n: (v * scale).astype(np.float32) for n, v in sample_tensors(seed).items()}
    header = dataclasses.replace(update_header(name), round=round_id)  # warm-up densities vary

    encoded = encode_frame(header, tensors, rng=np.random.default_rng(seed))
    decoded = decode_frame(encoded.payload).tensors

    assert list(encoded.sent) == list(decoded)
    for n in decoded:
        _assert_bit_identical(encoded.sent[n], decoded[n])


def test_encode_frame_refuses_a_tensor_that_would_decode_to_non_finite_values() -> None:
    tensors = {"w": np.array([F32_MAX, -F32_MAX, 1.0], np.float32)}

    with pytest.raises(FrameError, match="would decode to non-finite"):
        encode_frame(update_header("int8"), tensors, rng=np.random.default_rng(0))


@pytest.mark.parametrize("name", ["topk4:0.1", "lowrank:2+int4"])
def test_committed_residual_is_what_the_frame_did_not_carry(tmp_path: Path, name: str) -> None:
    device = DeviceFeedback(tmp_path, "lab")
    comp = device.compensate(sample_tensors(5))
    encoded = encode_frame(update_header(name), comp, rng=np.random.default_rng(1))

    device.commit(comp, encoded.sent)

    received = decode_frame(encoded.payload).tensors  # what the aggregator counts
    for n, v in comp.items():
        _assert_bit_identical(device.ef.residual[n], (v - received[n]).astype(np.float32))


def test_delta_frame_carries_the_bytes_server_step_encoded() -> None:
    old = {n: v for n, v in sample_tensors(2).items() if v.size}
    target = {n: (v + 1e-3).astype(np.float32) for n, v in old.items()}
    step = server_step(old, target, None, codec="int8", seed=1, round_id=1)

    frame = delta_frame(step, federation="lab", base_hash="b" * 64, base_round=0)

    head, body = split_frame(frame)
    assert body == step.encoded.body and head["tensors"] == step.encoded.specs
    assert head["meta"]["model_hash"] == step.model_hash


def test_pack_frame_refuses_a_header_naming_another_codec() -> None:
    encoded = encode_tensors(sample_tensors(), codec="int8", round_id=1)

    with pytest.raises(FrameError, match="header names codec"):
        pack_frame(update_header("fp16"), encoded)
