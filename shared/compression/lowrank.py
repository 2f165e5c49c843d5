"""Low-rank update codec: each weight matrix as a rank-r product of two quantised factors.

Name: ``lowrank:<r>[+int8|+int4]`` (values default to int8), e.g. ``lowrank:3+int4``.

A client's weight delta after a round of local SGD is close to low rank (the gradients of a
layer are sums of outer products of activations and back-propagated errors), so a rank-r
factorisation keeps far more of it per byte than keeping individual coordinates: on LeNet-5
/ Fashion-MNIST a rank-3 update holds ≈ 97 % of a round-1 delta's energy in the bytes in which
top-3 % holds ≈ 64 %. This is the uplink scheme of Konečný et al. (2016, "structured updates")
and the compressor of PowerSGD (Vogels et al., 2019); like top-k it is biased, so the agent
pairs it with error feedback (:mod:`shared.compression.error_feedback`).

Per tensor, with ``m = shape[0]`` rows and ``n = numel / m`` columns (a conv kernel is a
matrix of output channels × everything else):

- ``k = min(r, m, n)``; when ``k·(m + n) < m·n`` the tensor is factorised: truncated SVD
  ``X ≈ U_k Σ_k V_kᵀ``, ``P = U_k √Σ_k`` (m × k), ``Q = V_k √Σ_k`` (n × k), each column of P
  and Q quantised symmetrically to int8 (±127) or int4 (±7) with its own fp16 scale (rounded
  up, so no code clips) and nearest rounding. The encoder also tries Q refitted by least
  squares to the quantised P (``Q* = Xᵀ P̂ (P̂ᵀ P̂)⁺``) and keeps whichever is closer to X.
  Bytes: ``scales_P (k × f16) | scales_Q (k × f16) | codes_P (m·k) | codes_Q (n·k)``, codes
  row-major, int4 packed two per byte (high nibble first, −8 never used, zero padding).
  ``params = {"rank": k, "rows": m, "bits": 8|4}``.
- otherwise (vectors, biases, tiny matrices — or factors whose scales would overflow fp16)
  the tensor is sent dense with the int8 codec
  (blockwise, stochastic rounding): ``params = {"rank": 0, "block": 256}``.

Error bound (factorised tensors): with σ the singular values of X and L = 127 or 7,
``‖X − X̂‖_F ≤ √(Σ_{i>k} σ_i²) + √σ₁ (e_P + e_Q) + e_P e_Q``, where
``e_P = (1 + 2⁻¹⁰) √(m Σ_{i≤k} σ_i) / (2L)`` and likewise ``e_Q`` with n (the truncation
error plus the quantisation of factors whose entries are at most √σ_j in magnitude; 2⁻¹⁰ is
the fp16 rounding-up of the scales — below fp16's normal range, 6.1·10⁻⁵, add 3·10⁻⁸ per
entry). Large
matrices (both sides > 128) use a randomised SVD (Halko et al. 2011: 8 extra columns, two
power iterations), whose truncation error is within a small factor of the optimum; the
quantisation term is unchanged.

The decoder validates everything before use: ``1 ≤ k ≤ min(m, n)``, ``k·(m+n) < m·n`` (only
compressing factorisations are legal, which also bounds the decode work by the tensor size),
``m`` divides ``numel``, exact byte length, finite non-negative scales, codes within ±L, zero
padding — and raises :class:`CodecError` (→ FrameError → rejection receipt).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from shared.compression.quantize import (
    CodecError,
    EncodedTensor,
    Int8Codec,
    pack_nibbles,
    unpack_nibbles,
)

NAME_RE = re.compile(r"lowrank:(?P<rank>[1-9][0-9]{0,3})(?:\+(?P<values>int8|int4))?")
_LEVELS = {8: 127, 4: 7}
_EXACT_SVD_MAX = 128  # min(m, n) up to this: exact SVD; above: randomised
_DENSE = Int8Codec()
_FP16_MAX = 65504.0


class LowRankCodec:
    """Rank-``rank`` factorisation of every matrix-shaped tensor, factors in ``bits`` bits."""

    def __init__(self, name: str, rank: int, bits: int = 8) -> None:
        if not 1 <= rank <= 9999 or bits not in _LEVELS:
            raise CodecError(f"bad low-rank codec (rank {rank}, {bits} bits)")
        self.name = name
        self.rank = rank
        self.bits = bits

    # --- encode ------------------------------------------------------------------------
    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """A tensor without a known shape: one row, so it is sent dense."""
        return self.encode_tensor(flat.reshape(1, -1), rng)

    def encode_tensor(self, arr: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """Factorise ``arr`` (rows = first axis) when that is smaller, else send it dense.

        ``sent`` is flat, like every codec's.
        """
        numel = int(arr.size)
        m = int(arr.shape[0]) if arr.ndim >= 2 else 1
        n = numel // m if m else 0
        k = min(self.rank, m, n)
        if arr.ndim < 2 or k < 1 or k * (m + n) >= m * n:
            return _dense(arr, rng)
        x = arr.reshape(m, n).astype(np.float64)
        try:
            return self._factorise(x, k, rng)
        except CodecError:  # factors beyond fp16 scales: values that large go dense
            return _dense(arr, rng)

    def _factorise(self, x: np.ndarray, k: int, rng: np.random.Generator) -> EncodedTensor:
        m, n = x.shape
        p, q = _factors(x, k, rng)
        level = _LEVELS[self.bits]
        p_codes, p_scale = _quantise(p, level)
        p_hat = p_codes * p_scale
        q_codes, q_scale = _quantise(q, level)
        best = np.linalg.norm(x - p_hat @ (q_codes * q_scale).T)
        refit = x.T @ p_hat @ np.linalg.pinv(p_hat.T @ p_hat)
        r_codes, r_scale = _quantise(refit, level)
        if np.linalg.norm(x - p_hat @ (r_codes * r_scale).T) < best:
            q_codes, q_scale = r_codes, r_scale
        codes = np.concatenate([p_codes.ravel(), q_codes.ravel()]).astype(np.int8)
        packed = pack_nibbles(codes) if self.bits == 4 else codes
        scales = np.concatenate([p_scale, q_scale]).astype("<f2")
        return EncodedTensor(
            {"rank": k, "rows": m, "bits": self.bits},
            scales.tobytes() + packed.tobytes(),
            _product(codes, scales, m, n, k),
        )

    # --- sizes and decode --------------------------------------------------------------
    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Exact byte length, from validated params."""
        k, m, n, bits = _params(numel, params)
        if k == 0:
            return _DENSE.encoded_size(numel, _dense_params(params))
        ncodes = k * (m + n)
        return 4 * k + (ncodes if bits == 8 else -(-ncodes // 2))

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """``P̂ Q̂ᵀ`` flattened (or the dense int8 values)."""
        k, m, n, bits = _params(numel, params)
        if k == 0:
            return _DENSE.decode(buf, numel, _dense_params(params))
        if len(buf) != self.encoded_size(numel, params):
            raise CodecError(f"low-rank tensor is {len(buf)} bytes, params imply another size")
        scales = np.frombuffer(buf, dtype="<f2", count=2 * k)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CodecError("low-rank factor scales must be finite and non-negative")
        ncodes = k * (m + n)
        raw = np.frombuffer(buf, dtype=np.int8, offset=4 * k)
        codes = unpack_nibbles(raw, ncodes) if bits == 4 else raw[:ncodes]
        level = _LEVELS[bits]
        if ncodes and int(np.abs(codes.astype(np.int16)).max()) > level:
            raise CodecError(f"low-rank factor code out of range ±{level}")
        out = _product(codes, scales, m, n, k)
        if not np.isfinite(out).all():
            raise CodecError("low-rank tensor overflows on decode")
        return out


def _dense(arr: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
    """``arr`` with the dense int8 codec, marked rank 0."""
    enc = _DENSE.encode(arr.ravel().astype(np.float32), rng)
    return EncodedTensor({"rank": 0, **enc.params}, enc.data, enc.sent)


def _product(codes: np.ndarray, scales: np.ndarray, m: int, n: int, k: int) -> np.ndarray:
    """``P̂ Q̂ᵀ`` flattened to float32, from the int8 codes (P then Q) and the 2k fp16 scales.

    Encoder and decoder both call this on arrays of the same dtypes and layout, so the
    encoder's ``sent`` is bit-identical to the decoded tensor.
    """
    s = scales.astype(np.float64)
    p = codes[: m * k].reshape(m, k) * s[:k]
    q = codes[m * k :].reshape(n, k) * s[k:]
    with np.errstate(over="ignore", invalid="ignore"):
        return (p @ q.T).astype(np.float32).ravel()


def _factors(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """P (m × k), Q (n × k) with P Qᵀ the (near-)best rank-k approximation, balanced √σ."""
    m, n = x.shape
    if min(m, n) <= _EXACT_SVD_MAX:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
    else:  # randomised range finder with two power iterations (Halko et al. 2011)
        y = x @ rng.standard_normal((n, min(n, k + 8)))
        for _ in range(2):
            y, _r = np.linalg.qr(y)
            y = x @ (x.T @ y)
        basis, _r = np.linalg.qr(y)
        ub, s, vt = np.linalg.svd(basis.T @ x, full_matrices=False)
        u = basis @ ub
    root = np.sqrt(s[:k])
    return u[:, :k] * root, vt[:k].T * root


def _quantise(a: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column symmetric codes (nearest rounding) and fp16 scales ``≥ max|col| / level``.

    The scale is rounded *up* to the next fp16 value, so no code needs clipping; a column
    whose scale would overflow fp16 raises CodecError (the caller sends the tensor dense).
    """
    exact = np.abs(a).max(axis=0) / level
    if exact.size and float(exact.max()) > _FP16_MAX:
        raise CodecError("factor scale exceeds the fp16 range")
    half = exact.astype(np.float16)
    low = half.astype(np.float64) < exact
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    scale = half.astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(a / safe), -level, level)
    return codes, scale


def _int(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = params.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CodecError(f"bad low-rank param {key}={v!r} (want an int in [{lo}, {hi}])")
    return v


def _params(numel: int, params: dict[str, Any]) -> tuple[int, int, int, int]:
    """(k, m, n, bits), validated; k == 0 means a dense tensor."""
    if _int(params, "rank", 0, 9999) == 0:
        return 0, 0, 0, 8
    k = params["rank"]
    m = _int(params, "rows", 1, max(1, numel))
    if numel % m:
        raise CodecError(f"low-rank rows {m} do not divide {numel} values")
    n = numel // m
    bits = _int(params, "bits", 4, 8)
    if bits not in _LEVELS:
        raise CodecError(f"low-rank factors are int8 or int4, not {bits} bits")
    if k > min(m, n) or k * (m + n) >= m * n:
        raise CodecError(f"rank {k} does not compress a {m}×{n} tensor")
    return k, m, n, bits


def _dense_params(params: dict[str, Any]) -> dict[str, Any]:
    return {key: v for key, v in params.items() if key != "rank"}


@functools.lru_cache(maxsize=64)
def parse(name: str) -> LowRankCodec:
    """``lowrank:<r>[+int8|+int4]`` → codec; CodecError for anything else."""
    m = NAME_RE.fullmatch(name)
    if m is None:
        raise CodecError(f"bad low-rank codec name {name!r}; want lowrank:<rank>[+int8|+int4]")
    return LowRankCodec(name, int(m["rank"]), 4 if m["values"] == "int4" else 8)
