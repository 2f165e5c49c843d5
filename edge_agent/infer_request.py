"""Inference requests off the network, parsed with every bound checked before memory is spent.

A request is JSON ``{"id": .., "x": [...]}`` (small batches, at most :data:`MAX_JSON_BYTES`)
or ``.npz`` bytes holding ``x`` and optionally ``id`` (``np.savez``; at most
:data:`MAX_NPZ_BYTES`). Pure: no MQTT, no clock, no model.

Why the care: a request comes from whoever may publish on the request topic, and a server
that dies or swaps on one request serves nobody. So

- JSON is decoded against a typed schema (msgspec): ``x`` nests at most four levels, so a
  deeply nested document is refused at its fifth level, never by exhausting the stack;
- an npz's zip directory is bounded before :mod:`zipfile` parses it, and each member's
  ``.npy`` header (shape, dtype) is read and checked against the model's input and the batch
  bound *before* its data is inflated: megabytes of deflated zeros never become gigabytes;
- ``id`` must be a short string or a 64-bit integer, so every reply can be JSON-encoded;
- nothing is unpickled (object arrays are refused by dtype, before any read).

Every refusal is a :class:`RequestError` carrying the request id when one was readable.
"""

from __future__ import annotations

import io
import math
import re
import struct
import tokenize
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np

from edge_agent.inference import MAX_BATCH, InferenceError

MAX_NPZ_BYTES = 16 * 1024 * 1024  # a float32 batch of MAX_BATCH 28×28 samples is 12.8 MB
# JSON becomes one Python float object per value (~32 bytes): 1 MiB of "0," is ~16 MB held
# briefly. Larger batches travel as npz.
MAX_JSON_BYTES = 1024 * 1024
MAX_ID_CHARS = 128
MAX_NPZ_MEMBERS = 4  # x.npy, id.npy and room for a stray member
# The zip central directory is parsed whole by zipfile; ~46 bytes + name per entry, so this
# caps it at a few hundred entries however the archive's header counts them.
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default bound on a .npy header
_X_KINDS = "biuf"  # bool, signed, unsigned, float: what a pixel can be
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
# An "id" that opens the object: read without touching (or recursing into) what follows.
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){0,512}"|-?[0-9]{1,20}|null)\s*[,}]')

RequestId = (
    Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    | Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    | None
)


class RequestError(InferenceError):
    """A request that cannot be served; ``request_id`` is its id when that was readable."""

    def __init__(self, reason: str, request_id: str | int | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


@dataclass(frozen=True)
class RequestLimits:
    """What the served model accepts: one sample's shape (e.g. C×H×W) and the largest batch."""

    sample_shape: tuple[int, ...]
    max_batch: int = MAX_BATCH

    def check_x(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        """Refuse an ``x`` of this shape and dtype (from a header: nothing read yet)."""
        if dtype.kind not in _X_KINDS or dtype.fields is not None or dtype.itemsize > 8:
            raise InferenceError(f"x has dtype {dtype.str!r}: want integers or floats")
        sample = tuple(self.sample_shape)
        if shape == sample:
            return
        if len(shape) != len(sample) + 1 or tuple(shape[1:]) != sample:
            raise InferenceError(f"x has shape {shape}: want N×{sample} or one {sample} sample")
        if shape[0] < 1:
            raise InferenceError("empty batch")
        if shape[0] > self.max_batch:
            raise InferenceError(f"batch of {shape[0]} exceeds {self.max_batch}")


@dataclass(frozen=True)
class InferenceRequest:
    """A parsed request: its id (echoed in the reply) and the batch, shape already checked."""

    id: str | int | None
    x: np.ndarray


class _JsonRequest(msgspec.Struct, forbid_unknown_fields=True):
    # Unknown fields are refused, not skipped: skipping a value recurses into it.
    id: RequestId = None
    # A batch of samples of 1 to 3 dims (N×C×H×W, N×C×L, N×F), or one sample: at most four
    # levels, whatever the payload nests.
    x: list[float | list[float | list[float | list[float]]]] = []


class _IdOnly(msgspec.Struct):
    id: RequestId = None


def parse_request(payload: bytes, limits: RequestLimits) -> InferenceRequest:
    """The request in ``payload`` (npz when it starts like a zip, else JSON); RequestError."""
    if payload[:2] == b"PK":
        return _parse_npz(payload, limits)
    return _parse_json(payload, limits)


def read_request_id(payload: bytes) -> str | int | None:
    """The request's id when it can be read cheaply and safely, else None (best effort)."""
    try:
        if payload[:2] == b"PK":
            if len(payload) > MAX_NPZ_BYTES:
                return None
            with _open_zip(payload) as zf:
                return _npz_id(zf)
        if len(payload) > MAX_JSON_BYTES:
            return None
        leading = _LEADING_ID.match(payload)  # the documented order: {"id": .., "x": ..}
        if leading:
            return msgspec.json.decode(leading.group(1), type=RequestId)
        return msgspec.json.decode(payload, type=_IdOnly).id
    except (RequestError, msgspec.DecodeError, RecursionError):
        # RecursionError: skipping a pathologically nested "x" to reach an "id" after it; the
        # id is then not readable (the full parse refuses such a payload without recursing).
        return None


def _parse_json(payload: bytes, limits: RequestLimits) -> InferenceRequest:
    if len(payload) > MAX_JSON_BYTES:
        raise RequestError(
            f"JSON request of {len(payload)} bytes exceeds {MAX_JSON_BYTES} (send npz)"
        )
    try:
        body = msgspec.json.decode(payload, type=_JsonRequest)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise RequestError(
            f"bad JSON request (want {{'id': .., 'x': [...]}}): {exc}", read_request_id(payload)
        ) from exc
    try:
        x = np.asarray(body.x, dtype=np.float32)
    except ValueError as exc:  # ragged nesting
        raise RequestError(f"x is not a regular array: {exc}", body.id) from exc
    try:
        limits.check_x(x.shape, x.dtype)
    except InferenceError as exc:
        raise RequestError(str(exc), body.id) from exc
    return InferenceRequest(body.id, x)


def _parse_npz(payload: bytes, limits: RequestLimits) -> InferenceRequest:
    if len(payload) > MAX_NPZ_BYTES:
        raise RequestError(f"npz request of {len(payload)} bytes exceeds {MAX_NPZ_BYTES}")
    with _open_zip(payload) as zf:
        rid = _npz_id(zf)
        if "x.npy" not in zf.NameToInfo:
            raise RequestError("npz request has no 'x' array", rid)
        try:
            x = _read_npy(zf, "x.npy", limits.check_x)
        except InferenceError as exc:
            raise RequestError(f"npz 'x': {exc}", rid) from exc
    return InferenceRequest(rid, x)


def _open_zip(payload: bytes) -> zipfile.ZipFile:
    """A ZipFile over ``payload`` once its directory is known to be small (RequestError)."""
    _check_zip_directory(payload)
    try:
        zf = zipfile.ZipFile(io.BytesIO(payload))
    except (zipfile.BadZipFile, ValueError, struct.error, OSError, NotImplementedError) as exc:
        # NotImplementedError: zipfile's answer to an archive version or flag it lacks.
        raise RequestError(f"bad npz request: {exc}") from exc
    if len(zf.infolist()) > MAX_NPZ_MEMBERS:
        zf.close()
        raise RequestError(f"npz request has more than {MAX_NPZ_MEMBERS} members")
    return zf


def _check_zip_directory(payload: bytes) -> None:
    """Refuse a zip whose central directory is large, before :mod:`zipfile` parses it.

    Finds the end-of-central-directory record the way :mod:`zipfile` does (the last 22
    bytes, else the last signature within the maximal comment) and reads its sizes.
    """
    end = len(payload) - _EOCD_SIZE
    if end < 0 or payload[end : end + 4] != _EOCD:
        end = payload.rfind(_EOCD, max(0, len(payload) - _EOCD_SIZE - 0xFFFF))
    if end < 0 or end + _EOCD_SIZE > len(payload):
        raise RequestError("bad npz request: not a zip archive")
    if end >= 20 and payload[end - 20 : end - 16] == _ZIP64_LOCATOR:
        raise RequestError("bad npz request: zip64 archives are not accepted")
    _, _, _, _, entries, directory_bytes, _, _ = struct.unpack(
        "<4s4H2LH", payload[end : end + _EOCD_SIZE]
    )
    if entries > MAX_NPZ_MEMBERS or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise RequestError(
            f"npz request has {entries} members in a {directory_bytes}-byte directory "
            f"(at most {MAX_NPZ_MEMBERS} members, {MAX_ZIP_DIRECTORY_BYTES} bytes)"
        )


def _npz_id(zf: zipfile.ZipFile) -> str | int | None:
    if "id.npy" not in zf.NameToInfo:
        return None
    try:
        value = _read_npy(zf, "id.npy", _check_id).reshape(()).item()
    except InferenceError as exc:
        raise RequestError(f"npz 'id': {exc}") from exc
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise RequestError("npz 'id': bytes that are not UTF-8") from exc
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise RequestError("npz 'id': integer out of the 64-bit range")
    return value  # str or int, by _check_id


def _check_id(shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if math.prod(shape) != 1 or len(shape) > 1:
        raise InferenceError(f"shape {shape}: want one value")
    if dtype.kind in "iu":
        return
    chars = dtype.itemsize // 4 if dtype.kind == "U" else dtype.itemsize
    if dtype.kind not in "US" or chars > MAX_ID_CHARS:
        raise InferenceError(
            f"dtype {dtype.str!r}: want an integer or a string of at most {MAX_ID_CHARS} chars"
        )


def _read_npy(zf: zipfile.ZipFile, name: str, check: Any) -> np.ndarray:
    """Member ``name`` as an array: header read and ``check(shape, dtype)`` first, then at
    most the bytes the checked header declares (InferenceError)."""
    info = zf.NameToInfo[name]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # bzip2/lzma members inflate a whole block per read: no bound on one read's output.
        raise InferenceError(f"compression method {info.compress_type} (want stored/deflated)")
    if info.flag_bits & 0x1:
        raise InferenceError("encrypted member")
    try:
        with zf.open(info) as fh:
            shape, fortran, dtype = _npy_header(fh)
            check(shape, dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            data = fh.read(nbytes)
    except InferenceError:
        raise  # check()'s refusal (an InferenceError is a ValueError): keep its words
    except (
        ValueError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        struct.error,
        NotImplementedError,  # a local header flag zipfile does not support
    ) as exc:
        raise InferenceError(f"unreadable .npy member: {exc}") from exc
    if len(data) != nbytes:
        raise InferenceError(f"truncated: {len(data)} of {nbytes} bytes")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape))
    return flat.reshape(shape, order="F" if fortran else "C")


def _npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, Fortran order, dtype) of the ``.npy`` stream at ``fh``; ValueError if malformed."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        read = np.lib.format.read_array_header_1_0
    elif version == (2, 0):
        read = np.lib.format.read_array_header_2_0
    else:  # 3.0 exists only for structured dtypes with non-Latin-1 names
        raise ValueError(f".npy format version {version} not accepted")
    try:
        with warnings.catch_warnings():
            # numpy warns, then re-parses, on a header its own writer never produces.
            warnings.simplefilter("error")
            shape, fortran, dtype = read(fh, max_header_size=MAX_NPY_HEADER_BYTES)
    except (SyntaxError, TypeError, tokenize.TokenError, Warning) as exc:
        # What numpy's header parser lets escape besides ValueError (found by fuzzing).
        raise ValueError(f"malformed .npy header: {exc}") from exc
    if dtype.hasobject:
        raise ValueError("object arrays are never loaded (they would need pickle)")
    if any(n < 0 for n in shape):  # numpy does not check: a negative size would read it all
        raise ValueError(f"negative dimension in shape {shape}")
    return tuple(int(n) for n in shape), bool(fortran), dtype
