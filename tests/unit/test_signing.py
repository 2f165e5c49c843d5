"""Global-model signatures (shared/protocol/signing.py, edge_agent/model_guard.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.model_guard import HeldModel, ModelRejected, check_global_model
from shared.protocol import signing
from shared.protocol.claims import sign_model_v2
from shared.protocol.frames import FrameError, FrameHeader, decode_frame, encode_frame, tensors_hash

FED = "lab"
HASH = "a" * 64


def test_signature_verifies_for_exactly_what_was_signed() -> None:
    key = signing.generate_keypair()
    sig = signing.sign_model(key, FED, 3, HASH)

    signing.verify_model(key.public_key(), FED, 3, HASH, sig)


@pytest.mark.parametrize(
    ("fed", "round_id", "model_hash"),
    [("other", 3, HASH), (FED, 2, HASH), (FED, 4, HASH), (FED, 3, "b" * 64)],
    ids=["wrong-federation", "older-round", "newer-round", "tampered-hash"],
)
def test_signature_does_not_transfer(fed: str, round_id: int, model_hash: str) -> None:
    key = signing.generate_keypair()
    sig = signing.sign_model(key, FED, 3, HASH)

    with pytest.raises(signing.SignatureError, match="bad signature"):
        signing.verify_model(key.public_key(), fed, round_id, model_hash, sig)


@pytest.mark.parametrize("sig", ["", None, "not base64!", "AAAA"])
def test_missing_or_malformed_signature_is_refused(sig: object) -> None:
    key = signing.generate_keypair()

    with pytest.raises(signing.SignatureError):
        signing.verify_model(key.public_key(), FED, 1, HASH, sig)


def test_signature_by_another_key_is_refused() -> None:
    sig = signing.sign_model(signing.generate_keypair(), FED, 1, HASH)

    with pytest.raises(signing.SignatureError):
        signing.verify_model(signing.generate_keypair().public_key(), FED, 1, HASH, sig)


def test_keys_round_trip_through_pem_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = signing.generate_keypair()
    (tmp_path / "k").write_bytes(signing.private_pem(key))
    (tmp_path / "k.pub").write_bytes(signing.public_pem(key))
    sig = signing.sign_model(signing.load_private_key(tmp_path / "k"), FED, 1, HASH)

    signing.verify_model(signing.load_public_key(tmp_path / "k.pub"), FED, 1, HASH, sig)


def test_loading_a_non_key_names_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "junk.pem").write_text("hello")

    with pytest.raises(ValueError, match=r"junk\.pem"):
        signing.load_public_key(tmp_path / "junk.pem")


# --- the agent's decision ----------------------------------------------------------------
def _model(round_id: int, key: object | None, *, value: float = 1.0, run: int = 0, **meta: object):  # type: ignore[no-untyped-def]
    """A model frame as the aggregator signs it: both signatures, the run in the meta."""
    tensors = {"w": np.full((2, 2), value, np.float32)}
    h = tensors_hash(tensors)
    sig = signing.sign_model(key, FED, round_id, h) if key is not None else ""  # type: ignore[arg-type]
    sig2 = sign_model_v2(key, FED, run, round_id, h) if key is not None else ""  # type: ignore[arg-type]
    header = FrameHeader(
        kind="model",
        federation=FED,
        round=round_id,
        codec="fp32",
        meta={"model_hash": h, "signature": sig, "run": run, "signature_v2": sig2, **meta},
    )
    frame = decode_frame(encode_frame(header, tensors).payload)
    return frame.header, tensors_hash(frame.tensors)


def test_signed_model_is_accepted_by_pinned_agent() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key)

    check_global_model(head, actual, FED, HeldModel(1, "c" * 64), key.public_key())


def test_unsigned_model_is_refused_by_pinned_agent() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, None)

    with pytest.raises(ModelRejected, match="not signed"):
        check_global_model(head, actual, FED, None, key.public_key())


def test_unsigned_model_is_accepted_in_dev_mode() -> None:
    head, actual = _model(2, None)

    check_global_model(head, actual, FED, None, None)


def test_tampered_weights_are_refused() -> None:
    key = signing.generate_keypair()
    head, _ = _model(2, key)
    _, other = _model(2, None, value=5.0)

    with pytest.raises(ModelRejected, match="hash mismatch"):
        check_global_model(head, other, FED, None, key.public_key())


def test_rehashed_tampered_model_fails_the_signature() -> None:
    key = signing.generate_keypair()
    good_head, _ = _model(2, key)
    bad_head, bad_hash = _model(2, None, value=5.0)
    good_sig = good_head.meta["signature_v2"]
    forged = FrameHeader(
        **{**bad_head.__dict__, "meta": {**bad_head.meta, "signature_v2": good_sig}}
    )

    with pytest.raises(ModelRejected, match="bad signature"):
        check_global_model(forged, bad_hash, FED, None, key.public_key())


def test_older_round_is_refused_even_when_signed() -> None:
    key = signing.generate_keypair()
    head, actual = _model(1, key)

    with pytest.raises(ModelRejected, match="older model"):
        check_global_model(head, actual, FED, HeldModel(2, "c" * 64), key.public_key())


def test_second_model_for_the_held_round_is_refused() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key)

    with pytest.raises(ModelRejected, match="second, different model"):
        check_global_model(head, actual, FED, HeldModel(2, "c" * 64), key.public_key())


def test_republished_same_model_is_accepted() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key)

    check_global_model(head, actual, FED, HeldModel(2, actual), key.public_key())


def test_model_of_another_federation_is_refused() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key)

    with pytest.raises(ModelRejected, match="not a global model"):
        check_global_model(head, actual, "elsewhere", None, key.public_key())


# --- runs ----------------------------------------------------------------------------------
def test_model_with_only_the_pre_run_signature_is_refused_by_pinned_agent() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key, signature_v2="")  # an aggregator older than runs

    with pytest.raises(ModelRejected, match="not signed"):
        check_global_model(head, actual, FED, None, key.public_key())


def test_a_model_relabelled_to_another_run_fails_the_signature() -> None:
    key = signing.generate_keypair()
    head, actual = _model(2, key, run=5)
    relabelled = FrameHeader(**{**head.__dict__, "meta": {**head.meta, "run": 9}})

    with pytest.raises(ModelRejected, match="bad signature"):
        check_global_model(relabelled, actual, FED, None, key.public_key())


def test_round_0_of_a_newer_run_supersedes_a_later_round_of_an_older_run() -> None:
    key = signing.generate_keypair()
    head, actual = _model(0, key, run=6)

    check_global_model(head, actual, FED, HeldModel(9, "c" * 64, run=5), key.public_key())


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "dev-mode"])
def test_a_signed_model_of_an_older_run_is_refused_whatever_its_round(pinned: bool) -> None:
    key = signing.generate_keypair()
    head, actual = _model(9, key, run=5)
    pub = key.public_key() if pinned else None

    with pytest.raises(ModelRejected, match=r"older run refused \(run 5 < 6"):
        check_global_model(head, actual, FED, HeldModel(0, "c" * 64, run=6), pub)


@pytest.mark.parametrize("run", [-1, "7", 2.5, True, 2**53])
def test_a_malformed_run_is_refused(run: object) -> None:
    head, actual = _model(1, None, run=run)  # type: ignore[arg-type]

    with pytest.raises(FrameError, match="bad run"):
        check_global_model(head, actual, FED, None, None)
