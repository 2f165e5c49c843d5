"""The MQTT version negotiation (shared/mqtt/versions.py) and refusal messages: pure, no broker."""

from __future__ import annotations

import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt.connect_errors import describe_refusal
from shared.mqtt.versions import (
    ConnectAttempt,
    Outcome,
    VersionNegotiation,
    check_mqtt_version,
    connack_outcome,
)

NO_ANSWER = [Outcome.VERSION_REFUSED, Outcome.CLOSED, Outcome.SILENT]


def _connack(name: str) -> ReasonCode:
    return ReasonCode(PacketTypes.CONNACK, aName=name)


def test_auto_starts_with_5() -> None:
    assert VersionNegotiation("auto").version == "5"


@pytest.mark.parametrize("outcome", NO_ANSWER)
def test_auto_switches_to_311_when_5_gets_no_answer(outcome: Outcome) -> None:
    negotiation = VersionNegotiation("auto")

    switched = negotiation.record(outcome)

    assert switched
    assert negotiation.version == "3.1.1"


def test_auto_switches_back_to_5_when_311_gets_no_answer_either() -> None:
    negotiation = VersionNegotiation("auto")
    negotiation.record(Outcome.SILENT)

    negotiation.record(Outcome.CLOSED)

    assert negotiation.version == "5"


@pytest.mark.parametrize("answer", [Outcome.ACCEPTED, Outcome.REFUSED])
def test_an_answer_in_kind_settles_the_version(answer: Outcome) -> None:
    negotiation = VersionNegotiation("auto")
    negotiation.record(Outcome.SILENT)

    negotiation.record(answer)
    switched = negotiation.record(Outcome.CLOSED)  # e.g. a broker restart later on

    assert not switched
    assert negotiation.settled
    assert negotiation.version == "3.1.1"


@pytest.mark.parametrize(("setting", "version"), [("5", "5"), ("3.1.1", "3.1.1")])
@pytest.mark.parametrize("outcome", NO_ANSWER)
def test_a_pinned_version_never_switches(setting: str, version: str, outcome: Outcome) -> None:
    negotiation = VersionNegotiation(setting)

    switched = negotiation.record(outcome)

    assert not switched
    assert negotiation.version == version


@pytest.mark.parametrize("bad", ["v5", "3", "311", "5.0", "", "AUTO"])
def test_unknown_version_setting_is_refused_naming_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match=r"mqtt-version must be one of: auto, 5, 3\.1\.1"):
        check_mqtt_version(bad)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(0, Outcome.ACCEPTED), (0x84, Outcome.VERSION_REFUSED), (0x86, Outcome.REFUSED)],
)
def test_connack_reason_code_gives_the_outcome(code: int, outcome: Outcome) -> None:
    assert connack_outcome(code) is outcome


def test_log_line_of_a_fallback_names_the_reason_and_the_chunk_limit() -> None:
    negotiation = VersionNegotiation("auto")
    negotiation.record(Outcome.SILENT)

    text = negotiation.describe(max_chunk_bytes=4096)

    assert text.startswith("MQTT 3.1.1 (auto: the broker did not answer an MQTT 5 CONNECT)")
    assert "payloads over 4096 bytes" in text


def test_failure_after_trying_both_versions_says_so() -> None:
    negotiation = VersionNegotiation("auto")
    negotiation.record(Outcome.SILENT)
    negotiation.record(Outcome.CLOSED)

    why = negotiation.failure(refused=None)

    assert why == (
        "no answer; tried MQTT 5 and 3.1.1: "
        "the broker closed the connection on an MQTT 3.1.1 CONNECT"
    )


def test_silence_to_a_pinned_5_suggests_auto() -> None:
    assert VersionNegotiation("5").failure(refused=None).endswith("try --mqtt-version auto")


def test_311_refusal_names_the_return_code_the_broker_sent() -> None:
    text = describe_refusal(_connack("Bad user name or password"), "3.1.1")

    assert "(MQTT 3.1.1 return code 4)" in text
    assert "--username/--password" in text


def test_version_refusal_suggests_the_other_version() -> None:
    text = describe_refusal(_connack("Unsupported protocol version"), "5")

    assert text.endswith("the broker does not speak MQTT 5; try --mqtt-version 3.1.1 or auto")


def test_5_refusal_keeps_the_reason_code_name_only() -> None:
    assert describe_refusal(_connack("Not authorized"), "5").startswith("Not authorized: check")


def test_attempt_keeps_the_first_outcome() -> None:
    attempt = ConnectAttempt()
    attempt.settle(Outcome.VERSION_REFUSED)

    attempt.settle(Outcome.CLOSED)  # paho's disconnect callback after the refusal

    assert attempt.wait(0) is Outcome.VERSION_REFUSED


def test_attempt_without_an_answer_in_time_is_silent() -> None:
    assert ConnectAttempt().wait(0.01) is Outcome.SILENT


def test_attempt_wait_returns_an_outcome_settled_on_another_thread() -> None:
    attempt = ConnectAttempt()
    thread = threading.Thread(target=attempt.settle, args=(Outcome.ACCEPTED,))

    thread.start()
    outcome = attempt.wait(5)
    thread.join()

    assert outcome is Outcome.ACCEPTED
