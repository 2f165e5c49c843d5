"""Ed25519 signatures: who may publish what changes a device's behaviour.

Two layers. :func:`sign_bytes` / :func:`verify_bytes` sign and verify canonical bytes built
by :func:`canonical_json` (a signing domain + a JSON body, sorted keys, no whitespace): the
claims of :mod:`shared.protocol.claims` (global models bound to a run, round announcements,
ONNX headers) are built on them. :func:`sign_model` / :func:`verify_model` are the first
model signature, over ``(federation, round, model_hash)`` only: the aggregator still writes
it (field ``signature``) so that agents older than runs keep loading its models; agents that
know runs require the run-bound ``signature_v2`` instead. The model hash is the SHA-256 of
the tensors (:func:`shared.protocol.frames.tensors_hash`), so a signature covers every weight
without hashing the frame encoding. Keys are plain PEM files (PKCS#8 private, SPKI public).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: Domain separation: a signature over a model can never be mistaken for anything else.
CONTEXT = "fedmq-global-model-v1"


class SignatureError(ValueError):
    """A model signature is missing, malformed, or does not verify."""


def canonical_bytes(
    federation: str, round_id: int, model_hash: str, context: str = CONTEXT
) -> bytes:
    """The exact bytes that are signed: a JSON array with fixed order, no whitespace."""
    return json.dumps(
        [context, federation, int(round_id), model_hash], separators=(",", ":")
    ).encode()


def canonical_json(context: str, body: object) -> bytes:
    """The bytes a claim signs: ``[context, body]`` as JSON, keys sorted, no whitespace.

    Built on both sides from decoded values (ints as ints, floats as floats: Python's float
    repr round-trips), so the signer and the verifier produce the same bytes; NaN and
    infinities are refused (ValueError), they never reach a signature.
    """
    return json.dumps(
        [context, body], sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def sign_bytes(key: Ed25519PrivateKey, message: bytes) -> str:
    """The base64 Ed25519 signature of ``message``."""
    return base64.b64encode(key.sign(message)).decode()


def verify_bytes(key: Ed25519PublicKey, message: bytes, signature: object, what: str) -> None:
    """Raise SignatureError unless ``signature`` signs exactly ``message``; ``what`` names it."""
    if not isinstance(signature, str) or not signature:
        raise SignatureError(f"{what} is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature is not base64: {exc}") from exc
    if len(raw) != 64:
        raise SignatureError(f"signature has {len(raw)} bytes, Ed25519 has 64")
    try:
        key.verify(raw, message)
    except InvalidSignature:
        raise SignatureError(
            f"bad signature for {what} (tampered, or signed by another key)"
        ) from None


def sign_model(
    key: Ed25519PrivateKey, federation: str, round_id: int, model_hash: str, context: str = CONTEXT
) -> str:
    """Return the base64 Ed25519 signature of one global model, without its run (v1)."""
    return sign_bytes(key, canonical_bytes(federation, round_id, model_hash, context))


def verify_model(
    key: Ed25519PublicKey,
    federation: str,
    round_id: int,
    model_hash: str,
    signature: object,
    context: str = CONTEXT,
) -> None:
    """Raise SignatureError unless ``signature`` signs exactly this federation/round/hash (v1)."""
    what = f"federation {federation!r} round {round_id} model {model_hash[:12]}"
    message = canonical_bytes(federation, round_id, model_hash, context)
    try:
        verify_bytes(key, message, signature, what)
    except SignatureError as exc:
        if not isinstance(signature, str) or not signature:
            raise SignatureError("model is not signed") from exc
        raise


def generate_keypair() -> Ed25519PrivateKey:
    """A fresh Ed25519 model-signing key."""
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM (unencrypted: the file's 0600 mode protects it) of a private key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of the public half."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM); ValueError with the path when it is not one."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: model-signing key must be Ed25519, got {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM); ValueError with the path when it is not one."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: model public key must be Ed25519, got {type(key).__name__}")
    return key
