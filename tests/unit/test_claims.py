"""Signed control data (shared/protocol/claims.py) and the protocol's training bounds."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from shared.protocol import messages as msg
from shared.protocol.claims import (
    model_claim,
    round_start_claim,
    round_start_claim_v2,
    sign_model_v2,
    sign_round_start,
    sign_status,
    verify_model_v2,
    verify_round_start,
    verify_status,
)
from shared.protocol.signing import (
    SignatureError,
    canonical_json,
    generate_keypair,
    sign_bytes,
    verify_bytes,
)

KEY = generate_keypair()
HASH = "a" * 64


def _ann(**changes: Any) -> msg.RoundStart:
    base = msg.RoundStart(
        federation="lab",
        round=3,
        base_hash=HASH,
        deadline=1_800_000_060.25,
        selected=["pi-0", "pi-1"],
        model=msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4),
        train=msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=7),
        codec="int8",
        max_update_bytes=1 << 20,
        download_codec="int8",
        run=1_790_000_000_000,
    )
    return msgspec.structs.replace(base, **changes)


def _wire(ann: msg.RoundStart) -> msg.RoundStart:
    """What an agent decodes: the announcement after a trip through JSON."""
    return msg.decode(ann.to_json(), msg.RoundStart)


# --- round announcements -------------------------------------------------------------------
def test_a_signed_announcement_verifies_after_the_trip_through_json() -> None:
    verify_round_start(KEY.public_key(), _wire(sign_round_start(KEY, _ann())))


def test_an_integer_learning_rate_signs_as_the_float_the_agent_decodes() -> None:
    signed = sign_round_start(KEY, _ann(train=msg.TrainParams(lr=1, momentum=0)))  # type: ignore[arg-type]

    verify_round_start(KEY.public_key(), _wire(signed))


def test_the_send_time_is_outside_the_signature() -> None:
    signed = sign_round_start(KEY, _ann())

    verify_round_start(KEY.public_key(), msgspec.structs.replace(signed, ts=0.0))


@pytest.mark.parametrize(
    "change",
    [
        {"federation": "other"},
        {"run": 1_790_000_000_001},
        {"round": 4},
        {"base_hash": "b" * 64},
        {"deadline": 1_800_000_061.25},
        {"selected": ["pi-0", "pi-1", "pi-9"]},
        {"model": msg.ModelSpec(arch="mlp", input_shape=(1, 8, 9), num_classes=4)},
        {"model": msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=5)},
        {"model": msg.ModelSpec(arch="cnn", input_shape=(1, 8, 8), num_classes=4)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=5.0, momentum=0.9, seed=7)},
        {"train": msg.TrainParams(local_epochs=9, batch_size=16, lr=0.05, momentum=0.9, seed=7)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=99, lr=0.05, momentum=0.9, seed=7)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.5, seed=7)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, weight_decay=0.1,
                                  momentum=0.9, seed=7)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=8)},
        {"codec": "fp32"},
        {"max_update_bytes": 1 << 30},
        {"download_codec": "none"},
        {"fingerprint": "c" * 64},
        {"model": msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4,
                                task="regression")},
        {"model": msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4,
                                num_outputs=3)},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=7,
                                  regression_loss="mae")},
        {"train": msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=7,
                                  proximal_mu=0.01)},
    ],
    ids=["federation", "run", "round", "base-hash", "deadline", "selected", "input-shape",
         "classes", "arch", "lr", "epochs", "batch-size", "momentum", "weight-decay", "seed",
         "codec", "max-update-bytes", "download-codec", "fingerprint", "task", "outputs",
         "regression-loss", "proximal-mu"],
)  # fmt: skip
def test_changing_any_signed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    signed = sign_round_start(KEY, _ann())
    forged = _wire(msgspec.structs.replace(signed, **change))

    with pytest.raises(SignatureError, match="bad signature"):
        verify_round_start(KEY.public_key(), forged)


def test_every_field_of_the_announcement_is_in_the_v2_claim_but_the_send_time() -> None:
    train = msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, seed=7, proximal_mu=0.1)
    ann = _ann(fingerprint="c" * 64, train=train, mode="async", max_staleness=3)
    context, body = json.loads(round_start_claim_v2(ann))

    assert context == "fedmq-round-start-v2"
    assert set(body) == {f.name for f in msgspec.structs.fields(msg.RoundStart)} - {
        "ts", "signature", "signature_v2"
    }  # fmt: skip
    assert set(body["model"]) == {f.name for f in msgspec.structs.fields(msg.ModelSpec)}
    assert set(body["train"]) == {f.name for f in msgspec.structs.fields(msg.TrainParams)}


def test_a_zero_proximal_mu_is_signed_as_agents_older_than_fedprox_sign_it() -> None:
    _, body = json.loads(round_start_claim_v2(_ann()))

    assert "proximal_mu" not in body["train"]


def test_a_fedprox_announcement_verifies_and_has_no_v1_signature() -> None:
    train = msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, seed=7, proximal_mu=0.1)
    signed = sign_round_start(KEY, _ann(train=train))

    assert signed.signature == ""  # agents older than model plugins cannot follow it
    verify_round_start(KEY.public_key(), _wire(signed))


def test_an_agent_older_than_fedprox_refuses_a_fedprox_announcement_and_follows_others() -> None:
    plain = sign_round_start(KEY, _ann())
    train = msg.TrainParams(local_epochs=2, batch_size=16, lr=0.05, seed=7, proximal_mu=0.1)
    prox = sign_round_start(KEY, _ann(train=train))

    def older_claim(ann: msg.RoundStart) -> bytes:  # its TrainParams had no proximal_mu
        body = json.loads(ann.to_json())
        for key in ("ts", "signature", "signature_v2"):
            del body[key]
        del body["train"]["proximal_mu"]
        del body["mode"], body["max_staleness"]  # nor the asynchronous mode
        return canonical_json("fedmq-round-start-v2", body)

    verify_bytes(KEY.public_key(), older_claim(plain), plain.signature_v2, "")
    with pytest.raises(SignatureError):
        verify_bytes(KEY.public_key(), older_claim(prox), prox.signature_v2, "")


def test_a_sync_announcement_is_signed_as_aggregators_older_than_the_async_mode_sign_it() -> None:
    _, body = json.loads(round_start_claim_v2(_ann()))

    assert "mode" not in body and "max_staleness" not in body


def test_an_async_announcement_verifies_and_agents_older_than_it_cannot_verify_it() -> None:
    signed = sign_round_start(KEY, _ann(mode="async", max_staleness=2))

    assert signed.signature == ""  # no v1 signature: older agents cannot follow it
    verify_round_start(KEY.public_key(), _wire(signed))
    older = json.loads(signed.to_json())
    for key in ("ts", "signature", "signature_v2", "mode", "max_staleness"):
        del older[key]
    del older["train"]["proximal_mu"]
    with pytest.raises(SignatureError):
        verify_bytes(KEY.public_key(), canonical_json("fedmq-round-start-v2", older),
                     signed.signature_v2, "")  # fmt: skip


# --- agents older than model plugins: their structs and claim, as they were -----------------
class _OldModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    arch: str
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10


class _OldTrainParams(msgspec.Struct, frozen=True, kw_only=True):
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


class _OldRoundStart(msgspec.Struct, frozen=True, kw_only=True):
    schema: int = 1
    ts: float = 0.0
    federation: str
    round: int
    base_hash: str
    deadline: float
    selected: list[str]
    model: _OldModelSpec
    train: _OldTrainParams
    codec: str = "int8"
    max_update_bytes: int = 64 * 1024 * 1024
    download_codec: str = "none"
    run: int = 0
    signature: str = ""


def _old_agent_verifies(payload: bytes) -> None:
    """What an agent older than model plugins does with an announcement (its claim code)."""
    old = msgspec.json.decode(payload, type=_OldRoundStart)
    body = msgspec.to_builtins(msgspec.structs.replace(old, signature=""))
    del body["ts"], body["signature"]
    verify_bytes(KEY.public_key(), canonical_json("fedmq-round-start-v1", body), old.signature, "")


def test_an_older_agent_verifies_a_classification_announcement_with_a_fingerprint() -> None:
    signed = sign_round_start(KEY, _ann(fingerprint="c" * 64))

    _old_agent_verifies(signed.to_json())


@pytest.mark.parametrize(
    "model",
    [
        msg.ModelSpec(arch="mlp", input_shape=(3, 128), num_classes=4),
        msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), task="regression", num_outputs=2),
    ],
    ids=["sensor-windows", "regression"],
)
def test_an_announcement_older_agents_cannot_train_has_no_v1_signature(
    model: msg.ModelSpec,
) -> None:
    signed = sign_round_start(KEY, _ann(model=model, fingerprint="c" * 64))

    assert signed.signature == ""
    verify_round_start(KEY.public_key(), _wire(signed))


def test_an_older_aggregators_announcement_verifies_with_its_v1_signature() -> None:
    ann = _ann()
    old_signed = msgspec.structs.replace(ann, signature=sign_bytes(KEY, round_start_claim(ann)))

    verify_round_start(KEY.public_key(), _wire(old_signed))


@pytest.mark.parametrize(
    "stripped",
    [
        {"fingerprint": "d" * 64},  # a fingerprint the v1 signature does not cover
        {"model": msg.ModelSpec(arch="mlp", input_shape=(1, 8, 8), task="regression")},
    ],
    ids=["unsigned-fingerprint", "unsigned-task"],
)
def test_without_signature_v2_nothing_outside_the_v1_claim_is_followed(
    stripped: dict[str, Any],
) -> None:
    signed = sign_round_start(KEY, _ann(fingerprint="c" * 64))
    forged = _wire(msgspec.structs.replace(signed, signature_v2="", **stripped))

    with pytest.raises(SignatureError, match="no signature_v2"):
        verify_round_start(KEY.public_key(), forged)


@pytest.mark.parametrize("signature", ["", "not base64!", "AAAA"])
def test_an_unsigned_or_malformed_announcement_signature_is_refused(signature: str) -> None:
    with pytest.raises(SignatureError):
        verify_round_start(KEY.public_key(), _ann(signature=signature))


def test_an_announcement_signed_by_another_key_is_refused() -> None:
    signed = sign_round_start(generate_keypair(), _ann())

    with pytest.raises(SignatureError, match="bad signature"):
        verify_round_start(KEY.public_key(), signed)


def test_a_model_signature_never_verifies_an_announcement_or_the_reverse() -> None:
    ann = _ann()
    model_sig = sign_model_v2(KEY, "lab", ann.run, ann.round, HASH)
    ann_sig = sign_bytes(KEY, round_start_claim(ann))

    with pytest.raises(SignatureError):
        verify_round_start(KEY.public_key(), _ann(signature=model_sig))
    with pytest.raises(SignatureError):
        verify_bytes(KEY.public_key(), model_claim("lab", ann.run, 3, HASH), ann_sig, "model")


# --- models bound to a run -----------------------------------------------------------------
def test_a_run_bound_model_signature_does_not_transfer_to_another_run() -> None:
    sig = sign_model_v2(KEY, "lab", 5, 2, HASH)

    verify_model_v2(KEY.public_key(), "lab", 5, 2, HASH, sig)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_model_v2(KEY.public_key(), "lab", 6, 2, HASH, sig)


# --- bounds (decode) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("lr", 1e30, "$.train.lr"),
        ("lr", 0.0, "$.train.lr"),
        ("momentum", 1.0, "$.train.momentum"),
        ("weight_decay", 2.0, "$.train.weight_decay"),
        ("local_epochs", 1001, "$.train.local_epochs"),
        ("batch_size", 65537, "$.train.batch_size"),
        ("seed", -1, "$.train.seed"),
    ],
)
def test_a_training_parameter_out_of_bounds_fails_to_decode_naming_it(
    field: str, value: float, where: str
) -> None:
    raw = msg.to_builtins(_ann())
    raw["train"][field] = value

    with pytest.raises(msg.MessageError, match=f"at `\\{where}`"):
        msg.decode(msgspec.json.encode(raw), msg.RoundStart)


@pytest.mark.parametrize(
    ("path", "value"),
    [(("model", "input_shape"), [1, 8, 5000]), (("model", "num_classes"), 10**6), (("run",), -1),
     (("run",), 2**53), (("signature",), "A" * 200)],
    ids=["input-dim", "classes", "negative-run", "run-beyond-json-integers", "long-signature"],
)  # fmt: skip
def test_a_model_spec_run_or_signature_out_of_bounds_fails_to_decode(
    path: tuple[str, ...], value: object
) -> None:
    raw = msg.to_builtins(_ann())
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value

    with pytest.raises(msg.MessageError, match="invalid RoundStart"):
        msg.decode(msgspec.json.encode(raw), msg.RoundStart)


def test_an_announcement_of_an_aggregator_older_than_runs_decodes_as_run_0_unsigned() -> None:
    raw = msg.to_builtins(_ann())
    del raw["run"], raw["signature"]

    ann = msg.decode(msgspec.json.encode(raw), msg.RoundStart)

    assert (ann.run, ann.signature) == (0, "")


# --- the aggregator's status ---------------------------------------------------------------
def test_a_signed_running_status_does_not_verify_as_finished_nor_for_another_run() -> None:
    status = msg.AggregatorStatus(federation="lab", state="running", round=2, run=5)
    signed = _status_wire(sign_status(KEY, status))
    verify_status(KEY.public_key(), signed)

    for change in ({"state": "finished"}, {"run": 6}):
        with pytest.raises(SignatureError, match="bad signature"):
            verify_status(KEY.public_key(), msgspec.structs.replace(signed, **change))


def _status_wire(status: msg.AggregatorStatus) -> msg.AggregatorStatus:
    return msg.decode(status.to_json(), msg.AggregatorStatus)
