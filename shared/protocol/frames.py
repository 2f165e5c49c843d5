"""Self-describing binary frames for tensor payloads (global models and weight deltas).

Frame layout (little endian)::

    b"FMQ" + version byte | u32 header length | header | zstd(body)

Version 1 (``MAGIC``): the header is UTF-8 JSON. Version 3 (``MAGIC_COMPACT``, written for
sparse codecs, whose frames are so small that the JSON header would be half of them): the
header is zstd(UTF-8 JSON) with a fixed built-in dictionary
(:mod:`shared.protocol.header_dict`), one complete zstd frame with its declared size
(≤ ``MAX_HEADER_BYTES``) and checksum. Both versions are always decoded; dense codecs keep
writing version 1, so devices that only know version 1 keep working with them. (Version 2
was never used and stays rejected.)

The JSON header names the frame kind, federation, round, client, base-model hash, codec,
sample count and every tensor (name, shape, codec parameters), so a frame can be decoded and
checked without any other context. The body is the concatenation of each tensor's encoded
bytes, compressed with zstd (with its content checksum). Nothing here executes payload data:
no pickle, no ``torch.load``. Decoding validates every length, shape and value and raises
:class:`FrameError` with a reason; the caller turns that into a receipt.

Encoding returns what the frame sends (:class:`EncodedFrame`), computed by the value codecs
from their own codes, bit-identical to what decoding the frame gives: the sender never needs
to decode its own frame. :func:`encode_tensors` and :func:`pack_frame` are the two halves, for
a sender that learns part of the header (a model hash) only from the encoded tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from shared.compression.lowrank import LowRankCodec
from shared.compression.quantize import CodecError, TensorCodec
from shared.compression.registry import BIASED_CODECS, resolve_codec
from shared.compression.topk import TopKCodec
from shared.protocol.header_dict import HEADER_DICT

MAGIC = b"FMQ\x01"
MAGIC_COMPACT = b"FMQ\x03"
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_ELEMENTS = 1 << 28  # 1 GiB of fp32: far above any model a Pi trains
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_RAW_BYTES = 1024 * 1024 * 1024
_TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_KINDS = ("update", "model", "global_delta")

Tensors = dict[str, np.ndarray]


class FrameError(ValueError):
    """A binary frame is malformed, inconsistent or does not match what was expected."""


class NonFiniteError(FrameError):
    """A tensor holds (or decodes to) NaN or ±inf: a well-formed frame with unusable values."""


class ShapeMismatchError(FrameError):
    """A well-formed frame whose tensor names/shapes are not the expected model's."""


@dataclass(frozen=True)
class FrameHeader:
    """What a frame says about itself."""

    kind: str
    federation: str
    round: int
    codec: str
    client_id: str = ""
    base_hash: str = ""
    num_samples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its header and fp32 tensors in frame order."""

    header: FrameHeader
    tensors: Tensors
    nbytes: int


def tensors_hash(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and fp32 bytes, in name order: the identity of a model."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(name.encode())
        h.update(json.dumps(list(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EncodedTensors:
    """Tensors encoded with one codec, not yet framed: the header's tensor table, the body,
    and ``sent``, what :func:`decode_frame` will return for them (bit for bit)."""

    codec: str
    specs: list[dict[str, Any]]
    body: bytes
    sent: Tensors


@dataclass(frozen=True)
class EncodedFrame:
    """A frame and the tensors it carries (exactly what decoding ``payload`` gives)."""

    payload: bytes
    sent: Tensors


def encode_frame(
    header: FrameHeader,
    tensors: Mapping[str, np.ndarray],
    rng: np.random.Generator | None = None,
    level: int = 3,
    compact: bool | None = None,
) -> EncodedFrame:
    """Encode ``tensors`` with ``header.codec`` into one frame; also what it sends.

    ``compact`` (default: for sparse codecs) writes a version-3 frame, zstd-compressed header.
    A codec with a density schedule encodes with the density of ``header.round``.
    """
    encoded = encode_tensors(tensors, codec=header.codec, round_id=header.round, rng=rng)
    return EncodedFrame(pack_frame(header, encoded, level=level, compact=compact), encoded.sent)


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    codec: str,
    round_id: int,
    rng: np.random.Generator | None = None,
) -> EncodedTensors:
    """Encode ``tensors`` with ``codec`` (at the density of ``round_id``), ready to be framed.

    Raises FrameError for a bad name, a non-finite value, or a value the codec cannot carry.
    """
    value_codec = _codec(codec, FrameError)
    if isinstance(value_codec, TopKCodec):
        value_codec = value_codec.at_round(round_id)
    if not 0 < len(tensors) <= MAX_TENSORS:
        raise FrameError(f"a frame holds 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    rng = rng if rng is not None else np.random.default_rng()
    specs: list[dict[str, Any]] = []
    parts: list[bytes] = []
    sent: Tensors = {}
    for name, value in tensors.items():
        arr = np.asarray(value, dtype=np.float32)
        if not _TENSOR_NAME_RE.fullmatch(name):
            raise FrameError(f"tensor name {name!r} is not allowed in a frame")
        if not np.isfinite(arr).all():
            raise NonFiniteError(f"tensor {name!r} has non-finite values")
        try:
            if isinstance(value_codec, LowRankCodec):  # needs the matrix shape, not a flat array
                enc = value_codec.encode_tensor(arr, rng)
            else:
                enc = value_codec.encode(arr.ravel(), rng)
        except CodecError as exc:
            raise FrameError(f"tensor {name!r}: {exc}") from exc
        if not np.isfinite(enc.sent).all():  # the decoder would refuse the frame
            raise NonFiniteError(f"tensor {name!r} would decode to non-finite values")
        specs.append({"name": name, "shape": list(arr.shape), "params": enc.params})
        parts.append(enc.data)
        sent[name] = enc.sent.reshape(arr.shape)
    return EncodedTensors(codec, specs, b"".join(parts), sent)


def pack_frame(
    header: FrameHeader, encoded: EncodedTensors, *, level: int = 3, compact: bool | None = None
) -> bytes:
    """The frame of ``encoded`` under ``header`` (whose codec must be the one that encoded it).

    ``compact`` (default: for sparse codecs) writes a version-3 frame, zstd-compressed header.
    """
    if header.codec != encoded.codec:
        raise FrameError(f"header names codec {header.codec!r}, tensors are {encoded.codec!r}")
    if compact is None:
        compact = isinstance(_codec(header.codec, FrameError), BIASED_CODECS)
    body = encoded.body
    head = {
        "kind": header.kind,
        "federation": header.federation,
        "round": header.round,
        "client_id": header.client_id,
        "base_hash": header.base_hash,
        "codec": header.codec,
        "num_samples": header.num_samples,
        "meta": header.meta,
        "raw_len": len(body),
        "tensors": encoded.specs,
    }
    head_bytes = json.dumps(head, separators=(",", ":")).encode()
    if compact and len(body) <= 1 << 22:
        level = max(level, 19)  # small sparse / low-rank bodies: the best ratio costs ~ms
    zc = zstandard.ZstdCompressor(level=level, write_checksum=True)
    compressed = zc.compress(body)
    magic = MAGIC
    if compact:
        zh = zstandard.ZstdCompressor(
            level=19, dict_data=HEADER_DICT, write_checksum=True, write_dict_id=False
        )
        magic, head_bytes = MAGIC_COMPACT, zh.compress(head_bytes)
    return magic + _HEADER_LEN.pack(len(head_bytes)) + head_bytes + compressed


def decode_frame(
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    expect_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
) -> Frame:
    """Decode and fully validate a frame; raise FrameError with a reason on any problem.

    ``expect_shapes`` (name → shape) rejects frames whose tensors do not match the model;
    ``max_raw_bytes`` bounds the decompressed size (a small frame may expand enormously).
    """
    # The header is parsed once (a compact one is also inflated once) for both uses.
    head_json, body_start = _split_header(payload, max_bytes)
    head = _frame_header(head_json)
    codec = _codec(head.codec, FrameError)
    specs, raw_len = _tensor_specs(head_json)
    if expect_shapes is not None:
        got = {s.name: s.shape for s in specs}
        if got != dict(expect_shapes):
            raise ShapeMismatchError(
                f"tensor names/shapes do not match the model: {_shape_diff(got, expect_shapes)}"
            )
    sizes = [_spec_size(codec, s) for s in specs]
    if sum(sizes) != raw_len:
        raise FrameError(f"header raw_len {raw_len} does not match tensors ({sum(sizes)} bytes)")
    if raw_len > max_raw_bytes:
        raise FrameError(f"frame would decode to {raw_len} bytes, over the limit {max_raw_bytes}")
    body = _decompress(payload[body_start:], raw_len)
    tensors: Tensors = {}
    offset = 0
    view = memoryview(body)
    for spec, size in zip(specs, sizes, strict=True):
        try:
            flat = codec.decode(view[offset : offset + size], spec.numel, spec.params)
        except CodecError as exc:
            raise FrameError(f"tensor {spec.name!r}: {exc}") from exc
        if not np.isfinite(flat).all():
            raise NonFiniteError(f"tensor {spec.name!r} decodes to non-finite values")
        tensors[spec.name] = flat.reshape(spec.shape)
        offset += size
    return Frame(head, tensors, len(payload))


def _decompress(data: bytes, raw_len: int) -> bytes:
    """zstd-decompress exactly one complete frame of exactly ``raw_len`` bytes.

    The declared content size is checked first, so a bomb is refused before any allocation,
    and a truncated frame (no end of frame / checksum) is refused even when it is tiny.
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"body is not a zstd frame: {exc}") from exc
    if declared != raw_len:
        raise FrameError(f"body declares {declared} bytes, header says {raw_len}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        body = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"body does not decompress: {exc}") from exc
    if not dobj.eof or dobj.unused_data:
        raise FrameError("body is truncated or has trailing data")
    if len(body) != raw_len:
        raise FrameError(f"body is {len(body)} bytes, header says {raw_len}")
    return body


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    numel: int
    params: dict[str, Any]


def read_header(payload: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameHeader:
    """Parse only the header: cheap enough to reject a frame before decompressing it."""
    return _frame_header(_split_header(payload, max_bytes)[0])


def _frame_header(head: dict[str, Any]) -> FrameHeader:
    """The validated :class:`FrameHeader` of a parsed header object."""
    try:
        kind, fed, rnd = head["kind"], head["federation"], head["round"]
        hdr = FrameHeader(
            kind=kind,
            federation=fed,
            round=rnd,
            codec=head["codec"],
            client_id=head.get("client_id", ""),
            base_hash=head.get("base_hash", ""),
            num_samples=head.get("num_samples", 0),
            meta=head.get("meta", {}),
        )
    except KeyError as exc:
        raise FrameError(f"header lacks field {exc}") from exc
    _check(kind in _KINDS, f"unknown frame kind {kind!r}")
    _check(isinstance(fed, str), "federation must be a string")
    _check(_is_int(rnd) and rnd >= 0, f"bad round {rnd!r}")
    _check(isinstance(hdr.codec, str), "codec must be a string")
    _check(isinstance(hdr.client_id, str), "client_id must be a string")
    _check(isinstance(hdr.base_hash, str), "base_hash must be a string")
    ns = hdr.num_samples
    _check(_is_int(ns) and 0 <= ns < 1 << 40, f"bad num_samples {ns!r}")
    _check(isinstance(hdr.meta, dict), "meta must be an object")
    return hdr


def _split_header(payload: bytes, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The header object and where the body starts."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise FrameError("payload is not bytes")
    if len(payload) > max_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if len(payload) < len(MAGIC) + _HEADER_LEN.size:
        raise FrameError(f"frame too short ({len(payload)} bytes)")
    if bytes(payload[:3]) != MAGIC[:3]:
        raise FrameError("not a fedmq frame (bad magic)")
    if bytes(payload[:4]) not in (MAGIC, MAGIC_COMPACT):
        raise FrameError(f"unsupported frame version {payload[3]}")
    (hlen,) = _HEADER_LEN.unpack_from(payload, 4)
    start = len(MAGIC) + _HEADER_LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(payload):
        raise FrameError(f"header length {hlen} is out of range")
    raw = bytes(payload[start : start + hlen])
    if bytes(payload[:4]) == MAGIC_COMPACT:
        raw = _inflate_header(raw)
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise FrameError(f"header is not valid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(head, dict):
        raise FrameError("header is not a JSON object")
    return head, start + hlen


def _inflate_header(data: bytes) -> bytes:
    """A version-3 header: exactly one complete zstd frame of at most MAX_HEADER_BYTES."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"compressed header is not a zstd frame: {exc}") from exc
    if not 0 < declared <= MAX_HEADER_BYTES:
        raise FrameError(f"compressed header declares {declared} bytes")
    dobj = zstandard.ZstdDecompressor(dict_data=HEADER_DICT).decompressobj()
    try:
        raw = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"compressed header does not decompress: {exc}") from exc
    if not dobj.eof or dobj.unused_data or len(raw) != declared:
        raise FrameError("compressed header is truncated or has trailing data")
    return raw


def _tensor_specs(head: dict[str, Any]) -> tuple[list[_Spec], int]:
    raw = head.get("tensors")
    raw_len = head.get("raw_len")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TENSORS:
        raise FrameError("bad tensor list")
    if not _is_int(raw_len) or not isinstance(raw_len, int) or raw_len < 0:
        raise FrameError("bad raw_len")
    specs: list[_Spec] = []
    seen: set[str] = set()
    total = 0
    for item in raw:
        _check(isinstance(item, dict), "tensor entry is not an object")
        name, shape, params = item.get("name"), item.get("shape"), item.get("params", {})
        _check(
            isinstance(name, str) and bool(_TENSOR_NAME_RE.fullmatch(name)), f"bad name {name!r}"
        )
        _check(name not in seen, f"duplicate tensor {name!r}")
        _check(
            isinstance(shape, list)
            and len(shape) <= 8
            and all(_is_int(d) and d >= 0 for d in shape),
            f"bad shape for {name!r}",
        )
        _check(isinstance(params, dict), f"bad params for {name!r}")
        numel = math.prod(shape)  # Python ints: no silent int64 wrap-around
        _check(numel <= MAX_ELEMENTS, f"tensor {name!r} is too large")
        total += numel
        _check(total <= MAX_ELEMENTS, "too many elements")
        seen.add(name)
        specs.append(_Spec(name, tuple(shape), numel, params))
    return specs, raw_len


def _spec_size(codec: TensorCodec, spec: _Spec) -> int:
    try:
        return codec.encoded_size(spec.numel, spec.params)
    except CodecError as exc:
        raise FrameError(f"tensor {spec.name!r}: {exc}") from exc


def _codec(name: str, err: type[Exception]) -> TensorCodec:
    try:
        return resolve_codec(name)  # dense by name, or a parameterised top-k name
    except CodecError as exc:
        raise err(str(exc)) from None


def _shape_diff(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(n for n in set(got) & set(want) if tuple(got[n]) != tuple(want[n]))
    bits = []
    if missing:
        bits.append(f"missing {missing[:5]}")
    if extra:
        bits.append(f"unexpected {extra[:5]}")
    for n in wrong[:5]:
        bits.append(f"{n}: got {list(got[n])}, want {list(want[n])}")
    return "; ".join(bits) or "order differs"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(cond: bool, reason: str) -> None:
    if not cond:
        raise FrameError(reason)
