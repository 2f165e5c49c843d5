"""Top-k sparsification codecs (their names are resolved in :mod:`shared.compression.registry`).

Names (the operator's ``--codec``, carried in ``RoundStart.codec`` and in every frame header):

    fp32 | fp16 | int8                     dense codecs of :mod:`shared.compression.quantize`
    topk:<density>[+fp32|+fp16|+int8|+int4]  keep the ceil(density·n) largest-magnitude values
    topk8:<density>, topk4:<density>        short for topk:<density>+int8 / +int4
    topk1:<density>                         short for topk:<density>+sign (ternary, as STC)
    <top-k name>/min<M>                     keep at least min(n, M) values of every tensor
    <any top-k name>@warmup<R>[x<F>]        density schedule (DGC-style warm-up, see below)
    lowrank:<rank>[+int8|+int4]             rank-r factors (:mod:`shared.compression.lowrank`)

e.g. ``topk:0.01+int8``, ``topk8:0.01`` or ``topk1:0.02@warmup3``.

``+sign`` keeps only the sign of each kept value plus one fp32 scale per block of kept values
(the block's mean magnitude): 1 bit per value (sparse ternary compression, Sattler et al.
2019). With error feedback the magnitude error is sent later, like the dropped values.

``/min<M>`` is the layer-aware part: small tensors (biases, the last layer) cost little and
move a lot, so each tensor keeps at least ``min(numel, M)`` values whatever the density.

``@warmup<R>[x<F>]`` (F defaults to 2): in round r ≤ R the density is
``min(1, density · F^(R + 1 − r))``, from round R + 1 on it is ``density`` — dense-ish
early rounds, exponentially decreasing (Lin et al., *Deep Gradient Compression*, 2018). The
encoder takes the round from the frame header (:meth:`TopKCodec.at_round`); the decoder does
not need the density at all. The density only matters when encoding; everything
the decoder needs (k, the Rice parameter, the index stream length, the value block size) is in
the tensor's ``params``, and all of it is validated before any data is touched.

Per-tensor layout: ``values | unary index stream | remainder stream``
(see :mod:`shared.compression.rice`).
Quantised values use blockwise symmetric scales and *nearest* rounding: the top-k codec is
biased anyway (it drops mass), which the agent's error feedback
(:mod:`shared.compression.error_feedback`) returns in later rounds; nearest rounding halves
the error.

Error bounds (per kept value): fp32 exact; fp16 relative 2⁻¹¹; int8 ≤ scale/2 with
scale = max|block|/127; int4 ≤ scale/2 with scale = max|block|/7; sign: decodes to
sign(x)·mean|block|, so the error is ≤ max|block| (and the block's decoded mass, Σ|x̂|,
equals its kept mass Σ|x|). Dropped values decode to 0 and are no larger in magnitude than
the smallest kept one.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import numpy as np

from shared.compression import rice
from shared.compression.quantize import (
    CodecError,
    EncodedTensor,
    dequantise_blocks,
    pack_nibbles,
    unpack_nibbles,
    widen,
)

DEFAULT_BLOCK = 256
_NAME_RE = re.compile(
    r"topk(?P<alias>8|4|1)?:(?P<density>(?:0|[1-9][0-9]*)?\.?[0-9]+(?:[eE]-?[0-9]+)?)"
    r"(?:\+(?P<values>fp32|fp16|int8|int4|sign))?"
    r"(?:/min(?P<floor>[1-9][0-9]{0,6}))?"
    r"(?:@warmup(?P<warmup>[1-9][0-9]{0,3})(?:x(?P<factor>[0-9]+(?:\.[0-9]+)?))?)?"
)
_LEVELS = {"int8": 127, "int4": 7}
_ALIASES = {"8": "int8", "4": "int4", "1": "sign"}


class TopKCodec:
    """Top-k by magnitude, Rice-coded indices, values in ``values`` precision."""

    def __init__(
        self,
        name: str,
        density: float,
        values: str,
        block: int = DEFAULT_BLOCK,
        warmup: int = 0,
        factor: float = 2.0,
        floor: int = 0,
    ):
        if not 0 < density <= 1:
            raise CodecError(f"top-k density must be in (0, 1], got {density}")
        if not 0 <= warmup <= 9999 or not 1 < factor <= 1000:
            raise CodecError(f"bad warm-up schedule ({warmup} rounds, factor {factor})")
        self.name = name
        self.density = density
        self.values = values
        self.block = block
        self.warmup = warmup
        self.factor = factor
        self.floor = floor

    def density_at(self, round_id: int) -> float:
        """The scheduled density of round ``round_id`` (rounds count from 1)."""
        if not self.warmup or round_id > self.warmup:
            return self.density
        steps = self.warmup + 1 - max(1, round_id)
        return min(1.0, self.density * self.factor**steps)

    def at_round(self, round_id: int) -> TopKCodec:
        """This codec with the density of round ``round_id`` (what the encoder uses)."""
        d = self.density_at(round_id)
        if d == self.density:
            return self
        return TopKCodec(self.name, d, self.values, self.block, floor=self.floor)

    def k_for(self, numel: int) -> int:
        """How many values a tensor of ``numel`` keeps (at least one / ``floor``, unless empty)."""
        return min(numel, max(1, self.floor, math.ceil(self.density * numel))) if numel else 0

    # --- encode ------------------------------------------------------------------------
    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        """Select, sort and encode the k largest-magnitude values."""
        n = flat.size
        k = self.k_for(n)
        idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]) if k else np.zeros(0, int)
        idx = idx.astype(np.int64)
        b = rice.choose_rice_bits(n, k)
        ubits, unary, rem = rice.encode_indices(idx, b)
        vparams, vbytes, values = self._encode_values(flat[idx].astype(np.float32))
        params: dict[str, Any] = {"k": k, "rice": b, "ubits": ubits, **vparams}
        return EncodedTensor(params, vbytes + unary + rem, _scatter(idx, values, n))

    def _encode_values(self, v: np.ndarray) -> tuple[dict[str, Any], bytes, np.ndarray]:
        """(params, bytes, the values they decode to) of the kept values ``v``."""
        if self.values == "fp32":
            raw = v.astype("<f4")
            return {}, raw.tobytes(), widen(raw)
        if self.values == "fp16":
            if v.size and float(np.abs(v).max()) > 65504.0:
                raise CodecError("value exceeds the fp16 range (65504)")
            half = v.astype("<f2")
            return {}, half.tobytes(), widen(half)
        b = self.block
        nblocks = -(-v.size // b)
        padded = np.zeros(nblocks * b, dtype=np.float32)
        padded[: v.size] = v
        blocks = padded.reshape(nblocks, b)
        if self.values == "sign":
            counts = np.minimum(b, v.size - b * np.arange(nblocks)).astype(np.float64)
            mean = (np.abs(blocks).astype(np.float64).sum(axis=1) / counts).astype("<f4")
            negative = v < 0
            signs = np.packbits(negative.astype(np.uint8))
            return {"block": b}, mean.tobytes() + signs.tobytes(), _signed(negative, mean, b)
        levels = _LEVELS[self.values]
        scale = (np.abs(blocks).max(axis=1) / levels).astype("<f4")
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels).astype(np.int8)
        q = q.ravel()[: v.size]
        codes = pack_nibbles(q) if self.values == "int4" else q
        values = dequantise_blocks(q, scale, b)
        return {"block": b}, scale.tobytes() + codes.tobytes(), values

    # --- sizes and decode --------------------------------------------------------------
    def _value_size(self, k: int, params: dict[str, Any]) -> int:
        if self.values == "fp32":
            return 4 * k
        if self.values == "fp16":
            return 2 * k
        nblocks = -(-k // _block(params))
        per_value = {"int8": k, "int4": -(-k // 2), "sign": -(-k // 8)}[self.values]
        return 4 * nblocks + per_value

    def encoded_size(self, numel: int, params: dict[str, Any]) -> int:
        """Exact byte length, from validated params (k ≤ numel, stream lengths in bounds)."""
        k, b, ubits = _sparse_params(numel, params)
        usize, rsize = rice.stream_sizes(k, ubits, b)
        return self._value_size(k, params) + usize + rsize

    def decode(self, buf: memoryview, numel: int, params: dict[str, Any]) -> np.ndarray:
        """Scatter the decoded values into a zero array of ``numel``."""
        k, b, ubits = _sparse_params(numel, params)
        vsize = self._value_size(k, params)
        usize, rsize = rice.stream_sizes(k, ubits, b)
        if len(buf) != vsize + usize + rsize:
            raise CodecError(
                f"top-k tensor is {len(buf)} bytes, params imply {vsize + usize + rsize}"
            )
        values = self._decode_values(buf[:vsize], k, params)
        idx = rice.decode_indices(
            buf[vsize : vsize + usize], buf[vsize + usize :], k, ubits, b, numel
        )
        return _scatter(idx, values, numel)

    def _decode_values(self, buf: memoryview, k: int, params: dict[str, Any]) -> np.ndarray:
        if self.values in ("fp32", "fp16"):
            v = widen(np.frombuffer(buf, dtype="<f4" if self.values == "fp32" else "<f2", count=k))
            if not np.isfinite(v).all():
                raise CodecError("top-k values must be finite")
            return v
        b = _block(params)
        nblocks = -(-k // b)
        scale = np.frombuffer(buf, dtype="<f4", count=nblocks)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CodecError("top-k block scales must be finite and non-negative")
        if self.values == "sign":
            return _decode_signs(buf[4 * nblocks :], k, scale, b)
        raw = np.frombuffer(buf, dtype=np.int8, offset=4 * nblocks)
        q = unpack_nibbles(raw, k) if self.values == "int4" else raw[:k]
        levels = _LEVELS[self.values]
        if q.size and int(np.abs(q.astype(np.int16)).max()) > levels:
            raise CodecError(f"quantised top-k value out of range ±{levels}")
        v = dequantise_blocks(q, scale, b)
        if not np.isfinite(v).all():
            raise CodecError("top-k values overflow on decode")
        return v


def _scatter(idx: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """The dense tensor: ``values`` at ``idx``, zeros elsewhere."""
    out = np.zeros(numel, dtype=np.float32)
    out[idx] = values
    return out


def _signed(negative: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """Each kept value as ±(its block's mean magnitude): what a sign stream decodes to."""
    mags = np.repeat(scale.astype(np.float32), block)[: negative.size]
    return np.where(negative, -mags, mags).astype(np.float32)


def _decode_signs(buf: memoryview, k: int, scale: np.ndarray, block: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
    if bits[k:].any():
        raise CodecError("sign stream has non-zero padding")
    return _signed(bits[:k] == 1, scale, block)


def _int_param(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = params.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CodecError(f"bad top-k param {key}={v!r} (want an int in [{lo}, {hi}])")
    return v


def _sparse_params(numel: int, params: dict[str, Any]) -> tuple[int, int, int]:
    k = _int_param(params, "k", 0, numel)
    b = _int_param(params, "rice", 0, rice.MAX_RICE_BITS)
    lo = k
    ubits = _int_param(params, "ubits", lo, rice.unary_bits_bound(numel, k, b))
    return k, b, ubits


def _block(params: dict[str, Any]) -> int:
    return _int_param(params, "block", 1, 1 << 20)


@functools.lru_cache(maxsize=64)
def parse(name: str) -> TopKCodec:
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise CodecError(
            f"unknown codec {name!r}; a top-k name is "
            "topk[8|4|1]:<density>[+values][/min<M>][@warmup<R>[x<F>]]"
        )
    alias, values = m["alias"], m["values"]
    if alias and values:
        raise CodecError(f"codec {name!r}: topk{alias} already fixes the value precision")
    values = _ALIASES.get(alias or "", values or "fp32")
    density = float(m["density"])
    if not 0 < density <= 1:
        raise CodecError(f"codec {name!r}: density must be in (0, 1]")
    factor = float(m["factor"]) if m["factor"] else 2.0
    if not 1 < factor <= 1000:
        raise CodecError(f"codec {name!r}: warm-up factor must be in (1, 1000]")
    return TopKCodec(
        name,
        density,
        values,
        warmup=int(m["warmup"] or 0),
        factor=factor,
        floor=int(m["floor"] or 0),
    )
