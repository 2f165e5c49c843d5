"""Unit tests for the JSON control messages (shared/protocol/messages.py)."""

from __future__ import annotations

import json
import threading
from typing import Any

import msgspec
import pytest

from shared.protocol import messages as msg
from shared.protocol.messages import (
    MAX_CONTROL_BYTES,
    SCHEMA,
    AgentStatus,
    AggregatorStatus,
    GlobalMeta,
    Message,
    MessageError,
    ModelSpec,
    Receipt,
    RoundMetrics,
    RoundStart,
    TrainParams,
    decode,
    to_builtins,
)

HASH = "0123456789abcdef" * 4


def _round_start(**overrides: Any) -> RoundStart:
    fields: dict[str, Any] = {
        "federation": "lab-1",
        "round": 3,
        "base_hash": HASH,
        "deadline": 1_700_000_120.5,
        "selected": ["pi-01", "pi-02"],
        "model": ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10),
        "train": TrainParams(local_epochs=2, batch_size=16, lr=0.05, momentum=0.0, seed=7),
        "codec": "fp16",
        "max_update_bytes": 1024,
        "ts": 1_700_000_000.25,
    }
    fields.update(overrides)
    return RoundStart(**fields)


SAMPLES: list[Message] = [
    _round_start(),
    AgentStatus(
        client_id="pi-01",
        state="training",
        num_samples=600,
        round=3,
        device={"machine": "aarch64"},
        ts=1.5,
    ),
    Receipt(round=3, client_id="pi-01", status="rejected", reason="late: round 3 is closed", ts=2),
    GlobalMeta(
        federation="lab-1",
        round=4,
        model_hash=HASH,
        model=ModelSpec(arch="cnn", input_shape=(3, 32, 32), num_classes=100),
        nbytes=246_000,
        final=True,
        ts=3.0,
    ),
    AggregatorStatus(federation="lab-1", state="finished", round=20, rounds_total=20, ts=4.0),
    RoundMetrics(
        federation="lab-1",
        round=4,
        participants=["pi-01", "pi-02"],
        accepted=2,
        rejected=1,
        num_samples=1200,
        train_loss=0.42,
        test_accuracy=0.91,
        bytes_up=12345,
        bytes_down=81_000,
        model_bytes=228_000,
        delta_bytes=40_000,
        download_codec="int8",
        round_time_s=3.5,
        codec="int8",
        model_hash=HASH,
        ts=5.0,
    ),
]


def _with(payload: bytes, **changes: Any) -> bytes:
    """Re-encode ``payload`` with some top-level fields changed."""
    obj = json.loads(payload)
    obj.update(changes)
    return json.dumps(obj).encode()


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_to_json_then_decode_returns_equal_message(message: Message) -> None:
    payload = message.to_json()

    decoded = decode(payload, type(message))

    assert decoded == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_to_json_is_plain_json_with_schema_version(message: Message) -> None:
    obj = json.loads(message.to_json())

    assert obj["schema"] == SCHEMA
    assert obj["ts"] == message.ts


def test_defaults_survive_round_trip() -> None:
    message = Receipt(round=0, client_id="c1", status="accepted")

    decoded = decode(message.to_json(), Receipt)

    assert decoded.reason == ""
    assert decoded.schema == SCHEMA


def test_messages_from_before_global_deltas_still_decode() -> None:
    metrics = json.loads(SAMPLES[-1].to_json())
    for key in ("model_bytes", "delta_bytes", "download_codec"):
        del metrics[key]
    start = json.loads(_round_start().to_json())
    del start["download_codec"]

    old_metrics = decode(json.dumps(metrics).encode(), RoundMetrics)
    old_start = decode(json.dumps(start).encode(), RoundStart)

    assert (old_metrics.model_bytes, old_metrics.delta_bytes) == (0, 0)
    assert old_start.download_codec == "none"  # an older aggregator: full models only


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = _with(SAMPLES[2].to_json(), added_in_v1_1="whatever")

    decoded = decode(payload, Receipt)

    assert decoded == SAMPLES[2]


def test_to_builtins_gives_plain_dict() -> None:
    out = to_builtins(SAMPLES[2])

    assert out["client_id"] == "pi-01"
    assert out["status"] == "rejected"


# --- field validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("round", -1),
        ("round", "3"),
        ("round", 1.5),
        ("base_hash", "z" * 64),
        ("base_hash", HASH[:-1]),
        ("base_hash", HASH.upper()),
        ("federation", "a/b"),
        ("federation", "+"),
        ("federation", ""),
        ("selected", ["pi-01", "bad#id"]),
        ("selected", "pi-01"),
        ("deadline", "soon"),
        ("max_update_bytes", 0),
        ("codec", 8),
    ],
)
def test_decode_round_start_names_the_bad_field(field: str, value: Any) -> None:
    payload = _with(_round_start().to_json(), **{field: value})

    with pytest.raises(MessageError, match=rf"\$\.{field}"):
        decode(payload, RoundStart)


@pytest.mark.parametrize(
    ("path", "patch"),
    [
        ("model.arch", {"model": {"arch": "le net"}}),
        ("model.num_classes", {"model": {"arch": "mlp", "num_classes": 0}}),
        ("model.input_shape", {"model": {"arch": "mlp", "input_shape": [1, 28, 28, 1]}}),
        ("train.lr", {"train": {"lr": 0}}),
        ("train.momentum", {"train": {"momentum": -0.1}}),
        ("train.batch_size", {"train": {"batch_size": 0}}),
    ],
)
def test_decode_names_the_bad_nested_field(path: str, patch: dict[str, Any]) -> None:
    payload = _with(_round_start().to_json(), **patch)

    with pytest.raises(MessageError, match=rf"\$\.{path}"):
        decode(payload, RoundStart)


@pytest.mark.parametrize("field", ["federation", "round", "base_hash", "selected", "model"])
def test_decode_names_a_missing_required_field(field: str) -> None:
    obj = json.loads(_round_start().to_json())
    del obj[field]

    with pytest.raises(MessageError, match=field):
        decode(json.dumps(obj).encode(), RoundStart)


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (AgentStatus, "state", "sleeping"),
        (Receipt, "status", "maybe"),
        (AggregatorStatus, "state", "paused"),
    ],
)
def test_decode_rejects_values_outside_literal_choices(
    kind: type[Message], field: str, value: str
) -> None:
    sample = next(m for m in SAMPLES if isinstance(m, kind))
    payload = _with(sample.to_json(), **{field: value})

    with pytest.raises(MessageError, match=rf"\$\.{field}"):
        decode(payload, kind)


def test_decode_error_names_the_message_kind() -> None:
    payload = _with(_round_start().to_json(), round=-1)

    with pytest.raises(MessageError, match="RoundStart"):
        decode(payload, RoundStart)


@pytest.mark.parametrize("version", [0, 2, SCHEMA + 1])
def test_decode_rejects_other_schema_versions(version: int) -> None:
    payload = _with(SAMPLES[2].to_json(), schema=version)

    with pytest.raises(MessageError, match="schema"):
        decode(payload, Receipt)


def test_constructing_message_with_other_schema_version_raises() -> None:
    with pytest.raises(ValueError, match="schema"):
        Receipt(round=0, client_id="c1", status="accepted", schema=SCHEMA + 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("federation", "lab-1\n"), ("base_hash", HASH + "\n"), ("selected", ["pi-01\n"])],
)
def test_decode_rejects_trailing_newline_in_names_and_hashes(field: str, value: Any) -> None:
    payload = _with(_round_start().to_json(), **{field: value})

    with pytest.raises(MessageError):
        decode(payload, RoundStart)


# --- envelope --------------------------------------------------------------------------------


def test_decode_rejects_oversized_payload_before_parsing() -> None:
    payload = b" " * (MAX_CONTROL_BYTES + 1)

    with pytest.raises(MessageError, match="exceeds"):
        decode(payload, Receipt)


def test_decode_accepts_payload_at_the_size_limit() -> None:
    payload = SAMPLES[2].to_json()
    padded = payload + b" " * (MAX_CONTROL_BYTES - len(payload))

    assert decode(padded, Receipt) == SAMPLES[2]


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b"\xff\xfe", b'{"round": 1,}', b"[1, 2]", b"null", b"42"],
)
def test_decode_rejects_non_json_or_non_object(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(payload, Receipt)


def test_decode_rejects_message_of_another_kind() -> None:
    payload = SAMPLES[1].to_json()  # an AgentStatus

    with pytest.raises(MessageError):
        decode(payload, Receipt)


def test_each_message_type_has_one_decoder_built_once_across_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Many agents share a process in the fleet simulator: their first decodes of a type come
    # at once, and msgspec must build the type's validation info only once (see decoder()).

    built: list[type] = []
    real = msgspec.json.Decoder

    def counting(kind: type) -> msgspec.json.Decoder:  # type: ignore[type-arg]
        built.append(kind)
        return real(kind)

    monkeypatch.setattr(msg, "_decoders", {})
    monkeypatch.setattr(msgspec.json, "Decoder", counting)
    payload = msg.Receipt(round=1, client_id="dev-1", status="accepted", code="accepted").to_json()
    start = threading.Barrier(32)
    decoded: list[msg.Receipt] = []

    def first_decode() -> None:
        start.wait()
        decoded.append(msg.decode(payload, msg.Receipt))

    threads = [threading.Thread(target=first_decode) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert built == [msg.Receipt]
    assert len(decoded) == 32 and {r.client_id for r in decoded} == {"dev-1"}
    assert msg.decoder(msg.Receipt) is msg.decoder(msg.Receipt)
