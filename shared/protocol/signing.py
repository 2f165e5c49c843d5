"""Ed25519 signatures over global models: who may publish the model agents train on.

The aggregator signs the canonical bytes of ``(federation, round, model_hash)``; the model
hash is the SHA-256 of the tensors (:func:`shared.protocol.frames.tensors_hash`), so the signature
covers every weight without hashing the frame encoding. Binding the federation and the
round stops a valid signature from being replayed into another federation or to roll an
agent back to an older model. Keys are plain PEM files (PKCS#8 private, SPKI public).
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
#: The same for ONNX exports, whose "hash" is the SHA-256 of the ONNX bytes.
ONNX_CONTEXT = "fedmq-onnx-model-v1"


class SignatureError(ValueError):
    """A model signature is missing, malformed, or does not verify."""


def canonical_bytes(
    federation: str, round_id: int, model_hash: str, context: str = CONTEXT
) -> bytes:
    """The exact bytes that are signed: a JSON array with fixed order, no whitespace."""
    return json.dumps(
        [context, federation, int(round_id), model_hash], separators=(",", ":")
    ).encode()


def sign_model(
    key: Ed25519PrivateKey, federation: str, round_id: int, model_hash: str, context: str = CONTEXT
) -> str:
    """Return the base64 Ed25519 signature of one global model (or, by context, its ONNX)."""
    message = canonical_bytes(federation, round_id, model_hash, context)
    return base64.b64encode(key.sign(message)).decode()


def verify_model(
    key: Ed25519PublicKey,
    federation: str,
    round_id: int,
    model_hash: str,
    signature: object,
    context: str = CONTEXT,
) -> None:
    """Raise SignatureError unless ``signature`` signs exactly this federation/round/hash."""
    if not isinstance(signature, str) or not signature:
        raise SignatureError("model is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature is not base64: {exc}") from exc
    if len(raw) != 64:
        raise SignatureError(f"signature has {len(raw)} bytes, Ed25519 has 64")
    try:
        key.verify(raw, canonical_bytes(federation, round_id, model_hash, context))
    except InvalidSignature:
        raise SignatureError(
            f"bad signature for federation {federation!r} round {round_id} "
            f"model {model_hash[:12]} (tampered, or signed by another key)"
        ) from None


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
