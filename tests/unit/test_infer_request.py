"""Inference requests: every malformed or oversized one is refused with a reason, never raised
past the parser, and an npz's header is checked before its data is inflated."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.infer_request import (
    MAX_JSON_BYTES,
    MAX_NPZ_MEMBERS,
    RequestError,
    RequestLimits,
    parse_request,
    read_request_id,
)

SAMPLE = (1, 8, 8)
LIMITS = RequestLimits(SAMPLE, max_batch=16)


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(header: dict[str, Any], data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _deflated_zeros(shape: tuple[int, ...], extra: dict[str, bytes] | None = None) -> bytes:
    """An npz whose uint8 ``x`` of ``shape`` is all zeros, written in slices (no big array)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        with zf.open("x.npy", "w") as fh:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fh, header)
            left = int(np.prod(shape))
            while left:
                step = min(left, 1 << 22)
                fh.write(bytes(step))
                left -= step
    return buf.getvalue()


def _refusal(payload: bytes, limits: RequestLimits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as err:
        parse_request(payload, limits)
    return err.value


# --- well-formed requests -------------------------------------------------------------------
def test_json_batch_is_parsed_with_its_id() -> None:
    x = np.full((3, *SAMPLE), 0.5).tolist()

    request = parse_request(json.dumps({"id": "req-1", "x": x}).encode(), LIMITS)

    assert request.id == "req-1" and request.x.shape == (3, *SAMPLE)


def test_json_single_sample_is_accepted() -> None:
    request = parse_request(json.dumps({"id": 4, "x": np.zeros(SAMPLE).tolist()}).encode(), LIMITS)

    assert request.id == 4 and request.x.shape == SAMPLE


def test_npz_batch_is_parsed_with_a_string_id() -> None:
    payload = _npz(x=np.zeros((2, *SAMPLE), np.uint8), id=np.array("cam-3"))

    request = parse_request(payload, LIMITS)

    assert request.id == "cam-3" and request.x.shape == (2, *SAMPLE)
    assert request.x.dtype == np.uint8


def test_npz_fortran_ordered_x_keeps_its_values() -> None:
    x = np.asfortranarray(np.arange(2 * 64, dtype=np.float32).reshape(2, *SAMPLE))

    request = parse_request(_npz(x=x), LIMITS)

    assert np.array_equal(request.x, x)


# --- malformed JSON -------------------------------------------------------------------------
def test_deeply_nested_json_x_is_refused_at_the_fifth_level_with_its_id() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    payload = f'{{"id": "req-7", "x": {deep}}}'.encode()

    err = _refusal(payload)

    assert "$.x[0][0][0][0]" in str(err)
    assert err.request_id == "req-7"


def test_deeply_nested_json_document_is_refused_without_recursion() -> None:
    err = _refusal(b"[" * 200_000 + b"]" * 200_000)

    assert "bad JSON request" in str(err) and err.request_id is None


def test_unknown_json_field_is_refused_before_its_value_is_read() -> None:
    payload = b'{"id": 1, "junk": ' + b"[" * 100_000 + b"]" * 100_000 + b', "x": []}'

    err = _refusal(payload)

    assert "unknown field `junk`" in str(err)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param('{"id": 1.5, "x": []}', "$.id", id="float-id"),
        pytest.param('{"id": [1, 2], "x": []}', "$.id", id="list-id"),
        pytest.param('{"id": "' + "a" * 129 + '", "x": []}', "length <= 128", id="long-id"),
        pytest.param('{"id": ' + "9" * 40 + ', "x": []}', "<= 922337203685", id="huge-int-id"),
        pytest.param('{"id": 1, "x": [[["a"]]]}', "got `str`", id="string-pixel"),
        pytest.param('{"id": 1, "x": 3}', "$.x", id="scalar-x"),
        pytest.param("[1, 2]", "Expected `object`", id="not-an-object"),
        pytest.param("{not json", "bad JSON", id="not-json"),
    ],
)
def test_malformed_json_is_refused_naming_the_field(body: str, reason: str) -> None:
    err = _refusal(body.encode())

    assert reason in str(err)


def test_ragged_json_x_is_refused_with_its_id() -> None:
    err = _refusal(b'{"id": "r", "x": [[[[1, 2]], [[3]]]]}')

    assert "not a regular array" in str(err) and err.request_id == "r"


def test_json_of_the_wrong_sample_shape_is_refused_with_its_id() -> None:
    err = _refusal(json.dumps({"id": 9, "x": np.zeros((2, 1, 4, 4)).tolist()}).encode())

    assert "want N×(1, 8, 8)" in str(err) and err.request_id == 9


def test_json_over_the_size_bound_is_refused_unread() -> None:
    payload = b'{"id": 1, "x": [' + b"0," * MAX_JSON_BYTES + b"0]}"

    err = _refusal(payload)

    assert f"exceeds {MAX_JSON_BYTES}" in str(err)


# --- malformed npz --------------------------------------------------------------------------
def test_npz_with_a_complex_id_is_refused() -> None:
    err = _refusal(_npz(x=np.zeros((1, *SAMPLE), np.float32), id=np.array(1 + 2j)))

    assert str(err).startswith("npz 'id': dtype '<c16': want an integer or a string")


def test_npz_with_a_string_x_is_refused_with_its_id() -> None:
    err = _refusal(_npz(x=np.full((2, *SAMPLE), "a"), id=np.array(42)))

    assert "dtype '<U1'" in str(err) and err.request_id == 42


def test_npz_without_x_is_refused_with_its_id() -> None:
    err = _refusal(_npz(y=np.zeros(3), id=np.array("no-x")))

    assert "no 'x' array" in str(err) and err.request_id == "no-x"


def test_npz_memory_bomb_is_refused_from_its_header_before_inflating() -> None:
    # 64,000 × 784 zeros: 50 MB once inflated, ~50 kB deflated.
    bomb = _deflated_zeros((64_000, 1, 28, 28))
    limits = RequestLimits((1, 28, 28), max_batch=4096)
    tracemalloc.start()
    try:
        err = _refusal(bomb, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert str(err) == "npz 'x': batch of 64000 exceeds 4096"
    assert peak < 2 * 1024 * 1024  # nothing near the 50 MB the data would inflate to


def test_npz_header_claiming_less_than_its_data_reads_only_the_claim() -> None:
    member = _npy({"descr": "|u1", "fortran_order": False, "shape": (1, *SAMPLE)}, bytes(10**6))

    request = parse_request(_zip({"x.npy": member}), LIMITS)

    assert request.x.shape == (1, *SAMPLE)


def test_npz_header_claiming_more_than_its_data_is_refused_as_truncated() -> None:
    member = _npy({"descr": "<f4", "fortran_order": False, "shape": (4, *SAMPLE)}, bytes(100))

    err = _refusal(_zip({"x.npy": member}))

    assert "truncated" in str(err)


def test_npz_header_with_a_negative_dimension_is_refused() -> None:
    member = _npy({"descr": "|u1", "fortran_order": False, "shape": (-1, *SAMPLE)}, bytes(64))

    err = _refusal(_zip({"x.npy": member}))

    assert "negative dimension" in str(err)


def test_npz_object_array_is_refused_before_any_unpickling() -> None:
    member = _npy({"descr": "|O", "fortran_order": False, "shape": (1, *SAMPLE)}, b"\x80\x04.")

    err = _refusal(_zip({"x.npy": member}))

    assert "object arrays are never loaded" in str(err)


def _raw_npy(header: bytes, data: bytes = bytes(128)) -> bytes:
    """A version 1.0 .npy with ``header`` as its text, verbatim (numpy would not write it)."""
    pad = 64 - (10 + len(header) + 1) % 64
    size = (len(header) + pad + 1).to_bytes(2, "little")
    return b"\x93NUMPY\x01\x00" + size + header + b" " * pad + b"\n" + data


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(
            b"{'descr': ',u1', 'fortran_order': False, 'shape': (2, 1,8, 8), }", id="syntax"
        ),
        pytest.param(
            b"{'descr': '|u1',b'fortran_order': False, 'h7pe': (2, 1, 8, 8), }", id="type"
        ),
        pytest.param(
            b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 1, 8, 8, }", id="token"
        ),
    ],
)
def test_npz_with_a_malformed_npy_header_is_refused(header: bytes) -> None:
    # Headers that made numpy's parser raise SyntaxError, TypeError or TokenError (fuzzing).
    err = _refusal(_zip({"x.npy": _raw_npy(header)}))

    assert "npz 'x'" in str(err)


def test_npz_with_many_members_is_refused_before_its_directory_is_parsed() -> None:
    members = {f"m{i}.npy": b"" for i in range(1000)}

    err = _refusal(_zip(members, zipfile.ZIP_STORED))

    assert "1000 members" in str(err) and f"at most {MAX_NPZ_MEMBERS}" in str(err)


def test_npz_bzip2_member_is_refused() -> None:
    member = _npy({"descr": "|u1", "fortran_order": False, "shape": (1, *SAMPLE)}, bytes(64))

    err = _refusal(_zip({"x.npy": member}, zipfile.ZIP_BZIP2))

    assert "compression method 12" in str(err)


def test_npz_empty_batch_is_refused() -> None:
    err = _refusal(_npz(x=np.zeros((0, *SAMPLE), np.uint8)))

    assert "empty batch" in str(err)


# --- ids for error replies ------------------------------------------------------------------
def test_request_id_is_read_from_json_whose_x_is_unusable() -> None:
    assert read_request_id(b'{"id": "abc", "x": "not an array"}') == "abc"


def test_request_id_is_read_from_an_npz() -> None:
    assert read_request_id(_npz(x=np.array(["s"]), id=np.array(7))) == 7


def test_request_id_of_garbage_is_none() -> None:
    assert read_request_id(b"PK\x03\x04garbage") is None


# --- fuzzing --------------------------------------------------------------------------------
_VALID = _npz(x=np.zeros((2, *SAMPLE), np.uint8), id=np.array("fuzz"))


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(0, len(_VALID) - 1),
    value=st.integers(0, 255),
    cut=st.integers(1, len(_VALID)),
)
def test_corrupted_npz_requests_are_refused_or_parsed_never_raised(
    position: int, value: int, cut: int
) -> None:
    corrupt = bytearray(_VALID)
    corrupt[position] = value

    for payload in (bytes(corrupt), _VALID[:cut]):
        try:
            request = parse_request(payload, LIMITS)
        except RequestError:
            continue
        assert request.x.shape in ((2, *SAMPLE), SAMPLE)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=512))
def test_random_payloads_are_refused_with_a_reason(payload: bytes) -> None:
    for candidate in (payload, b"PK" + payload):
        with pytest.raises(RequestError) as err:
            parse_request(candidate, LIMITS)

        assert str(err.value)
        assert isinstance(read_request_id(candidate), int | str | None)
