"""Self-describing frames for ONNX models (the inference path of devices without torch).

Frame layout (little endian)::

    b"FMX" + version byte | u32 header length | header (UTF-8 JSON) | ONNX model bytes

The header names the federation, the run and round that produced the model, the hash of the
fp32 global model it was exported from (:func:`shared.protocol.frames.tensors_hash`), the
SHA-256 of the ONNX bytes, the input shape (one float32 sample: ``(C, H, W)``, ``(C, L)`` or
``(F,)``), the task (``classification``: ``num_classes`` logits; ``regression``:
``num_outputs`` values), the architecture and the opset. Decoding checks every field and the
SHA-256, so a device never hands a truncated or altered model to onnxruntime. Only the
standard library is imported: an inference-only device pays nothing for it.

Version 2 (written since runs exist): the header's ``signature`` covers every header field
(:func:`shared.protocol.claims.onnx_claim`) and the header has a ``run``. Version 1 (older
aggregators) is still decoded, with run 0; its signature covered only the ONNX hash, so a
server pinning the aggregator's key refuses it (:func:`shared.protocol.claims.verify_onnx_frame`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any

MAGIC = b"FMX\x02"
MAGIC_V1 = b"FMX\x01"
_VERSIONS = {MAGIC: 2, MAGIC_V1: 1}
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_ONNX_BYTES = 256 * 1024 * 1024
_HASH_RE = re.compile(r"[0-9a-f]{64}")


class OnnxFrameError(ValueError):
    """An ONNX frame is malformed or its content does not match its header."""


@dataclass(frozen=True)
class OnnxHeader:
    """What an ONNX frame says about the model it carries."""

    federation: str
    round: int
    model_hash: str
    onnx_sha256: str
    input_shape: tuple[int, ...]
    num_classes: int
    arch: str = ""
    opset: int = 0
    # Version 2: Ed25519 over every other field (shared/protocol/claims.py) by the
    # aggregator's key; version 1: over (federation, round, onnx_sha256) only. "" = unsigned.
    signature: str = ""
    run: int = 0  # the aggregator's run epoch (0: a version-1 frame)
    # What the outputs are (absent from older frames: a classifier).
    task: str = "classification"
    num_outputs: int = 1


@dataclass(frozen=True)
class OnnxFrame:
    """A verified ONNX frame: its header, the ONNX model bytes and the frame version."""

    header: OnnxHeader
    onnx: bytes
    version: int = 2


def is_onnx_frame(data: bytes) -> bool:
    """True when ``data`` starts like a fedmq ONNX frame (any version)."""
    return data[:3] == MAGIC[:3]


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_onnx_frame(header: OnnxHeader, onnx: bytes) -> bytes:
    """Frame ``onnx`` with ``header``; the header's ``onnx_sha256`` must match the bytes."""
    if header.onnx_sha256 != sha256(onnx):
        raise OnnxFrameError("header onnx_sha256 does not match the ONNX bytes")
    _validate(asdict(header))
    head = asdict(header)
    head["input_shape"] = list(header.input_shape)
    if header.task == "classification" and header.num_outputs == 1:
        del head["task"], head["num_outputs"]  # a classifier's header, as before them
    head["nbytes"] = len(onnx)
    raw = json.dumps(head, separators=(",", ":")).encode()
    return MAGIC + _HEADER_LEN.pack(len(raw)) + raw + onnx


def decode_onnx_frame(
    payload: bytes, *, max_bytes: int = DEFAULT_MAX_ONNX_BYTES, federation: str | None = None
) -> OnnxFrame:
    """Decode and verify a frame (lengths, fields, SHA-256); raise OnnxFrameError otherwise."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise OnnxFrameError("payload is not bytes")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise OnnxFrameError(f"frame of {len(payload)} bytes exceeds the limit of {max_bytes}")
    start = len(MAGIC) + _HEADER_LEN.size
    if len(payload) < start:
        raise OnnxFrameError(f"frame too short ({len(payload)} bytes)")
    if payload[:3] != MAGIC[:3]:
        raise OnnxFrameError("not a fedmq ONNX frame (bad magic)")
    version = _VERSIONS.get(payload[:4])
    if version is None:
        raise OnnxFrameError(f"unsupported ONNX frame version {payload[3]}")
    (hlen,) = _HEADER_LEN.unpack_from(payload, 4)
    if hlen > MAX_HEADER_BYTES or start + hlen > len(payload):
        raise OnnxFrameError(f"header length {hlen} is out of range")
    try:
        head = json.loads(payload[start : start + hlen])
    except (ValueError, RecursionError) as exc:
        raise OnnxFrameError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(head, dict):
        raise OnnxFrameError("header is not a JSON object")
    if version == 1:
        head.pop("run", None)  # version 1 has no run: never trust one that claims it
    header = _validate(head)
    onnx = payload[start + hlen :]
    if head.get("nbytes") != len(onnx):
        raise OnnxFrameError(f"body is {len(onnx)} bytes, header says {head.get('nbytes')}")
    if sha256(onnx) != header.onnx_sha256:
        raise OnnxFrameError("ONNX bytes do not match onnx_sha256 (corrupt or altered)")
    if federation is not None and header.federation != federation:
        raise OnnxFrameError(f"model of federation {header.federation!r}, not {federation!r}")
    return OnnxFrame(header, onnx, version)


def _validate(head: dict[str, Any]) -> OnnxHeader:
    try:
        shape = head["input_shape"]
        header = OnnxHeader(
            federation=head["federation"],
            round=head["round"],
            model_hash=head["model_hash"],
            onnx_sha256=head["onnx_sha256"],
            input_shape=tuple(shape) if isinstance(shape, list | tuple) else shape,
            num_classes=head["num_classes"],
            arch=head.get("arch", ""),
            opset=head.get("opset", 0),
            signature=head.get("signature", ""),
            run=head.get("run", 0),
            task=head.get("task", "classification"),
            num_outputs=head.get("num_outputs", 1),
        )
    except KeyError as exc:
        raise OnnxFrameError(f"header lacks field {exc}") from exc
    checks = [
        (isinstance(header.federation, str) and bool(header.federation), "bad federation"),
        (_is_int(header.round) and header.round >= 0, f"bad round {header.round!r}"),
        (isinstance(header.model_hash, str), "bad model_hash"),
        (
            isinstance(header.onnx_sha256, str) and bool(_HASH_RE.fullmatch(header.onnx_sha256)),
            "bad onnx_sha256",
        ),
        (
            isinstance(header.input_shape, tuple)
            and 1 <= len(header.input_shape) <= 3
            and all(_is_int(d) and d > 0 for d in header.input_shape),
            f"bad input_shape {header.input_shape!r}",
        ),
        (_is_int(header.num_classes) and header.num_classes > 0, "bad num_classes"),
        (isinstance(header.arch, str), "bad arch"),
        (_is_int(header.opset) and header.opset >= 0, "bad opset"),
        (isinstance(header.signature, str) and len(header.signature) <= 200, "bad signature"),
        (_is_int(header.run) and 0 <= header.run < 2**53, f"bad run {header.run!r}"),
        (header.task in ("classification", "regression"), f"bad task {header.task!r}"),
        (_is_int(header.num_outputs) and header.num_outputs > 0, "bad num_outputs"),
    ]
    for ok, reason in checks:
        if not ok:
            raise OnnxFrameError(reason)
    return header


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
