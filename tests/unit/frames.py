"""Frame helpers shared by the codec tests: a standard update header, sample tensors, and
taking a frame apart / putting it back together (to tamper with its header or body)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import zstandard

from shared.protocol.frames import MAGIC, MAGIC_COMPACT, FrameHeader
from shared.protocol.header_dict import HEADER_DICT


def update_header(codec: str) -> FrameHeader:
    """An update frame header of client pi-1, round 1, federation "lab"."""
    return FrameHeader(
        kind="update", federation="lab", round=1, codec=codec, client_id="pi-1", num_samples=9
    )


def sample_tensors(seed: int = 0, conv: tuple[int, ...] = (6, 1, 5, 5)) -> dict[str, np.ndarray]:
    """A small model-shaped delta, with a scalar and an empty tensor as edge cases."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, size=conv).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, size=(conv[0],)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.1, size=(40, 30)).astype(np.float32),
        "scalar": np.array(0.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def split_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, decompressed body) of a version-1 or version-3 frame."""
    (hlen,) = struct.unpack_from("<I", frame, 4)
    body = zstandard.ZstdDecompressor().decompress(frame[8 + hlen :])
    hb = frame[8 : 8 + hlen]
    if frame[:4] == MAGIC_COMPACT:
        hb = zstandard.ZstdDecompressor(dict_data=HEADER_DICT).decompress(hb)
    return json.loads(hb), body


def assemble_frame(head: dict[str, Any], body: bytes, compact: bool = False) -> bytes:
    """A frame from a (possibly tampered) header and body, as version 3 or version 1."""
    hb = json.dumps(head).encode()
    if compact:
        hb = zstandard.ZstdCompressor(dict_data=HEADER_DICT, write_checksum=True).compress(hb)
    z = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    return (MAGIC_COMPACT if compact else MAGIC) + struct.pack("<I", len(hb)) + hb + z
