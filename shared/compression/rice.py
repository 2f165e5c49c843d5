"""Golomb-Rice coding of sorted sparse indices, vectorised with numpy.

Sorted indices become gaps ``g_i = idx_i - idx_{i-1} - 1`` (``idx_{-1} = -1``), each gap is
split into a quotient ``g >> b`` and a ``b``-bit remainder. Quotients are written in unary
(``q`` one-bits then a zero) in one bit stream, remainders at fixed width in another: two
streams, so both directions stay vectorised (no per-index Python loop). For gaps that are
roughly geometric (top-k of a dense delta), Rice codes are within a few percent of the
entropy: ≈ 8.5 bits per index at density 1 %, against 16 for a fixed u16 and ≈ 10 for varints.

Both streams are padded with zero bits to whole bytes; the decoder insists on that, so every
index set has exactly one encoding.
"""

from __future__ import annotations

import math

import numpy as np

from shared.compression.quantize import CodecError

MAX_RICE_BITS = 30


def choose_rice_bits(numel: int, k: int) -> int:
    """The Rice parameter for ``k`` indices spread over ``numel`` positions (mean gap based)."""
    if k == 0 or numel <= k:
        return 0
    mean_gap = (numel - k) / k
    return max(0, min(MAX_RICE_BITS, math.floor(math.log2(mean_gap * math.log(2) + 1))))


def unary_bits_bound(numel: int, k: int, rice: int) -> int:
    """Largest possible unary stream length (bits) for ``k`` indices below ``numel``."""
    return k + max(0, numel - k) // (1 << rice)


def encode_indices(idx: np.ndarray, rice: int) -> tuple[int, bytes, bytes]:
    """Strictly increasing int64 ``idx`` → (unary bit count, unary stream, remainder stream)."""
    k = idx.size
    if k == 0:
        return 0, b"", b""
    gaps = np.diff(idx, prepend=-1) - 1
    if (gaps < 0).any():
        raise CodecError("indices must be strictly increasing")
    q = gaps >> rice
    ubits = int(q.sum()) + k
    unary = np.ones(ubits, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    rem = b""
    if rice:
        r = (gaps & ((1 << rice) - 1)).astype(np.int64)
        shifts = np.arange(rice - 1, -1, -1, dtype=np.int64)
        rem = np.packbits(((r[:, None] >> shifts) & 1).astype(np.uint8).ravel()).tobytes()
    return ubits, np.packbits(unary).tobytes(), rem


def stream_sizes(k: int, ubits: int, rice: int) -> tuple[int, int]:
    """Byte lengths of the unary and remainder streams."""
    return -(-ubits // 8), -(-(k * rice) // 8)


def decode_indices(
    unary: memoryview, rem: memoryview, k: int, ubits: int, rice: int, numel: int
) -> np.ndarray:
    """Inverse of :func:`encode_indices`; validates canonical padding, count and range."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    if bits[ubits:].any():
        raise CodecError("unary index stream has non-zero padding")
    zeros = np.flatnonzero(bits[:ubits] == 0)
    if zeros.size != k or zeros[-1] != ubits - 1:
        raise CodecError(f"unary index stream holds {zeros.size} codes, params say k={k}")
    q = np.diff(zeros, prepend=-1) - 1
    gaps = q << rice
    if rice:
        rbits = np.unpackbits(np.frombuffer(rem, dtype=np.uint8))
        if rbits[k * rice :].any():
            raise CodecError("remainder stream has non-zero padding")
        weights = np.int64(1) << np.arange(rice - 1, -1, -1, dtype=np.int64)
        gaps = gaps + rbits[: k * rice].reshape(k, rice).astype(np.int64) @ weights
    idx = np.cumsum(gaps + 1) - 1
    if idx[-1] >= numel:
        raise CodecError(f"index {int(idx[-1])} out of range for {numel} values")
    if idx.size > 1 and not (np.diff(idx) > 0).all():
        raise CodecError("indices are not strictly increasing")
    return idx
