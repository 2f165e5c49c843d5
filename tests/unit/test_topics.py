"""Topic builders and parser of the fedmq protocol (shared/protocol/topics.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.topics import (
    PROTOCOL,
    ParsedTopic,
    TopicError,
    Topics,
    inference_server_id,
    parse,
    validate_agent_id,
    validate_name,
)

FED = "lab-1"

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
# Training client ids: any name but an inference server's ("...-infer").
agent_ids = names.filter(lambda n: not n.endswith("-infer"))
# Devices whose inference server's id ("<id>-infer") still fits in 64 characters.
device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,57}", fullmatch=True).filter(
    lambda n: not n.endswith("-infer")
)
round_ids = st.integers(min_value=0, max_value=999_999_999)

INVALID_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("+", id="plus-wildcard"),
    pytest.param("#", id="hash-wildcard"),
    pytest.param("a+b", id="embedded-plus"),
    pytest.param("a#", id="trailing-hash"),
    pytest.param("a/b", id="slash"),
    pytest.param("/", id="bare-slash"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("-lead", id="leading-dash"),
    pytest.param(".lead", id="leading-dot"),
    pytest.param("_lead", id="leading-underscore"),
    pytest.param("a b", id="space"),
    pytest.param("ä", id="non-ascii"),
    pytest.param("a$", id="dollar"),
]


# --- builders --------------------------------------------------------------------------------


def test_protocol_prefix_is_fl_v1() -> None:
    assert PROTOCOL == "fl/v1"


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("root", "fl/v1/lab-1"),
        ("all", "fl/v1/lab-1/#"),
        ("aggregator_status", "fl/v1/lab-1/aggregator/status"),
        ("global_meta", "fl/v1/lab-1/global/meta"),
        ("global_model", "fl/v1/lab-1/global/model"),
        ("global_delta", "fl/v1/lab-1/global/delta"),
        ("metrics", "fl/v1/lab-1/metrics"),
        ("round_start_any", "fl/v1/lab-1/round/+/start"),
        ("update_any", "fl/v1/lab-1/round/+/update/+"),
        ("agent_status_any", "fl/v1/lab-1/agents/+/status"),
    ],
)
def test_property_builders_produce_documented_topic(attribute: str, expected: str) -> None:
    topics = Topics(FED)

    topic = getattr(topics, attribute)

    assert topic == expected


def test_round_start_topic_contains_round_id() -> None:
    assert Topics(FED).round_start(7) == "fl/v1/lab-1/round/7/start"


def test_update_topic_contains_round_and_client() -> None:
    assert Topics(FED).update(3, "pi-04") == "fl/v1/lab-1/round/3/update/pi-04"


def test_receipt_topic_contains_round_and_client() -> None:
    assert Topics(FED).receipt(3, "pi-04") == "fl/v1/lab-1/round/3/receipt/pi-04"


def test_receipt_any_round_subscribes_to_one_client_all_rounds() -> None:
    assert Topics(FED).receipt_any_round("pi-04") == "fl/v1/lab-1/round/+/receipt/pi-04"


def test_agent_status_topic_contains_client() -> None:
    assert Topics(FED).agent_status("pi-04") == "fl/v1/lab-1/agents/pi-04/status"


@pytest.mark.parametrize("bad_round", [-1, 1.0, "1", True, None])
def test_builders_reject_invalid_round_ids(bad_round: object) -> None:
    topics = Topics(FED)

    with pytest.raises(TopicError):
        topics.round_start(bad_round)  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.update(bad_round, "c1")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.receipt(bad_round, "c1")  # type: ignore[arg-type]


# --- name validation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A9", "pi-04", "fed_1.test", "0", "x" * 64])
def test_validate_name_accepts_legal_names(name: str) -> None:
    assert validate_name("client id", name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_federation_name_raises_topic_error(name: str) -> None:
    with pytest.raises(TopicError, match="federation"):
        Topics(name)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_client_id_raises_topic_error_in_every_client_builder(name: str) -> None:
    topics = Topics(FED)
    builders = [
        lambda: topics.update(1, name),
        lambda: topics.receipt(1, name),
        lambda: topics.receipt_any_round(name),
        lambda: topics.agent_status(name),
    ]

    for build in builders:
        with pytest.raises(TopicError, match="client id"):
            build()


@pytest.mark.parametrize("value", [None, 5, b"fed"])
def test_non_string_name_raises_topic_error(value: object) -> None:
    with pytest.raises(TopicError):
        validate_name("federation", value)  # type: ignore[arg-type]


ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=70))
def test_name_is_accepted_exactly_when_it_matches_the_documented_rule(name: str) -> None:
    legal = (
        len(name) <= 64 and name[0] in ALLOWED - {"_", ".", "-"} and all(c in ALLOWED for c in name)
    )

    if legal:
        assert validate_name("client id", name) == name
    else:
        with pytest.raises(TopicError):
            validate_name("client id", name)


def test_name_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(TopicError):
        validate_name("client id", "abc\n")


# --- parse -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(fed=names)
def test_parse_round_trips_federation_level_builders(fed: str) -> None:
    topics = Topics(fed)
    expected = {
        topics.aggregator_status: "aggregator_status",
        topics.global_meta: "global_meta",
        topics.global_model: "global_model",
        topics.global_delta: "global_delta",
        topics.metrics: "metrics",
    }

    for topic, kind in expected.items():
        assert parse(topic) == ParsedTopic(fed, kind)


@settings(max_examples=50, deadline=None)
@given(fed=names, round_id=round_ids)
def test_parse_round_trips_round_start(fed: str, round_id: int) -> None:
    topic = Topics(fed).round_start(round_id)

    assert parse(topic) == ParsedTopic(fed, "round_start", round_id=round_id)


@settings(max_examples=50, deadline=None)
@given(fed=names, round_id=round_ids, cid=agent_ids)
def test_parse_round_trips_update(fed: str, round_id: int, cid: str) -> None:
    topic = Topics(fed).update(round_id, cid)

    assert parse(topic) == ParsedTopic(fed, "update", round_id=round_id, client_id=cid)


@settings(max_examples=50, deadline=None)
@given(fed=names, round_id=round_ids, cid=agent_ids)
def test_parse_round_trips_receipt(fed: str, round_id: int, cid: str) -> None:
    topic = Topics(fed).receipt(round_id, cid)

    assert parse(topic) == ParsedTopic(fed, "receipt", round_id=round_id, client_id=cid)


@settings(max_examples=50, deadline=None)
@given(fed=names, cid=agent_ids)
def test_parse_round_trips_agent_status(fed: str, cid: str) -> None:
    topic = Topics(fed).agent_status(cid)

    assert parse(topic) == ParsedTopic(fed, "agent_status", client_id=cid)


@settings(max_examples=50, deadline=None)
@given(fed=names, cid=device_ids, requester=names)
def test_parse_round_trips_inference_requests_and_responses(
    fed: str, cid: str, requester: str
) -> None:
    t = Topics(fed)

    assert parse(t.infer_request(cid, requester)) == ParsedTopic(
        fed, "infer_request", client_id=cid, requester=requester
    )
    assert parse(t.infer_response(cid, requester)) == ParsedTopic(
        fed, "infer_response", client_id=cid, requester=requester
    )


def test_inference_subscription_covers_every_requester_of_one_device() -> None:
    assert Topics("lab").infer_request_any("pi-7") == "fl/v1/lab/infer/pi-7-infer/request/+"


def test_inference_topics_are_keyed_by_the_servers_own_id() -> None:
    topics = Topics("lab")

    assert topics.infer_request("pi-7", "pi-7") == "fl/v1/lab/infer/pi-7-infer/request/pi-7"
    assert topics.infer_response("pi-7", "app") == "fl/v1/lab/infer/pi-7-infer/response/app"
    assert inference_server_id("pi-7") == "pi-7-infer"


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("pi-7-infer", id="already-a-server-id"),
        pytest.param("p" * 59, id="no-room-for-the-suffix"),
        pytest.param("a/b", id="invalid-name"),
    ],
)
def test_a_device_id_that_cannot_name_a_server_is_refused(device: str) -> None:
    with pytest.raises(TopicError):
        inference_server_id(device)


def test_the_longest_device_id_still_names_a_server() -> None:
    assert len(inference_server_id("p" * 58)) == 64


def test_training_topics_refuse_an_inference_servers_id() -> None:
    # A device's second login (its server's) must not give it a second vote.
    topics = Topics(FED)
    builders = [
        lambda: topics.update(1, "pi-7-infer"),
        lambda: topics.receipt(1, "pi-7-infer"),
        lambda: topics.receipt_any_round("pi-7-infer"),
        lambda: topics.agent_status("pi-7-infer"),
        lambda: validate_agent_id("pi-7-infer"),
    ]

    for build in builders:
        with pytest.raises(TopicError, match="inference servers, which never train"):
            build()


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("fl/v1/lab-1/round/1/update/pi-7-infer", id="update"),
        pytest.param("fl/v1/lab-1/round/1/receipt/pi-7-infer", id="receipt"),
        pytest.param("fl/v1/lab-1/agents/pi-7-infer/status", id="status"),
        pytest.param("fl/v1/lab-1/infer/pi-7/request/me", id="request-to-a-device-login"),
        pytest.param("fl/v1/lab-1/infer/pi-7/response/me", id="response-from-a-device-login"),
        pytest.param("fl/v1/lab-1/infer/-infer/request/me", id="suffix-only"),
    ],
)
def test_parse_refuses_servers_on_training_topics_and_devices_on_inference_topics(
    topic: str,
) -> None:
    with pytest.raises(TopicError):
        parse(topic)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("fl/v1", id="protocol-only"),
        pytest.param("fl/v1/lab-1", id="federation-only"),
        pytest.param("fl/v2/lab-1/metrics", id="other-version"),
        pytest.param("spBv1.0/lab-1/NBIRTH/node", id="sparkplug"),
        pytest.param("/fl/v1/lab-1/metrics", id="leading-slash"),
        pytest.param("fl/v1/lab-1/metrics/", id="trailing-slash"),
        pytest.param("fl/v1/lab-1/unknown", id="unknown-leaf"),
        pytest.param("fl/v1/lab-1/global", id="truncated-global"),
        pytest.param("fl/v1/lab-1/global/weights", id="unknown-global"),
        pytest.param("fl/v1/lab-1/aggregator/status/x", id="extra-level"),
        pytest.param("fl/v1/lab-1/agents/pi-04", id="agent-without-status"),
        pytest.param("fl/v1/lab-1/agents/pi-04/state", id="agent-unknown-leaf"),
        pytest.param("fl/v1/lab-1/round/1", id="round-without-leaf"),
        pytest.param("fl/v1/lab-1/round/1/update", id="update-without-client"),
        pytest.param("fl/v1/lab-1/round/1/start/x", id="start-with-extra"),
        pytest.param("fl/v1/lab-1/round/1/finish", id="unknown-round-leaf"),
        pytest.param("fl/v1/lab-1/round/1/update/c1/x", id="update-with-extra"),
        pytest.param("fl/v1/+/metrics", id="wildcard-federation"),
        pytest.param("fl/v1/#", id="multi-level-wildcard"),
        pytest.param("fl/v1/lab-1/agents/+/status", id="wildcard-client"),
        pytest.param("fl/v1/lab-1/round/+/start", id="wildcard-round"),
        pytest.param("fl/v1/lab-1/round/1/update/+", id="wildcard-update-client"),
    ],
)
def test_parse_rejects_foreign_or_malformed_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse(topic)


@pytest.mark.parametrize(
    "round_text",
    ["-1", "abc", "1.5", "", "1e3", "+1", " 1", "0x1", "1234567890"],
)
def test_parse_rejects_bad_round_ids(round_text: str) -> None:
    with pytest.raises(TopicError, match="round"):
        parse(f"fl/v1/{FED}/round/{round_text}/start")


def test_parse_accepts_largest_nine_digit_round() -> None:
    assert parse(f"fl/v1/{FED}/round/999999999/start").round_id == 999_999_999


@pytest.mark.parametrize(
    "round_text",
    [
        pytest.param("²", id="superscript-two"),
        pytest.param("١", id="arabic-indic-one"),
        pytest.param("007", id="leading-zeros"),
    ],
)
def test_parse_rejects_non_canonical_round_ids(round_text: str) -> None:
    with pytest.raises(TopicError):
        parse(f"fl/v1/{FED}/round/{round_text}/start")


def test_builders_and_parse_agree_on_round_id_range() -> None:
    round_id = 10**9

    try:
        topic = Topics(FED).round_start(round_id)
    except TopicError:
        return  # builder rejects it as well: consistent
    assert parse(topic).round_id == round_id


def test_parse_rejects_invalid_client_id_level() -> None:
    with pytest.raises(TopicError, match="client id"):
        parse(f"fl/v1/{FED}/round/1/update/-bad")


def test_parse_rejects_invalid_federation_level() -> None:
    with pytest.raises(TopicError, match="federation"):
        parse("fl/v1/-bad/metrics")
