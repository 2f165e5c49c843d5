"""Binary frames (shared/protocol/frames.py) and per-tensor codecs (compression/quantize.py)."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.compression.quantize import CODECS, Int8Codec
from shared.protocol.frames import (
    MAGIC,
    MAX_HEADER_BYTES,
    Frame,
    FrameError,
    FrameHeader,
    decode_frame,
    encode_frame,
    read_header,
    tensors_hash,
)

CODEC_NAMES = sorted(CODECS)
HASH = "ab" * 32
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tensor_names = st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True)
values = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
    elements=values,
)
tensor_dicts = st.dictionaries(tensor_names, arrays, min_size=1, max_size=4)


def _header(codec: str = "fp32", **overrides: Any) -> FrameHeader:
    fields: dict[str, Any] = {
        "kind": "update",
        "federation": "lab-1",
        "round": 3,
        "codec": codec,
        "client_id": "pi-01",
        "base_hash": HASH,
        "num_samples": 600,
        "meta": {"train_loss": 0.5},
    }
    fields.update(overrides)
    return FrameHeader(**fields)


def _sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, size=(4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, size=(4,)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.1, size=(10, 30)).astype(np.float32),
        "scale": np.array(1.25, dtype=np.float32),
    }


def _encode(codec: str = "fp32", tensors: dict[str, np.ndarray] | None = None) -> bytes:
    tensors = _sample_tensors() if tensors is None else tensors
    return encode_frame(_header(codec), tensors, rng=np.random.default_rng(0)).payload


def _split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Header JSON and compressed body of a valid frame."""
    (hlen,) = struct.unpack_from("<I", frame, 4)
    return json.loads(frame[8 : 8 + hlen]), frame[8 + hlen :]


def _assemble(head: dict[str, Any] | bytes, body: bytes, *, compress: bool = True) -> bytes:
    """Build a frame by hand from a header (dict or raw bytes) and a body."""
    head_bytes = head if isinstance(head, bytes) else json.dumps(head).encode()
    if compress:
        body = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    return MAGIC + struct.pack("<I", len(head_bytes)) + head_bytes + body


def _hand_head(codec: str, tensors: list[dict[str, Any]], raw_len: int) -> dict[str, Any]:
    return {
        "kind": "update",
        "federation": "lab-1",
        "round": 0,
        "client_id": "pi-01",
        "base_hash": HASH,
        "codec": codec,
        "num_samples": 1,
        "meta": {},
        "raw_len": raw_len,
        "tensors": tensors,
    }


def _int8_scales(flat: np.ndarray, block: int) -> np.ndarray:
    """Per-value block scale max|x|/127 of the int8 codec, computed independently in fp64."""
    n = flat.size
    nblocks = -(-n // block)
    padded = np.zeros(nblocks * block, dtype=np.float64)
    padded[:n] = np.abs(flat.astype(np.float64))
    per_block = padded.reshape(nblocks, block).max(axis=1) / 127.0
    return np.repeat(per_block, block)[:n]


# --- round trips within the codec's error bound -----------------------------------------------


@FAST
@given(tensors=tensor_dicts)
def test_fp32_round_trip_is_exact(tensors: dict[str, np.ndarray]) -> None:
    frame = encode_frame(_header("fp32"), tensors).payload

    out = decode_frame(frame).tensors

    assert list(out) == list(tensors)
    for name, value in tensors.items():
        assert out[name].dtype == np.float32
        assert out[name].shape == value.shape
        assert np.array_equal(out[name], value)


@FAST
@given(tensors=tensor_dicts)
def test_fp16_round_trip_is_within_half_precision_bound(tensors: dict[str, np.ndarray]) -> None:
    frame = encode_frame(_header("fp16"), tensors).payload

    out = decode_frame(frame).tensors

    assert list(out) == list(tensors)
    for name, value in tensors.items():
        assert out[name].shape == value.shape
        x = value.astype(np.float64)
        err = np.abs(out[name].astype(np.float64) - x)
        # Round to nearest: relative 2**-11 for normal fp16, absolute 2**-25 for subnormals.
        assert np.all(err <= 2.0**-11 * np.abs(x) + 2.0**-25)


@FAST
@given(tensors=tensor_dicts, seed=st.integers(0, 2**32 - 1))
def test_int8_round_trip_error_is_below_block_scale(
    tensors: dict[str, np.ndarray], seed: int
) -> None:
    codec = CODECS["int8"]
    assert isinstance(codec, Int8Codec)
    frame = encode_frame(_header("int8"), tensors, rng=np.random.default_rng(seed)).payload

    out = decode_frame(frame).tensors

    assert list(out) == list(tensors)
    for name, value in tensors.items():
        assert out[name].shape == value.shape
        flat = value.ravel()
        err = np.abs(out[name].ravel().astype(np.float64) - flat.astype(np.float64))
        bound = _int8_scales(flat, codec.block) * (1 + 2.0**-20) + 2.0**-126
        assert np.all(err <= bound)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (257,), (2, 3, 4)])
def test_every_codec_preserves_shape_including_scalars_and_empty(
    codec: str, shape: tuple[int, ...]
) -> None:
    value = np.full(shape, 0.5, dtype=np.float32)

    out = decode_frame(encode_frame(_header(codec), {"t": value}).payload).tensors["t"]

    assert out.shape == shape
    assert out.dtype == np.float32


def test_int8_stochastic_rounding_is_unbiased() -> None:
    block = 64
    scale = 1.0 / 127.0  # max |x| = 1.0 sets the block scale
    # Values 0.3 of a quantisation step above a grid point: nearest rounding would be off by
    # 0.3·scale on every value; stochastic rounding must average that away.
    grid = np.arange(-60, 60, 120 / (block - 1))[: block - 1].round()
    tensor = np.concatenate([[1.0], (grid + 0.3) * scale]).astype(np.float32)
    rng = np.random.default_rng(1234)
    n = 2000

    total = np.zeros(block, dtype=np.float64)
    for _ in range(n):
        frame = encode_frame(_header("int8"), {"t": tensor}, rng=rng).payload
        total += decode_frame(frame).tensors["t"]
    mean = total / n

    # Per-value std of one encoding ≤ scale/2, so the mean's std ≤ scale/(2·√n) ≈ 0.011·scale.
    assert np.max(np.abs(mean - tensor)) < 0.06 * scale


def test_int8_is_deterministic_for_a_given_rng_seed() -> None:
    tensors = _sample_tensors()

    a = encode_frame(_header("int8"), tensors, rng=np.random.default_rng(5)).payload
    b = encode_frame(_header("int8"), tensors, rng=np.random.default_rng(5)).payload

    assert a == b


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_header_fields_survive_round_trip(codec: str) -> None:
    header = _header(
        codec,
        kind="model",
        round=17,
        client_id="pi-42",
        num_samples=12345,
        meta={"train_loss": 0.25, "val_samples": 60, "note": "ok"},
    )

    frame = decode_frame(encode_frame(header, _sample_tensors()).payload)

    assert frame.header == header
    assert read_header(encode_frame(header, _sample_tensors()).payload) == header


def test_decoded_frame_reports_its_size() -> None:
    payload = _encode()

    frame = decode_frame(payload)

    assert isinstance(frame, Frame)
    assert frame.nbytes == len(payload)


def test_int8_frame_of_lenet_sized_delta_is_under_30_percent_of_fp32() -> None:
    delta = np.random.default_rng(0).normal(0, 0.01, size=61_706).astype(np.float32)

    fp32 = encode_frame(_header("fp32"), {"delta": delta}).payload
    int8 = encode_frame(_header("int8"), {"delta": delta}, rng=np.random.default_rng(0)).payload

    assert len(int8) < 0.30 * len(fp32)


# --- tensors_hash ----------------------------------------------------------------------------


def test_tensors_hash_is_64_hex_digits() -> None:
    digest = tensors_hash(_sample_tensors())

    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")


def test_tensors_hash_ignores_dict_insertion_order() -> None:
    tensors = _sample_tensors()
    reversed_order = dict(reversed(list(tensors.items())))

    assert list(reversed_order) != list(tensors)
    assert tensors_hash(reversed_order) == tensors_hash(tensors)


@FAST
@given(tensors=tensor_dicts, data=st.data())
def test_tensors_hash_changes_when_any_value_changes(
    tensors: dict[str, np.ndarray], data: st.DataObject
) -> None:
    nonempty = sorted(n for n, v in tensors.items() if v.size)
    assume(nonempty)
    name = data.draw(st.sampled_from(nonempty))
    index = data.draw(st.integers(0, tensors[name].size - 1))
    changed = {n: v.copy() for n, v in tensors.items()}
    changed[name].reshape(-1)[index] += np.float32(1.0)

    assert tensors_hash(changed) != tensors_hash(tensors)


def test_tensors_hash_changes_when_a_shape_changes() -> None:
    tensors = _sample_tensors()
    reshaped = dict(tensors, **{"fc.weight": tensors["fc.weight"].reshape(30, 10)})

    assert tensors_hash(reshaped) != tensors_hash(tensors)


def test_tensors_hash_changes_when_a_name_changes() -> None:
    tensors = _sample_tensors()
    renamed = {("fc.w" if n == "fc.weight" else n): v for n, v in tensors.items()}

    assert tensors_hash(renamed) != tensors_hash(tensors)


def test_tensors_hash_changes_when_a_tensor_is_removed() -> None:
    tensors = _sample_tensors()
    fewer = {n: v for n, v in tensors.items() if n != "scale"}

    assert tensors_hash(fewer) != tensors_hash(tensors)


def test_tensors_hash_of_fp32_decoded_frame_equals_original() -> None:
    tensors = _sample_tensors()

    decoded = decode_frame(_encode("fp32", tensors)).tensors

    assert tensors_hash(decoded) == tensors_hash(tensors)


# --- decode_frame rejects --------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=300))
def test_random_bytes_raise_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(payload)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_truncation_of_a_valid_frame_raises_frame_error(codec: str) -> None:
    payload = _encode(codec)

    for cut in range(len(payload)):
        with pytest.raises(FrameError):
            decode_frame(payload[:cut])


@FAST
@given(codec=st.sampled_from(CODEC_NAMES), tensors=tensor_dicts, data=st.data())
def test_truncated_generated_frame_raises_frame_error(
    codec: str, tensors: dict[str, np.ndarray], data: st.DataObject
) -> None:
    payload = encode_frame(_header(codec), tensors).payload
    cut = data.draw(st.integers(0, len(payload) - 1))

    with pytest.raises(FrameError):
        decode_frame(payload[:cut])


def test_truncated_empty_body_frame_raises_frame_error() -> None:
    payload = _encode("fp32", {"t": np.zeros((0, 3), dtype=np.float32)})

    with pytest.raises(FrameError):
        decode_frame(payload[:-1])


@pytest.mark.parametrize("magic", [b"XMQ\x01", b"fmq\x01", b"\x00\x00\x00\x00", b"PK\x03\x04"])
def test_bad_magic_raises_frame_error(magic: bytes) -> None:
    payload = magic + _encode()[4:]

    with pytest.raises(FrameError, match="magic"):
        decode_frame(payload)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version_raises_frame_error(version: int) -> None:
    payload = MAGIC[:3] + bytes([version]) + _encode()[4:]

    with pytest.raises(FrameError, match="version"):
        decode_frame(payload)


@pytest.mark.parametrize("hlen", [MAX_HEADER_BYTES + 1, 2**32 - 1])
def test_header_length_above_limit_raises_frame_error(hlen: int) -> None:
    payload = bytearray(_encode())
    payload[4:8] = struct.pack("<I", hlen)

    with pytest.raises(FrameError, match="header length"):
        decode_frame(bytes(payload))


def test_header_length_beyond_payload_raises_frame_error() -> None:
    payload = bytearray(_encode())
    payload[4:8] = struct.pack("<I", len(payload))

    with pytest.raises(FrameError, match="header length"):
        decode_frame(bytes(payload))


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_tampered_raw_len_raises_frame_error(delta: int) -> None:
    head, body = _split(_encode())
    head["raw_len"] += delta

    with pytest.raises(FrameError, match="raw_len"):
        decode_frame(_assemble(head, body, compress=False))


def test_frame_bigger_than_max_bytes_raises_frame_error() -> None:
    payload = _encode()

    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(payload, max_bytes=len(payload) - 1)


def test_frame_of_exactly_max_bytes_decodes() -> None:
    payload = _encode()

    assert decode_frame(payload, max_bytes=len(payload)).tensors.keys() == (
        _sample_tensors().keys()
    )


def test_read_header_also_enforces_max_bytes() -> None:
    payload = _encode()

    with pytest.raises(FrameError, match="exceeds"):
        read_header(payload, max_bytes=100)


def _shapes() -> dict[str, tuple[int, ...]]:
    return {n: tuple(np.shape(v)) for n, v in _sample_tensors().items()}


def test_matching_expect_shapes_decodes() -> None:
    frame = decode_frame(_encode(), expect_shapes=_shapes())

    assert {n: v.shape for n, v in frame.tensors.items()} == _shapes()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"fc.weight": (30, 10)}, "fc.weight: got"),
        ({"extra": (2,)}, "missing"),
        ({"scale": None}, "unexpected"),
    ],
)
def test_shape_mismatch_with_expect_shapes_raises_frame_error(
    change: dict[str, tuple[int, ...] | None], expected: str
) -> None:
    want = _shapes()
    for name, shape in change.items():
        if shape is None:
            del want[name]
        else:
            want[name] = shape

    with pytest.raises(FrameError, match=expected):
        decode_frame(_encode(), expect_shapes=want)


@pytest.mark.parametrize("codec", ["zip", "", "FP32", 8, None])
def test_unknown_codec_in_header_raises_frame_error(codec: object) -> None:
    head, body = _split(_encode())
    head["codec"] = codec

    with pytest.raises(FrameError, match="codec"):
        decode_frame(_assemble(head, body, compress=False))


def test_unknown_codec_on_encode_raises_frame_error() -> None:
    with pytest.raises(FrameError, match="unknown codec"):
        encode_frame(_header("zip"), _sample_tensors())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_in_fp32_body_raises_frame_error(bad: float) -> None:
    body = np.array([1.0, bad, 3.0], dtype="<f4").tobytes()
    head = _hand_head("fp32", [{"name": "t", "shape": [3], "params": {}}], len(body))

    with pytest.raises(FrameError, match="non-finite"):
        decode_frame(_assemble(head, body))


def test_hand_built_fp32_frame_decodes() -> None:
    # Control for the hand-built rejections: the same construction with finite values works.
    body = np.array([1.0, 2.0, 3.0], dtype="<f4").tobytes()
    head = _hand_head("fp32", [{"name": "t", "shape": [3], "params": {}}], len(body))

    out = decode_frame(_assemble(head, body)).tensors["t"]

    assert out.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("scale", [-0.5, np.nan, np.inf])
def test_negative_or_non_finite_int8_scale_raises_frame_error(scale: float) -> None:
    body = np.array([scale], dtype="<f4").tobytes() + np.array([1, -2, 3], np.int8).tobytes()
    spec = {"name": "t", "shape": [3], "params": {"block": 256}}
    head = _hand_head("int8", [spec], len(body))

    with pytest.raises(FrameError, match="scale"):
        decode_frame(_assemble(head, body))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_int8_scale_that_overflows_on_decode_raises_frame_error() -> None:
    body = np.array([3e38], dtype="<f4").tobytes() + np.array([127], np.int8).tobytes()
    head = _hand_head("int8", [{"name": "t", "shape": [1], "params": {"block": 4}}], len(body))

    with pytest.raises(FrameError, match="non-finite"):
        decode_frame(_assemble(head, body))


@pytest.mark.parametrize("block", [0, -1, 2**21, "256", 1.5, True, None])
def test_bad_int8_block_size_raises_frame_error(block: object) -> None:
    head, body = _split(_encode("int8"))
    for spec in head["tensors"]:
        spec["params"]["block"] = block

    with pytest.raises(FrameError, match="block"):
        decode_frame(_assemble(head, body, compress=False))


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("kind", "gradient", "kind"),
        ("round", -1, "round"),
        ("round", "3", "round"),
        ("round", True, "round"),
        ("federation", 5, "federation"),
        ("client_id", None, "client_id"),
        ("base_hash", 1, "base_hash"),
        ("num_samples", -1, "num_samples"),
        ("num_samples", 2**40, "num_samples"),
        ("meta", [], "meta"),
        ("tensors", [], "tensor list"),
        ("tensors", "x", "tensor list"),
        ("raw_len", -1, "raw_len"),
        ("raw_len", "0", "raw_len"),
    ],
)
def test_invalid_header_field_raises_frame_error(field: str, value: Any, reason: str) -> None:
    head, body = _split(_encode())
    head[field] = value

    with pytest.raises(FrameError, match=reason):
        decode_frame(_assemble(head, body, compress=False))


@pytest.mark.parametrize("field", ["kind", "federation", "round", "codec"])
def test_header_missing_required_field_raises_frame_error(field: str) -> None:
    head, body = _split(_encode())
    del head[field]

    with pytest.raises(FrameError, match="lacks"):
        decode_frame(_assemble(head, body, compress=False))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda specs: specs[0].update(name="a/b"), "bad name"),
        (lambda specs: specs[1].update(name=specs[0]["name"]), "duplicate"),
        (lambda specs: specs[0].update(shape=[-1]), "bad shape"),
        (lambda specs: specs[0].update(shape=[1] * 9), "bad shape"),
        (lambda specs: specs[0].update(shape="4"), "bad shape"),
        (lambda specs: specs[0].update(params=[]), "bad params"),
        (lambda specs: specs.append(7), "not an object"),
        (lambda specs: specs[0].update(shape=[2**14, 2**15]), "too large"),
    ],
)
def test_invalid_tensor_spec_raises_frame_error(mutate: Any, reason: str) -> None:
    head, body = _split(_encode())
    mutate(head["tensors"])

    with pytest.raises(FrameError, match=reason):
        decode_frame(_assemble(head, body, compress=False))


@pytest.mark.parametrize("head_bytes", [b"not json", b"[1, 2]", b"\xff\xfe\xfd", b"", b'"string"'])
def test_header_that_is_not_a_json_object_raises_frame_error(head_bytes: bytes) -> None:
    with pytest.raises(FrameError, match="header"):
        decode_frame(_assemble(head_bytes, b""))


def test_corrupted_body_fails_checksum_with_frame_error() -> None:
    payload = bytearray(_encode("fp32"))
    payload[-10] ^= 0xFF

    with pytest.raises(FrameError):
        decode_frame(bytes(payload))


def test_non_bytes_payload_raises_frame_error() -> None:
    with pytest.raises(FrameError, match="not bytes"):
        decode_frame("FMQ\x01")  # type: ignore[arg-type]


def _mutations() -> st.SearchStrategy[Any]:
    """A list of (operation, position, bytes) edits to apply to a frame."""
    edit = st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "replace"]),
        st.integers(0, 10_000),
        st.binary(min_size=1, max_size=8),
    )
    return st.lists(edit, min_size=1, max_size=4)


def _apply(payload: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(payload)
    for op, pos, data in edits:
        i = pos % (len(buf) + 1)
        if op == "flip" and i < len(buf):
            buf[i] ^= data[0] or 1
        elif op == "set" and i < len(buf):
            buf[i] = data[0]
        elif op == "insert":
            buf[i:i] = data
        elif op == "delete":
            del buf[i : i + len(data)]
        elif op == "replace":
            buf[i : i + len(data)] = data
    return bytes(buf)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODEC_NAMES), edits=_mutations())
def test_mutated_frame_either_decodes_or_raises_frame_error(
    codec: str, edits: list[tuple[str, int, bytes]]
) -> None:
    payload = _apply(_encode(codec), edits)

    try:
        frame = decode_frame(payload, expect_shapes=None)
    except FrameError:
        return
    # Whatever decodes is a well-formed, finite result.
    for value in frame.tensors.values():
        assert value.dtype == np.float32
        assert np.isfinite(value).all()


def test_deeply_nested_header_raises_frame_error() -> None:
    payload = _assemble(b"[" * 100_000 + b"]" * 100_000, b"")

    with pytest.raises(FrameError):
        decode_frame(payload)


def test_header_with_huge_integer_literal_raises_frame_error() -> None:
    head = b'{"kind":"update","federation":"f","round":' + b"9" * 5000 + b',"codec":"fp32"}'

    with pytest.raises(FrameError):
        decode_frame(_assemble(head, b""))


@pytest.mark.parametrize(
    "shape",
    [pytest.param([2**70], id="dimension-too-big"), pytest.param([2**62, 4], id="wraps-to-0")],
)
def test_shape_whose_size_overflows_raises_frame_error(shape: list[int]) -> None:
    head = _hand_head("fp32", [{"name": "t", "shape": shape, "params": {}}], 0)

    with pytest.raises(FrameError):
        decode_frame(_assemble(head, b""))


def test_body_larger_than_raw_len_is_rejected_without_decompressing_it() -> None:
    head = _hand_head("fp32", [{"name": "t", "shape": [1], "params": {}}], 4)
    bomb_size = 64 * 1024 * 1024
    sink = zstandard.ZstdCompressor(write_checksum=True)
    chunk = bytes(1024 * 1024)
    out = io.BytesIO()
    with sink.stream_writer(out, size=bomb_size, closefd=False) as writer:
        for _ in range(bomb_size // len(chunk)):
            writer.write(chunk)
    payload = _assemble(head, out.getvalue(), compress=False)
    assert len(payload) < 64 * 1024  # a small frame that expands 1000x

    tracemalloc.start()
    try:
        with pytest.raises(FrameError):
            decode_frame(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 8 * 1024 * 1024


def test_zstd_header_declaring_huge_content_size_raises_frame_error() -> None:
    head = _hand_head("fp32", [{"name": "t", "shape": [1], "params": {}}], 4)
    # zstd magic, descriptor (8-byte content size + checksum), window byte, size 2**62.
    body = b"\x28\xb5\x2f\xfd\xc4\x58" + (2**62).to_bytes(8, "little") + b"\x01\x00\x00"

    with pytest.raises(FrameError):
        decode_frame(_assemble(head, body, compress=False))


def test_encode_frame_of_no_tensors_is_rejected_or_round_trips() -> None:
    try:
        payload = encode_frame(_header("fp32"), {}).payload
    except FrameError:
        return

    assert decode_frame(payload).tensors == {}


# --- encode_frame rejects --------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite_values(codec: str, bad: float) -> None:
    tensors = {"ok": np.ones(3, np.float32), "t": np.array([0.0, bad], dtype=np.float32)}

    with pytest.raises(FrameError, match="non-finite"):
        encode_frame(_header(codec), tensors)


@pytest.mark.parametrize("value", [65505.0, 70000.0, -1e5, 3e38])
def test_encode_rejects_fp16_overflow(value: float) -> None:
    with pytest.raises(FrameError, match="fp16"):
        encode_frame(_header("fp16"), {"t": np.array([1.0, value], dtype=np.float32)})


def test_encode_accepts_largest_fp16_value() -> None:
    payload = encode_frame(_header("fp16"), {"t": np.array([65504.0], dtype=np.float32)}).payload

    assert decode_frame(payload).tensors["t"].tolist() == [65504.0]


@pytest.mark.parametrize("name", ["", "a/b", "a b", "ü", "x" * 201])
def test_encode_rejects_illegal_tensor_names(name: str) -> None:
    with pytest.raises(FrameError, match="not allowed"):
        encode_frame(_header(), {name: np.ones(2, np.float32)})
