"""Top-k codecs (shared/compression/topk.py, rice.py) and error feedback."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.residual import DeviceFeedback, ResidualStore
from shared.compression import rice
from shared.compression.error_feedback import ErrorFeedback
from shared.compression.quantize import CodecError
from shared.compression.registry import needs_error_feedback, resolve_codec
from shared.compression.topk import TopKCodec
from shared.protocol.frames import (
    MAGIC,
    MAGIC_COMPACT,
    FrameError,
    FrameHeader,
    decode_frame,
    encode_frame,
    read_header,
)
from tests.unit.frames import assemble_frame, sample_tensors, split_frame, update_header

SPARSE = [
    "topk:0.1",
    "topk:0.05+fp16",
    "topk:0.2+int8",
    "topk8:0.01",
    "topk4:0.3",
    "topk:1",
    "topk1:0.1",
    "topk:0.3+sign",
    "topk1:0.02@warmup2",
    "topk8:0.01@warmup3x4",
    "topk1:0.01/min16@warmup2",
]
# Every biased codec (error feedback on the device): the frame-level robustness and
# mass-conservation properties below hold for all of them.
BIASED = [*SPARSE, "lowrank:1", "lowrank:2+int4", "lowrank:3+int8"]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
flats = hnp.arrays(np.float32, st.integers(0, 600), elements=values)


def _kept_bound(codec: TopKCodec, top: np.ndarray) -> float:
    """Max error on a kept value, as stated in compression/topk.py (``top``: kept magnitudes)."""
    a = np.abs(top.astype(np.float64))
    if codec.values in ("fp32", "fp16"):
        return 0.0  # relative bounds: checked per value below
    if codec.values == "sign":
        return float(a.max(initial=0.0)) * (1 + 1e-6)  # sign(x)·mean|block|: ≤ max|kept|
    levels = {"int8": 127, "int4": 7}[codec.values]
    # a block's scale is at most max|kept| / levels: a bound valid for every block
    return float(a.max(initial=0.0)) / levels / 2 * (1 + 1e-6)


# --- round trips ---------------------------------------------------------------------------


@FAST
@given(name=st.sampled_from(SPARSE), flat=flats)
def test_topk_round_trip_is_within_stated_bound(name: str, flat: np.ndarray) -> None:
    codec = resolve_codec(name)
    assert isinstance(codec, TopKCodec)

    enc = codec.encode(flat, np.random.default_rng(0))
    params, data = enc.params, enc.data
    out = codec.decode(memoryview(data), flat.size, params)

    k = codec.k_for(flat.size)
    assert len(data) == codec.encoded_size(flat.size, params)
    assert params["k"] == k and out.shape == flat.shape
    assert np.count_nonzero(out) <= k
    x = flat.astype(np.float64)
    mags = np.sort(np.abs(x))[::-1]
    threshold = mags[k - 1] if k else 0.0  # nothing smaller than this was kept
    err = np.abs(out - x)
    rel = {"fp32": 0.0, "fp16": 2.0**-11}.get(codec.values, 0.0)
    # + float32's smallest normal: a block of subnormals has a scale that underflows to 0.
    tiny = float(np.finfo(np.float32).tiny)
    kept_ok = err <= np.abs(x) * rel + (6e-8 if rel else 0.0) + _kept_bound(codec, mags[:k]) + tiny
    dropped_ok = (out == 0) & (np.abs(x) <= threshold)
    assert (kept_ok | dropped_ok).all()


@FAST
@given(flat=flats, density=st.floats(0.01, 1.0))
def test_sign_values_keep_each_blocks_mass(flat: np.ndarray, density: float) -> None:
    codec = TopKCodec("t", density, "sign", block=16)
    enc = codec.encode(flat, np.random.default_rng(0))
    params, data = enc.params, enc.data
    out = codec.decode(memoryview(data), flat.size, params)

    k = codec.k_for(flat.size)
    assert np.count_nonzero(out) <= k
    both = (out != 0) & (flat != 0)
    assert (np.sign(out[both]) == np.sign(flat[both])).all()  # signs are exact
    # Σ|x̂| == Σ|x| over the k kept (largest) values: each block decodes to its mean magnitude
    top = np.sort(np.abs(flat.astype(np.float64)))[::-1][:k]
    np.testing.assert_allclose(np.abs(out).sum(dtype=np.float64), top.sum(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "densities"),
    [
        ("topk1:0.01@warmup3", [0.08, 0.04, 0.02, 0.01, 0.01]),
        ("topk8:0.1@warmup2x4", [1.0, 0.4, 0.1, 0.1, 0.1]),
        ("topk:0.5", [0.5] * 5),
    ],
)
def test_warmup_schedule_densities(name: str, densities: list[float]) -> None:
    codec = resolve_codec(name)
    assert isinstance(codec, TopKCodec)

    got = [codec.density_at(r) for r in range(1, 6)]

    np.testing.assert_allclose(got, densities)
    assert codec.density_at(0) == codec.density_at(1)  # round 0 is treated as the first


def test_min_floor_keeps_small_tensors_and_survives_the_schedule() -> None:
    codec = resolve_codec("topk1:0.01/min64@warmup2")
    assert isinstance(codec, TopKCodec)

    assert [codec.k_for(n) for n in (0, 10, 64, 1000, 100_000)] == [0, 10, 64, 64, 1000]
    assert codec.at_round(1).k_for(1000) == 64 and codec.at_round(1).k_for(10_000) == 400


def test_warmup_schedule_follows_the_frame_round() -> None:
    w = {"w": np.random.default_rng(3).normal(size=1000).astype(np.float32)}
    kept = []
    for r in (1, 2, 3):
        h = FrameHeader(kind="update", federation="lab", round=r, codec="topk8:0.01@warmup2")
        kept.append(int(np.count_nonzero(decode_frame(encode_frame(h, w).payload).tensors["w"])))

    assert kept == [40, 20, 10]


def test_sparse_frames_have_a_compressed_header_and_dense_ones_do_not() -> None:
    tensors = sample_tensors()
    header = FrameHeader(
        kind="update", federation="lab", round=4, codec="topk1:0.1", client_id="pi-1",
        base_hash="ab" * 32, num_samples=9, meta={"train_loss": 0.123456789},
    )  # fmt: skip

    compact = encode_frame(header, tensors).payload
    plain = encode_frame(header, tensors, compact=False).payload

    assert compact[:4] == MAGIC_COMPACT and plain[:4] == MAGIC
    assert len(compact) < len(plain)
    assert read_header(compact) == read_header(plain) == header
    for a, b in zip(
        decode_frame(compact).tensors.values(), decode_frame(plain).tensors.values(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert encode_frame(FrameHeader("update", "lab", 1, "int8"), tensors).payload[:4] == MAGIC


@pytest.mark.parametrize(
    "hb",
    [
        b"",
        b"not zstd",
        zstandard.ZstdCompressor().compress(b"[1, 2]"),
        zstandard.ZstdCompressor().compress(b"{") ,
        zstandard.ZstdCompressor(write_checksum=True).compress(b'{"kind": "update"}')[:-2],
        zstandard.ZstdCompressor(write_content_size=False).compress(b"{}"),
        zstandard.ZstdCompressor().compress(b" " * (1 << 20 + 1)),
    ],
)  # fmt: skip
def test_bad_compressed_headers_raise_frame_error(hb: bytes) -> None:
    payload = MAGIC_COMPACT + struct.pack("<I", len(hb)) + hb + b"\x00" * 16

    with pytest.raises(FrameError):
        read_header(payload)
    with pytest.raises(FrameError):
        decode_frame(payload)


@FAST
@given(
    idx=st.sets(st.integers(0, 5000), max_size=300).map(lambda s: np.array(sorted(s), np.int64)),
    rice_bits=st.integers(0, 12),
)
def test_rice_index_coding_round_trips(idx: np.ndarray, rice_bits: int) -> None:
    ubits, unary, rem = rice.encode_indices(idx, rice_bits)

    assert (len(unary), len(rem)) == rice.stream_sizes(idx.size, ubits, rice_bits)
    assert ubits <= rice.unary_bits_bound(5001, idx.size, rice_bits)
    back = rice.decode_indices(memoryview(unary), memoryview(rem), idx.size, ubits, rice_bits, 5001)
    np.testing.assert_array_equal(back, idx)


@pytest.mark.parametrize("name", SPARSE)
def test_topk_frame_round_trip_keeps_shapes(name: str) -> None:
    tensors = sample_tensors()

    frame = decode_frame(encode_frame(update_header(name), tensors).payload)

    assert {n: v.shape for n, v in frame.tensors.items()} == {
        n: v.shape for n, v in tensors.items()
    }
    assert frame.header.codec == name


def test_topk8_one_percent_of_lenet_sized_delta_is_over_60x_smaller_than_fp32() -> None:
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(0, 0.01, size=61_706).astype(np.float32)}

    dense = encode_frame(update_header("fp32"), delta).payload
    sparse = encode_frame(update_header("topk8:0.01"), delta).payload

    assert len(dense) / len(sparse) > 60  # one tensor, so the header is small


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values", "density"),
    [
        ("topk:0.01", "fp32", 0.01),
        ("topk:0.01+int8", "int8", 0.01),
        ("topk8:0.01", "int8", 0.01),
        ("topk4:.5", "int4", 0.5),
        ("topk:1e-3+fp16", "fp16", 0.001),
        ("topk1:0.02", "sign", 0.02),
        ("topk:0.02+sign@warmup3", "sign", 0.02),
        ("topk8:0.01@warmup4x1.5", "int8", 0.01),
        ("topk1:0.01/min64@warmup2", "sign", 0.01),
    ],
)
def test_codec_names_are_parsed(name: str, values: str, density: float) -> None:
    codec = resolve_codec(name)

    assert isinstance(codec, TopKCodec)
    assert (codec.values, codec.density, codec.name) == (values, density, name)
    assert needs_error_feedback(name)


@pytest.mark.parametrize(
    "name",
    ["topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1", "topk8:0.1+int8", "topk:0.1+int2",
     "topk:abc", "topk:0.1 ", "TOPK:0.1", "topk16:0.1", "topk:nan", "topk:inf",
     "topk1:0.1+sign", "topk1:0.1@warmup0", "topk1:0.1@warmup", "topk1:0.1@warmup2x1",
     "topk1:0.1@warmup2x0.5", "topk1:0.1@warmup2x2000", "topk1:0.1@warmup12345",
     "topk1:0.1@", "topk1:0.1@warmup2@warmup2", "int8@warmup2", "topk1:0.1@Warmup2",
     "topk1:0.1/min0", "topk1:0.1/min", "topk1:0.1@warmup2/min4", "topk1:0.1/min-3"],
)  # fmt: skip
def test_bad_codec_names_are_rejected(name: str) -> None:
    with pytest.raises(CodecError):
        resolve_codec(name)
    assert not needs_error_feedback(name)


def test_dense_codecs_are_not_sparse() -> None:
    assert not any(needs_error_feedback(n) for n in ("fp32", "fp16", "int8"))


# --- decoders reject bad input -------------------------------------------------------------


def _one_tensor_frame(name: str = "topk8:0.1") -> tuple[dict[str, Any], bytes]:
    rng = np.random.default_rng(1)
    # A matrix, so that low-rank codecs factorise it (top-k treats it as 500 values).
    w = rng.normal(size=(20, 25)).astype(np.float32)
    return split_frame(encode_frame(update_header(name), {"w": w}).payload)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("k", 501),
        ("k", -1),
        ("k", "5"),
        ("k", True),
        ("k", None),
        ("rice", 31),
        ("rice", -1),
        ("ubits", 10**9),
        ("ubits", 0),
        ("block", 0),
        ("block", 1.5),
    ],
)
def test_bad_params_raise_frame_error(key: str, value: object) -> None:
    head, body = _one_tensor_frame()
    head["tensors"][0]["params"][key] = value

    with pytest.raises(FrameError):
        decode_frame(assemble_frame(head, body))


def test_missing_param_raises_frame_error() -> None:
    head, body = _one_tensor_frame()
    del head["tensors"][0]["params"]["ubits"]

    with pytest.raises(FrameError, match="ubits"):
        decode_frame(assemble_frame(head, body))


def test_index_beyond_tensor_raises_frame_error() -> None:
    head, body = _one_tensor_frame()
    head["tensors"][0]["shape"] = [60]  # 50 kept indices cannot all fit below 60... nor k ≤ 60

    with pytest.raises(FrameError):
        decode_frame(assemble_frame(head, body))


def test_nonzero_stream_padding_raises_frame_error() -> None:
    codec = resolve_codec("topk:0.5")
    flat = np.arange(1, 8, dtype=np.float32)
    enc = codec.encode(flat, np.random.default_rng(0))
    params, data = enc.params, enc.data
    tampered = bytearray(data)
    tampered[-1] |= 0x01  # padding bit of the last stream

    with pytest.raises(CodecError):
        codec.decode(memoryview(bytes(tampered)), flat.size, params)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_and_scales_raise_codec_error(bad: float) -> None:
    for name in ("topk:0.5", "topk8:0.5"):
        codec = resolve_codec(name)
        enc = codec.encode(np.ones(8, np.float32), np.random.default_rng(0))
        params, data = enc.params, enc.data
        tampered = bytearray(data)
        tampered[0:4] = struct.pack("<f", bad)

        with pytest.raises(CodecError):
            codec.decode(memoryview(bytes(tampered)), 8, params)


def test_int4_minus_eight_is_rejected() -> None:
    codec = resolve_codec("topk4:1")
    enc = codec.encode(np.ones(2, np.float32), np.random.default_rng(0))
    params, data = enc.params, enc.data
    tampered = bytearray(data)
    tampered[4] = 0x88  # two nibbles of -8

    with pytest.raises(CodecError, match="out of range"):
        codec.decode(memoryview(bytes(tampered)), 2, params)


@pytest.mark.parametrize("name", BIASED)
def test_every_truncation_raises_frame_error(name: str) -> None:
    payload = encode_frame(update_header(name), sample_tensors()).payload

    for cut in range(0, len(payload), 7):
        with pytest.raises(FrameError):
            decode_frame(payload[:cut])


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(BIASED), data=st.data())
def test_random_body_bytes_never_crash(name: str, data: st.DataObject) -> None:
    head, body = _one_tensor_frame(name)
    junk = data.draw(st.binary(min_size=len(body), max_size=len(body)))

    try:
        frame = decode_frame(assemble_frame(head, junk))
    except FrameError:
        return
    assert np.isfinite(frame.tensors["w"]).all()


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(BIASED), pos=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_mutated_frame_decodes_or_raises_frame_error(name: str, pos: int, byte: int) -> None:
    payload = bytearray(encode_frame(update_header(name), sample_tensors()).payload)
    payload[pos % len(payload)] = byte

    with contextlib.suppress(FrameError):
        decode_frame(bytes(payload))


# --- error feedback ------------------------------------------------------------------------


@FAST
@given(
    name=st.sampled_from(BIASED),
    rounds=st.lists(st.integers(0, 2**31), min_size=1, max_size=4),
)
def test_error_feedback_conserves_mass(name: str, rounds: list[int]) -> None:
    ef = ErrorFeedback()
    total_in = np.zeros((5, 10), np.float64)
    total_sent = np.zeros((5, 10), np.float64)
    for seed in rounds:
        delta = {"w": np.random.default_rng(seed).normal(0, 1, (5, 10)).astype(np.float32)}
        old = ef.residual.get("w", np.zeros((5, 10), np.float32)).copy()
        comp = ef.compensate(delta)
        sent = encode_frame(update_header(name), comp).sent
        ef.update(comp, sent)

        # sent + new residual == delta + old residual
        np.testing.assert_allclose(
            sent["w"] + ef.residual["w"], delta["w"] + old, rtol=1e-5, atol=1e-5
        )
        total_in += delta["w"]
        total_sent += sent["w"]
    np.testing.assert_allclose(total_sent + ef.residual["w"], total_in, atol=1e-4)


def test_error_feedback_eventually_sends_small_coordinates() -> None:
    ef = ErrorFeedback()
    delta = {"w": np.array([1.0, 0.1, 0.1, 0.1], np.float32)}
    sent_total = np.zeros(4)
    for _ in range(40):
        comp = ef.compensate(delta)
        sent = encode_frame(update_header("topk:0.25"), comp).sent
        ef.update(comp, sent)
        sent_total += sent["w"]

    assert (sent_total[1:] > 0).all()  # plain top-k would never send them


def test_residual_resets_when_architecture_changes() -> None:
    ef = ErrorFeedback({"w": np.ones(3, np.float32)})

    out = ef.compensate({"w": np.zeros(4, np.float32)})

    np.testing.assert_array_equal(out["w"], np.zeros(4))
    assert ef.residual == {}


def test_residual_survives_restart(tmp_path: Path) -> None:
    first = DeviceFeedback(tmp_path / "state", "lab")
    comp = first.compensate({"w": np.arange(10, dtype=np.float32)})
    first.commit(comp, encode_frame(update_header("topk:0.2"), comp).sent)

    again = DeviceFeedback(tmp_path / "state", "lab")

    np.testing.assert_array_equal(again.ef.residual["w"], first.ef.residual["w"])
    assert again.ef.residual["w"][:8].sum() == sum(range(8))
    assert not list((tmp_path / "state").glob(".residual-*"))  # no temp files left


@pytest.mark.parametrize("name", ["topk:0.2", "lowrank:1+int4"])
def test_a_lost_update_goes_back_into_the_residual(tmp_path: Path, name: str) -> None:
    """Late or dropped: what the frame carried is owed again, so nothing is lost."""
    device = DeviceFeedback(tmp_path / "state", "lab")
    delta = {"w": np.random.default_rng(7).normal(size=(6, 10)).astype(np.float32)}
    comp = device.compensate(delta)
    encoded = encode_frame(update_header(name), comp)
    device.commit(comp, encoded.sent)

    device.give_back(encoded.payload)

    np.testing.assert_allclose(device.ef.residual["w"], delta["w"], atol=1e-6)
    again = DeviceFeedback(tmp_path / "state", "lab")  # persisted
    np.testing.assert_allclose(again.ef.residual["w"], delta["w"], atol=1e-6)


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"PK\x03\x04broken zip", b"\x93NUMPY\x01\x00"]
)
def test_corrupt_residual_file_starts_from_zero(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "residual.npz").write_bytes(content)

    ef = ResidualStore(tmp_path, "lab").load()

    assert ef.residual == {}


def test_residual_of_other_federation_is_discarded(tmp_path: Path) -> None:
    ResidualStore(tmp_path, "other").save(ErrorFeedback({"w": np.ones(3, np.float32)}))

    assert ResidualStore(tmp_path, "lab").load().residual == {}
    assert ResidualStore(tmp_path, "other").load().residual["w"].tolist() == [1, 1, 1]


def test_pickled_residual_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "residual.npz", w=np.array([{"a": 1}], dtype=object))

    assert ResidualStore(tmp_path, "lab").load().residual == {}


@FAST
@given(
    name=st.sampled_from(SPARSE),
    rounds=st.lists(st.integers(0, 2**31), min_size=1, max_size=4),
    momentum=st.floats(0.1, 0.9),
)
def test_momentum_corrected_feedback_conserves_velocity_mass(
    name: str, rounds: list[int], momentum: float
) -> None:
    ef = ErrorFeedback(momentum=momentum)
    for seed in rounds:
        delta = {"w": np.random.default_rng(seed).normal(0, 1, 50).astype(np.float32)}
        old_res = ef.residual.get("w", np.zeros(50, np.float32)).copy()
        old_u = ef.velocity.get("w", np.zeros(50, np.float32)).copy()
        comp = ef.compensate(delta)
        velocity = momentum * old_u + delta["w"]
        sent = encode_frame(update_header(name), comp).sent
        ef.update(comp, sent)

        # sent + new residual == velocity + old residual; sent coordinates lose their velocity
        np.testing.assert_allclose(
            sent["w"] + ef.residual["w"], velocity + old_res, rtol=1e-5, atol=1e-5
        )
        assert (ef.velocity["w"][sent["w"] != 0] == 0).all()
