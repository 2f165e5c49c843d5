"""The bytes every codec family writes, pinned: refactoring an encoder must not change them.

The expected digests were computed with the encoders as they were before they learned to
return what they sent (commit af4a3d9). Two digests per case:

- ``content``: the header JSON and the uncompressed body, i.e. what the codecs wrote;
- ``frame``: the whole frame, so the zstd output too. Only the ``frame`` digests may change
  with another zstd library (zstandard 0.25.0, libzstd 1.5.7 here): if a zstd upgrade breaks
  them while the ``content`` digests still hold, re-pin the ``frame`` digests alone.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from shared.protocol.frames import FrameHeader, encode_frame
from tests.unit.frames import split_frame


def _tensors() -> dict[str, np.ndarray]:
    """A model-shaped delta plus the edge cases: zeros, subnormals, one element, empty,
    a matrix large enough for the randomised SVD and one whose factors overflow fp16."""
    rng = np.random.default_rng(20240601)
    tiny = np.float32(1e-42)  # subnormal
    return {
        "conv.weight": rng.normal(0, 0.05, (6, 1, 5, 5)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.05, (6,)).astype(np.float32),
        "fc.weight": rng.laplace(0, 0.01, (40, 300)).astype(np.float32),
        "big.weight": rng.normal(0, 0.01, (150, 140)).astype(np.float32),
        "huge.weight": rng.normal(0, 1e13, (20, 30)).astype(np.float32),
        "zeros": np.zeros((4, 8), np.float32),
        "subnormal": np.array([tiny, -tiny, 0.0, 2 * tiny] * 5, np.float32).reshape(4, 5),
        "one": np.array([0.25], np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def _dense_safe(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Without the tensor beyond the fp16 range (fp16 codecs refuse it)."""
    return {n: v for n, v in tensors.items() if n != "huge.weight"}


CODECS = [
    "fp32",
    "fp16",
    "int8",
    "topk:0.1",
    "topk:0.05+fp16",
    "topk8:0.1",
    "topk4:0.2",
    "topk1:0.1",
    "topk:0.02+int8/min8",
    "topk4:0.01@warmup3",
    "lowrank:2",
    "lowrank:4+int4",
]

# codec -> (sha256 of header JSON + body, sha256 of the frame)
EXPECTED: dict[str, tuple[str, str]] = {
    "fp32": (
        "35de91f806c391785198979587f4c6a3c9a9bfe1d8d541e6500f7e19f3a43fb2",
        "de4285eb2ebe5516804c4fe8812dad9be6e974e2f8120cfb9409cecc917f7ed2",
    ),
    "fp16": (
        "c02bdb9584483fb06c27fbfed6881bab10f75de60b1bf01990ff4ed9fe2b5a54",
        "c8f4dae44d9a9fdf24d44c18fb6b50db418fbf4107a443a54cf82ebb7720c46f",
    ),
    "int8": (
        "ff56d792341a855f67a67c57e32cb3169688285c7c083417c16490e0775eeb0b",
        "a8956c229fbc766656dcf559913a78eb5d73b609af9f07ff3096944f73613b72",
    ),
    "topk:0.1": (
        "7c7ecd805671b75a539454d34386a38c67d595df3c3de8a5988c3b85adcadc84",
        "e5cdcd565932a71ca25bc49c4378d769e5f9643babb4f2dc9fc61890eb633877",
    ),
    "topk:0.05+fp16": (
        "411994b45fa757d8f940cdd223933bb97bda99d9eca4e5cb0bc0e6793f21b4a9",
        "4efc9ea4e50480c7931ff6007f1a521602cd19136449c8811eebb0edf5093358",
    ),
    "topk8:0.1": (
        "9cb079a85d1b7610cf5d6dbb53921d7286732b778b26cebeb8758464048785b5",
        "cbe720ada812e6b54369fac41c80a9a5e9d9bcf5f894596065ce55520f45e993",
    ),
    "topk4:0.2": (
        "734a1280171350900217a7bf884d98aa19cd5bdd35f5606c15e712ee29250a98",
        "ac41c0070acc85751e1dccc2d148dcf45c41b52267e73914557f064ccb67d588",
    ),
    "topk1:0.1": (
        "1025db82beb7226508c2c8224e13200bbf5b56c980f34efbe2fe0237fe497b7a",
        "7bae3f93681438bf341af891db6dc45337859e26932c97f8a056c605bf1ef0f8",
    ),
    "topk:0.02+int8/min8": (
        "db8aa626af6fc96a81d50d30cd305a7ef1a123ef17043ead683c2f197e5c3d6d",
        "e70ad8fc8158aa7da8d7561cc3c27c7d1c79add268a6acba5438fd4920585547",
    ),
    "topk4:0.01@warmup3": (
        "87f6c49883ed370797a6697530ef1e3cc045180d484a882d10d4ad91180847b6",
        "3ac2839f58a97f241ffb05f1a91e5eb9a2fffb35ea899a3c290864fd1dd3f995",
    ),
    "lowrank:2": (
        "160a11357e243a55be8b46874a1472759f29a0f6367e44b84f39faea2d69aa01",
        "3ebc5832e649e69716545337eb99d4ee5e4dba5392b666b744bdb9602c609ae2",
    ),
    "lowrank:4+int4": (
        "7640c3aabfc22a8ed5a786fae963ea2faa217407cf9892e469b276b1b395f7ea",
        "36d78fa2ab2d3768d4dd044789f534a17aa861dc523eb805c38e82a2992babe8",
    ),
}


def _frame(codec: str) -> bytes:
    tensors = _tensors()
    if "fp16" in codec:
        tensors = _dense_safe(tensors)
    header = FrameHeader(
        kind="update", federation="lab", round=1, codec=codec, client_id="pi-1", num_samples=9
    )
    return encode_frame(header, tensors, rng=np.random.default_rng(7)).payload


def _content_digest(frame: bytes) -> str:
    head, body = split_frame(frame)
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode() + body).hexdigest()


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_write_the_same_header_and_body_as_before(codec: str) -> None:
    assert _content_digest(_frame(codec)) == EXPECTED[codec][0]


@pytest.mark.parametrize("codec", CODECS)
def test_frames_are_byte_for_byte_the_same_as_before(codec: str) -> None:
    assert hashlib.sha256(_frame(codec)).hexdigest() == EXPECTED[codec][1]
