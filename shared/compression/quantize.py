"""Per-tensor value codecs: how one flat fp32 array becomes bytes inside a frame.

Each codec is pure: ``encode(flat, rng) -> EncodedTensor`` (params, bytes, and the values the
decoder will produce), ``encoded_size(n, params)`` (so the frame decoder can check lengths
before touching data) and ``decode(buf, n, params) -> flat``. ``params`` are small JSON values
stored in the frame header.

An encoder computes what it sent from its own codes and scales, with the same helper the
decoder uses (:func:`widen`, :func:`dequantise_blocks`), so ``sent`` is bit-identical to
``decode(data, n, params)`` and nobody needs to decode their own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class CodecError(ValueError):
    """Encoding failed, or bytes/params are inconsistent with the codec."""


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's encoding: what the header and the body carry, and what it decodes to."""

    params: dict[str, Any]
    data: bytes
    sent: np.ndarray  # 1-D float32, bit-identical to decode(data, numel, params)


class TensorCodec(Protocol):
    """What a value codec provides."""

    name: str

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """Encode a 1-D float32 array."""
        ...

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Exact byte length of the encoding of ``numel`` values with ``params``."""
        ...

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Decode to a 1-D float32 array of ``numel`` values."""
        ...


def widen(raw: np.ndarray) -> np.ndarray:
    """fp32 or fp16 codes as the float32 values every decoder returns (a copy)."""
    return raw.astype(np.float32)


def dequantise_blocks(codes: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """Integer ``codes`` times the fp32 scale of their block of ``block`` values, as float32.

    Overflow gives inf (no warning): the caller refuses non-finite results.
    """
    n, nblocks = codes.size, scale.size
    padded = np.zeros(nblocks * block, dtype=np.float32)
    padded[:n] = codes
    with np.errstate(over="ignore"):
        out = padded.reshape(nblocks, block) * np.asarray(scale, np.float32)[:, None]
    return out.ravel()[:n]


class Fp32Codec:
    """Lossless baseline: raw little-endian float32."""

    name = "fp32"

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """Raw bytes."""
        raw = flat.astype("<f4")
        return EncodedTensor({}, raw.tobytes(), widen(raw))

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Four bytes per value."""
        return 4 * numel

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Copy out of the body buffer."""
        return widen(np.frombuffer(buf, dtype="<f4", count=numel))


class Fp16Codec:
    """Half precision: 2 bytes per value, relative error ≤ 2⁻¹¹."""

    name = "fp16"

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """Cast to float16; refuse values that would overflow to inf."""
        if flat.size and float(np.abs(flat).max()) > 65504.0:
            raise CodecError("value exceeds the fp16 range (65504)")
        half = flat.astype("<f2")
        return EncodedTensor({}, half.tobytes(), widen(half))

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Two bytes per value."""
        return 2 * numel

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Widen back to float32."""
        return widen(np.frombuffer(buf, dtype="<f2", count=numel))


class Int8Codec:
    """Blockwise symmetric int8 with stochastic rounding (unbiased: E[decode] == x).

    Each block of ``block`` values has its own fp32 scale ``max|x| / 127``, so one outlier
    only coarsens its own block. Error bound per value: ``|x - x̂| < scale`` of its block.
    """

    name = "int8"

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
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
        scale = scale.astype("<f4")
        return EncodedTensor(
            {"block": b}, scale.tobytes() + q.tobytes(), dequantise_blocks(q, scale, b)
        )

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
        return dequantise_blocks(q, scale, b)


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
