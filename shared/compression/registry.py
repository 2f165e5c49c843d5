"""The one place that turns a codec *name* into a codec, and says which codecs are biased.

Names (the operator's ``--codec``, carried in ``RoundStart.codec`` and in every frame header):

    fp32 | fp16 | int8                       dense codecs (:mod:`shared.compression.quantize`)
    topk:<density>[+fp32|+fp16|+int8|+int4|+sign], topk8/topk4/topk1:<density>, optionally
        with /min<M> and @warmup<R>[x<F>]    top-k (:mod:`shared.compression.topk`)
    lowrank:<rank>[+int8|+int4]              low-rank factors (:mod:`shared.compression.lowrank`)
"""

from __future__ import annotations

from shared.compression import lowrank, topk
from shared.compression.lowrank import LowRankCodec
from shared.compression.quantize import CODECS, CodecError, TensorCodec
from shared.compression.topk import TopKCodec

KNOWN = (
    "fp32, fp16, int8, topk:<density>[+fp32|+fp16|+int8|+int4|+sign], topk8:<density>, "
    "topk4:<density>, topk1:<density>, each top-k name optionally with /min<M> and "
    "@warmup<R>[x<F>], lowrank:<rank>[+int8|+int4]"
)


def resolve_codec(name: object) -> TensorCodec:
    """The codec called ``name``, or CodecError naming the known ones."""
    if isinstance(name, str):
        if name in CODECS:
            return CODECS[name]
        if name.startswith("topk"):
            return topk.parse(name)
        if name.startswith("lowrank"):
            return lowrank.parse(name)
    raise CodecError(f"unknown codec {name!r}; known: {KNOWN}")


# Codecs that drop part of the update: top-k (values) and low-rank (directions). Both are
# biased, so the device keeps what was not sent and adds it to its next update (error
# feedback), and both write compact (version 3) frames.
BIASED_CODECS = (TopKCodec, LowRankCodec)


def needs_error_feedback(name: str) -> bool:
    """True for the biased codecs (:data:`BIASED_CODECS`); False for dense or unknown names."""
    try:
        return isinstance(resolve_codec(name), BIASED_CODECS)
    except CodecError:
        return False
