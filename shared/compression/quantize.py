"""Per-tensor value codecs: how one flat fp32 array becomes bytes inside a frame.

Each codec is pure: ``encode(flat, rng) -> (params, bytes)``, ``encoded_size(n, params)`` (so the
frame decoder can check lengths before touching data) and ``decode(buf, n, params) -> flat``.
``params`` are small JSON values stored in the frame header.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class CodecError(ValueError):
    """Encoding failed, or bytes/params are inconsistent with the codec."""


class TensorCodec(Protocol):
    """What a value codec provides."""

    name: str

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, Any], bytes]:
        """Encode a 1-D float32 array."""
        ...

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Exact byte length of the encoding of ``numel`` values with ``params``."""
        ...

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Decode to a 1-D float32 array of ``numel`` values."""
        ...


class Fp32Codec:
    """Lossless baseline: raw little-endian float32."""

    name = "fp32"

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, Any], bytes]:
        """Raw bytes."""
        return {}, flat.astype("<f4").tobytes()

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Four bytes per value."""
        return 4 * numel

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Copy out of the body buffer."""
        return np.frombuffer(buf, dtype="<f4", count=numel).astype(np.float32)


class Fp16Codec:
    """Half precision: 2 bytes per value, relative error ≤ 2⁻¹¹."""

    name = "fp16"

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, Any], bytes]:
        """Cast to float16; refuse values that would overflow to inf."""
        if flat.size and float(np.abs(flat).max()) > 65504.0:
            raise CodecError("value exceeds the fp16 range (65504)")
        return {}, flat.astype("<f2").tobytes()

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Two bytes per value."""
        return 2 * numel

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Widen back to float32."""
        return np.frombuffer(buf, dtype="<f2", count=numel).astype(np.float32)


class Int8Codec:
    """Blockwise symmetric int8 with stochastic rounding (unbiased: E[decode] == x).

    Each block of ``block`` values has its own fp32 scale ``max|x| / 127``, so one outlier
    only coarsens its own block. Error bound per value: ``|x - x̂| < scale`` of its block.
    """

    name = "int8"

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, Any], bytes]:
        """Scales (fp32, one per block) followed by the int8 values."""
        n, b = flat.size, self.block
        nblocks = -(-n // b)
        padded = np.zeros(nblocks * b, dtype=np.float32)
        padded[:n] = flat
        blocks = padded.reshape(nblocks, b)
        scale = np.abs(blocks).max(axis=1) / 127.0
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        scaled = blocks / safe[:, None]
        q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
        q = np.clip(q, -127, 127).astype(np.int8).ravel()[:n]
        return {"block": b}, scale.astype("<f4").tobytes() + q.tobytes()

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """4 bytes per block scale + 1 byte per value."""
        b = _block(params)
        return 4 * (-(-numel // b)) + numel

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Multiply each block by its scale."""
        b = _block(params)
        nblocks = -(-numel // b)
        scale = np.frombuffer(buf, dtype="<f4", count=nblocks)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CodecError("int8 block scales must be finite and non-negative")
        q = np.frombuffer(buf, dtype=np.int8, count=numel, offset=4 * nblocks)
        out = np.zeros(nblocks * b, dtype=np.float32)
        out[:numel] = q
        return (out.reshape(nblocks, b) * scale[:, None].astype(np.float32)).ravel()[:numel]


def _block(params: dict[str, Any]) -> int:
    b = params.get("block")
    if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 1 << 20:
        raise CodecError(f"bad int8 block size {b!r}")
    return b


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes, two per byte (high nibble first), a zero nibble of padding."""
    u = (q.astype(np.int16) & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] << 4) | u[1::2]


def unpack_nibbles(raw: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` signed 4-bit codes of ``raw``; CodecError on a non-zero padding nibble."""
    u = raw.view(np.uint8)
    nib = np.empty(u.size * 2, dtype=np.uint8)
    nib[0::2], nib[1::2] = u >> 4, u & 0xF
    if k % 2 and nib[k]:
        raise CodecError("int4 padding nibble is not zero")
    s = nib[:k].astype(np.int8)
    return np.where(s > 7, s - 16, s).astype(np.int8)


CODECS: dict[str, TensorCodec] = {c.name: c for c in (Fp32Codec(), Fp16Codec(), Int8Codec())}
