"""Low-rank update codec (shared/compression/lowrank.py): bounds, validation, EF, frames."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.compression.error_feedback import ErrorFeedback
from shared.compression.lowrank import LowRankCodec, parse
from shared.compression.quantize import CodecError
from shared.compression.registry import needs_error_feedback, resolve_codec
from shared.protocol.frames import MAGIC_COMPACT, FrameError, decode_frame, encode_frame
from tests.unit.frames import assemble_frame, sample_tensors, split_frame, update_header

NAMES = ["lowrank:1", "lowrank:2+int4", "lowrank:3+int8", "lowrank:4+int4"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
matrices = st.tuples(st.integers(1, 40), st.integers(1, 60)).flatmap(
    lambda mn: hnp.arrays(np.float32, mn, elements=values)
)


def _bound(x: np.ndarray, k: int, level: int) -> float:
    """The module's stated bound on ‖X − X̂‖_F."""
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    tail = float(np.sqrt(np.sum(s[k:] ** 2)))
    head = float(np.sum(s[:k]))
    m, n = x.shape
    up = 1 + 2**-10  # fp16 scales, rounded up
    e_p, e_q = up * np.sqrt(m * head) / (2 * level), up * np.sqrt(n * head) / (2 * level)
    return tail + float(np.sqrt(s[0])) * (e_p + e_q) + e_p * e_q


def _round_trip(codec: LowRankCodec, x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    enc = codec.encode_tensor(x, np.random.default_rng(0))
    params, data = enc.params, enc.data
    assert len(data) == codec.encoded_size(x.size, params)
    return params, codec.decode(memoryview(data), x.size, params).reshape(x.shape)


@FAST
@given(x=matrices, name=st.sampled_from(NAMES))
def test_round_trip_is_within_stated_bound(x: np.ndarray, name: str) -> None:
    codec = parse(name)
    params, got = _round_trip(codec, x)

    if params["rank"] == 0:  # not worth factorising: dense int8, error < one block scale
        assert np.all(np.abs(got - x) <= np.abs(x).max() / 127 * 1.0001 + 1e-30)
        return
    k, level = params["rank"], {8: 127, 4: 7}[params["bits"]]
    err = float(np.linalg.norm(got.astype(np.float64) - x))
    assert err <= _bound(x, k, level) * 1.0001 + 1e-3 * float(np.abs(x).max(initial=0)) + 1e-6


def test_exactly_low_rank_matrix_is_recovered_closely() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(60, 3)) @ rng.normal(size=(3, 80))).astype(np.float32)

    _, got = _round_trip(parse("lowrank:3"), x)

    assert np.linalg.norm(got - x) / np.linalg.norm(x) < 0.02


def test_randomised_svd_on_a_large_matrix_is_near_optimal() -> None:
    rng = np.random.default_rng(4)
    u, v = rng.normal(size=(300, 4)), rng.normal(size=(4, 700))
    x = (u @ v + 0.01 * rng.normal(size=(300, 700))).astype(np.float32)  # min side > 128

    params, got = _round_trip(parse("lowrank:4"), x)

    assert params["rank"] == 4
    assert np.linalg.norm(got - x) <= 1.05 * _bound(x, 4, 127)


def test_factors_beyond_fp16_scales_are_sent_dense() -> None:
    x = np.full((20, 30), 1e12, np.float32)  # factor entries ≈ 1e6: scales beyond fp16

    params, got = _round_trip(parse("lowrank:2+int4"), x)

    assert params["rank"] == 0
    np.testing.assert_allclose(got, x, rtol=1e-2)


def test_vectors_and_small_matrices_are_sent_dense() -> None:
    codec = parse("lowrank:4")
    for shape in [(16,), (3, 3), (4, 5)]:  # k·(m+n) ≥ m·n: factorising would not save
        params = codec.encode_tensor(np.ones(shape, np.float32), np.random.default_rng(0)).params
        assert params["rank"] == 0


def test_frame_round_trip_keeps_shapes_and_uses_the_compact_header() -> None:
    tensors = sample_tensors(conv=(16, 6, 5, 5))
    payload = encode_frame(update_header("lowrank:2+int4"), tensors).payload

    frame = decode_frame(payload)

    assert payload[:4] == MAGIC_COMPACT
    assert {n: v.shape for n, v in frame.tensors.items()} == {
        n: v.shape for n, v in tensors.items()
    }


def test_lenet_sized_update_is_over_100x_smaller_than_fp32() -> None:
    rng = np.random.default_rng(5)
    shapes = {
        "conv1.weight": (6, 1, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16,),
        "fc1.weight": (120, 400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "fc2.bias": (84,),
        "fc3.weight": (10, 84),
        "fc3.bias": (10,),
    }
    delta = {n: rng.normal(0, 1e-3, size=s).astype(np.float32) for n, s in shapes.items()}
    numel = sum(v.size for v in delta.values())

    payload = encode_frame(update_header("lowrank:4+int4"), delta).payload

    assert 4 * numel / len(payload) > 100


def test_names_are_parsed_and_counted_as_needing_error_feedback() -> None:
    codec = resolve_codec("lowrank:3+int4")
    assert isinstance(codec, LowRankCodec) and (codec.rank, codec.bits) == (3, 4)
    assert resolve_codec("lowrank:2").bits == 8  # type: ignore[attr-defined]
    assert needs_error_feedback("lowrank:2")


@pytest.mark.parametrize(
    "name", ["lowrank:0", "lowrank:", "lowrank:2+int2", "lowrank:-1", "lowrank:2+sign"]
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(CodecError):
        resolve_codec(name)
    assert not needs_error_feedback(name)


# --- decoders reject bad input -------------------------------------------------------------


def _frame_parts(name: str = "lowrank:2+int4") -> tuple[dict[str, Any], bytes]:
    x = np.random.default_rng(1).normal(size=(20, 30)).astype(np.float32)
    return split_frame(encode_frame(update_header(name), {"w": x}).payload)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rank", -1),
        ("rank", 20),  # > min(m, n)
        ("rank", 12),  # k·(m+n) ≥ m·n: not a compressing factorisation
        ("rank", True),
        ("rows", 7),  # does not divide 600
        ("rows", 0),
        ("bits", 2),
        ("bits", "4"),
    ],
)
def test_bad_params_raise_frame_error(key: str, value: object) -> None:
    head, body = _frame_parts()
    head["tensors"][0]["params"][key] = value

    with pytest.raises(FrameError):
        decode_frame(assemble_frame(head, body))


def test_params_that_change_the_size_raise_frame_error() -> None:
    head, body = _frame_parts()
    head["tensors"][0]["params"]["rank"] = 1  # valid alone, but the body is rank 2's size

    with pytest.raises(FrameError, match=r"raw_len|bytes"):
        decode_frame(assemble_frame(head, body))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_bad_scales_raise_codec_error(bad: float) -> None:
    codec = parse("lowrank:2")
    enc = codec.encode_tensor(
        np.random.default_rng(2).normal(size=(20, 30)).astype(np.float32),
        np.random.default_rng(0),
    )
    params, data = enc.params, enc.data
    raw = bytearray(data)
    raw[0:2] = struct.pack("<e", bad)

    with pytest.raises(CodecError, match="scales"):
        codec.decode(memoryview(bytes(raw)), 600, params)


def test_int4_minus_eight_is_rejected() -> None:
    codec = parse("lowrank:2+int4")
    enc = codec.encode_tensor(
        np.random.default_rng(2).normal(size=(20, 30)).astype(np.float32),
        np.random.default_rng(0),
    )
    params, data = enc.params, enc.data
    raw = bytearray(data)
    raw[8] = 0x88  # first codes byte, after 4 fp16 scales: two nibbles of -8

    with pytest.raises(CodecError, match="out of range"):
        codec.decode(memoryview(bytes(raw)), 600, params)


# Truncated, random and mutated frames and error-feedback mass conservation: the shared
# properties of every biased codec, in tests/unit/test_sparse_codecs.py (BIASED).


def test_error_feedback_sends_every_direction_eventually() -> None:
    """A constant full-rank delta: rank-2 updates plus feedback converge to it on average."""
    rng = np.random.default_rng(6)
    delta = {"w": rng.normal(size=(10, 14)).astype(np.float32)}
    ef = ErrorFeedback()
    sent_total = np.zeros((10, 14))
    rounds = 60
    for _ in range(rounds):
        comp = ef.compensate(delta)
        sent = encode_frame(update_header("lowrank:2+int4"), comp).sent
        ef.update(comp, sent)
        sent_total += sent["w"]

    rel = np.linalg.norm(sent_total / rounds - delta["w"]) / np.linalg.norm(delta["w"])
    assert rel < 0.1
