"""Sites: two real Mosquittos, a central one and a site one bridged to it, both configured by
`fedmq broker init` (the site's with --site/--upstream/--uplink) and `fedmq broker add-site`.

The brokers: tests/integration/site_brokers.py; the aggregators as processes:
tests/integration/test_site_rounds.py. TLS everywhere (the generated configs have no plain
listener), each client with its own
provisioned login. Nothing is asserted after a fixed sleep: a message that must not cross is
shown absent by waiting for a marker published after it (:func:`fed.until`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.integration import federation as fed
from tests.integration.site_brokers import (
    BRIDGE_WAIT,
    OTHER_SITE,
    SITE,
    Sites,
    T,
    bridged_sites,
    connect,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    """The central broker (sites factory-1 and factory-2 added, device pi-c) and factory-1's
    broker (device pi-0), both started; the bridge reconnects within 1-2 s."""
    yield from bridged_sites(tmp_path, open_central_acl=False)


@pytest.fixture(params=[False, True], ids=["generated-acl", "central-acl-open-to-the-site"])
def either_acl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sites]:
    """As ``sites``, and once more with the central ACL granting the site's login every fedmq
    topic: then only the bridge's own topic lines keep device traffic on the site."""
    yield from bridged_sites(tmp_path, open_central_acl=request.param)


@pytest.fixture(params=[False, True], ids=["password", "mutual-tls"])
def either_tls(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sites]:
    """As ``sites``, and once more with a central broker that requires client certificates
    (`broker init --require-certificate`): the bridge presents the site's."""
    yield from bridged_sites(tmp_path, require_certificate=request.param)


def _publish(client: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(fed.BROKER_WAIT)
    assert info.is_published(), topic


def _seen(messages: list[mqtt.MQTTMessage]) -> list[tuple[str, bytes]]:
    return [(m.topic, bytes(m.payload)) for m in messages]


def _bridge_state(state: bytes) -> Any:
    """An :func:`fed.until` condition: factory-1's bridge notification says ``state``."""
    return lambda m: m.topic == T.site_bridge(SITE) and m.payload == state


def _bridge_up(central: mqtt.Client) -> fed.Inbox:
    """Wait until site factory-1's bridge is connected; the inbox of everything after."""
    inbox = fed.collect(central, "fl/v1/#")
    fed.until(inbox, _bridge_state(b"1"), BRIDGE_WAIT, "the bridge's '1' on the central broker")
    return inbox


def test_retained_model_and_announcement_on_central_reach_the_sites_devices(sites: Sites) -> None:
    agg = connect(sites.central, "aggregator")
    _bridge_up(agg)
    site_agg = connect(sites.site, "aggregator")
    site_seen = fed.collect(site_agg, "fl/v1/#")
    state = {
        T.global_meta: b'{"round": 1}',
        T.global_model: b"model bytes",
        T.global_model + "/chunk/0": b"model chunk",
        T.global_delta: b"delta bytes",
        T.aggregator_status: b'{"state": "running"}',
        T.round_start(1): b'{"round": 1}',
    }

    for topic, payload in state.items():
        _publish(agg, topic, payload, retain=True)

    got = fed.until(site_seen, fed.on(T.round_start(1)), BRIDGE_WAIT, "round 1 on the site")
    # (and the site broker's local copy of its bridge's state, retained before we subscribed)
    assert sorted(x for x in _seen(got) if x[0] != T.site_bridge(SITE)) == sorted(state.items())
    device = connect(sites.site, "pi-0")  # joins later: the site broker retained it all
    joined = fed.collect(device, T.global_meta, T.global_model, T.round_start_any)
    got = fed.until(joined, fed.on(T.round_start(1)), fed.BROKER_WAIT, "retained round 1")
    assert all(m.retain for m in got)
    assert {m.topic for m in got} >= {T.global_meta, T.global_model, T.round_start(1)}


def test_the_sites_partial_and_status_reach_central(either_tls: Sites) -> None:
    sites = either_tls
    agg = connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = connect(sites.site, "aggregator")

    _publish(site_agg, T.site_status(SITE), b'{"state": "running"}', retain=True)
    _publish(site_agg, T.site_partial(1, SITE) + "/chunk/0", b"partial chunk")
    _publish(site_agg, T.site_partial(1, SITE), b"partial of round 1")

    got = fed.until(central_seen, fed.on(T.site_partial(1, SITE)), BRIDGE_WAIT, "the partial")
    assert _seen(got) == [
        (T.site_status(SITE), b'{"state": "running"}'),
        (T.site_partial(1, SITE) + "/chunk/0", b"partial chunk"),
        (T.site_partial(1, SITE), b"partial of round 1"),
    ]
    monitor = connect(sites.central, "monitor")  # subscribes later: gets the retained status
    retained = fed.collect(monitor, T.site_status(SITE))
    got = fed.until(retained, fed.on(T.site_status(SITE)), fed.BROKER_WAIT, "retained status")
    assert got[-1].retain  # try_private: the retain flag crossed the bridge


def test_nothing_a_device_publishes_crosses_the_bridge(either_acl: Sites) -> None:
    sites = either_acl
    agg = connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = connect(sites.site, "aggregator")
    site_seen = fed.collect(site_agg, "fl/v1/#")
    device = connect(sites.site, "pi-0")
    local = [
        (T.agent_status("pi-0"), b'{"state": "online"}'),
        (T.update(1, "pi-0"), b"private delta of pi-0"),
        (T.update(1, "pi-0") + "/chunk/0", b"private delta chunk"),
        (T.infer_request("pi-0", "pi-0"), b'{"x": []}'),
    ]

    for topic, payload in local:
        _publish(device, topic, payload, retain=topic == T.agent_status("pi-0"))
    _publish(site_agg, T.receipt(1, "pi-0"), b'{"status": "accepted"}')
    _publish(site_agg, T.site_partial(1, SITE), b"marker")  # crosses, after all of the above

    got = fed.until(site_seen, fed.on(T.site_partial(1, SITE)), fed.BROKER_WAIT, "the marker")
    assert set(local) < set(_seen(got))  # they were published on the site
    got = fed.until(central_seen, fed.on(T.site_partial(1, SITE)), BRIDGE_WAIT, "the marker")
    assert _seen(got) == [(T.site_partial(1, SITE), b"marker")]


def test_central_acl_confines_a_sites_login_to_its_own_topics(sites: Sites) -> None:
    # The site's login is its bridge's client id on the central broker (client id =
    # login): with the bridge stopped, a client uses it as a compromised site would.
    sites.site.broker.stop()
    agg = connect(sites.central, "aggregator")
    central_seen = fed.collect(agg, "fl/v1/#")
    intruder = connect(sites.central, SITE)
    intruder_seen = fed.collect(intruder, "fl/v1/#", T.update_any, T.site_root(OTHER_SITE) + "/#")
    device = connect(sites.central, "pi-c")
    forged = [
        T.site_partial(1, OTHER_SITE),
        T.site_status(OTHER_SITE),
        T.site_receipt(1, SITE),
        T.update(1, SITE),
        T.update(1, "pi-c"),
        T.agent_status(SITE),
        T.global_model,
        T.round_start(9),
        T.aggregator_status,
        T.infer_request(SITE, SITE),  # a device pattern grants it to the login factory-1
    ]

    _publish(intruder, T.site_partial(1, SITE), b"own partial")
    for topic in forged:
        _publish(intruder, topic, b"forged")
    _publish(device, T.update(1, "pi-c"), b"private delta of pi-c")
    _publish(agg, T.site_receipt(1, OTHER_SITE), b"the other site's receipt")
    _publish(agg, T.site_receipt(1, SITE), b"own receipt")  # the marker: the site reads it

    got = fed.until(central_seen, fed.on(T.site_receipt(1, SITE)), fed.BROKER_WAIT, "marker")
    got = [m for m in got if not m.retain]  # the bridge's state, left by the stopped site
    assert _seen(got) == [
        (T.site_partial(1, SITE), b"own partial"),
        (T.update(1, "pi-c"), b"private delta of pi-c"),
        (T.site_receipt(1, OTHER_SITE), b"the other site's receipt"),
        (T.site_receipt(1, SITE), b"own receipt"),
    ]
    got = fed.until(intruder_seen, fed.on(T.site_receipt(1, SITE)), fed.BROKER_WAIT, "marker")
    assert _seen(got) == [(T.site_receipt(1, SITE), b"own receipt")]


def test_messages_queued_while_the_uplink_is_down_are_delivered_after(sites: Sites) -> None:
    # Persistent watchers on both brokers, as the two aggregators are: their sessions
    # survive a broker restart (persistence true), so nothing depends on who reconnects first.
    agg = connect(sites.central, "aggregator", persistent=True)
    central_seen = fed.collect(agg, T.site_root(SITE) + "/#")
    site_agg = connect(sites.site, "aggregator", persistent=True)
    site_seen = fed.collect(site_agg, T.site_receipt_any(SITE), T.round_decision_any)
    fed.until(central_seen, _bridge_state(b"1"), BRIDGE_WAIT, "the bridge up")

    # Down: the site broker stops; the central aggregator answers a partial and decides.
    site_agg.disconnect()
    site_agg.loop_stop()
    sites.site.broker.stop()
    _publish(agg, T.site_receipt(1, SITE), b"receipt while the site was down")
    _publish(agg, T.round_decision(1), b"decision while the site was down")
    sites.site.broker.restart()
    site_agg = connect(sites.site, "aggregator", persistent=True, inbox=site_seen)
    got = fed.until(site_seen, fed.on(T.round_decision(1)), BRIDGE_WAIT, "the decision")
    assert _seen(got) == [
        (T.site_receipt(1, SITE), b"receipt while the site was down"),
        (T.round_decision(1), b"decision while the site was down"),
    ]

    # Up: the central broker stops; the site's partial waits in the site broker.
    fed.until(central_seen, _bridge_state(b"1"), BRIDGE_WAIT, "the bridge back")
    agg.disconnect()
    agg.loop_stop()
    sites.central.broker.stop()
    _publish(site_agg, T.site_partial(2, SITE), b"partial while central was down")
    sites.central.broker.restart()
    agg = connect(sites.central, "aggregator", persistent=True, inbox=central_seen)
    got = fed.until(central_seen, fed.on(T.site_partial(2, SITE)), BRIDGE_WAIT, "the partial")
    assert (T.site_partial(2, SITE), b"partial while central was down") in _seen(got)


def test_an_uplink_cut_and_healed_delivers_what_waited_on_both_sides(sites: Sites) -> None:
    agg = connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = connect(sites.site, "aggregator")
    site_seen = fed.collect(site_agg, "fl/v1/#")
    device = connect(sites.site, "pi-0")
    _publish(agg, T.global_model, b"model 0", retain=True)
    fed.until(site_seen, fed.on(T.global_model), BRIDGE_WAIT, "model 0 on the site")

    sites.uplink.cut()  # both brokers keep running; the WAN between them is gone
    fed.until(central_seen, _bridge_state(b"0"), BRIDGE_WAIT, "the bridge's will")
    _publish(agg, T.site_receipt(1, SITE), b"receipt during the cut")
    _publish(agg, T.round_start(2), b"round 2", retain=True)
    for r in (1, 2, 3):
        _publish(agg, T.global_model, f"model {r}".encode(), retain=True)
    _publish(agg, T.round_start(2), b"", retain=True)  # round 2 closes: its announcement cleared
    _publish(agg, T.round_decision(2), b"decision during the cut")
    _publish(device, T.update(2, "pi-0"), b"update during the cut")
    _publish(site_agg, T.site_partial(2, SITE), b"partial during the cut")
    # The site carries on locally: its devices' updates reach the site aggregator.
    got = fed.until(site_seen, fed.on(T.site_partial(2, SITE)), fed.BROKER_WAIT, "the partial")
    assert (T.update(2, "pi-0"), b"update during the cut") in _seen(got)
    sites.uplink.heal()

    got = fed.until(central_seen, fed.on(T.site_partial(2, SITE)), BRIDGE_WAIT, "the partial")
    assert (T.site_partial(2, SITE), b"partial during the cut") in _seen(got)
    assert T.update(2, "pi-0") not in {m.topic for m in got}
    after = fed.until(site_seen, fed.on(T.round_decision(2)), BRIDGE_WAIT, "the decision")
    if T.global_model not in {m.topic for m in after}:
        after += fed.until(site_seen, fed.on(T.global_model), BRIDGE_WAIT, "the latest model")
    _publish(agg, T.round_decision(3), b"marker")  # after it, nothing of the cut is pending
    after += fed.until(site_seen, fed.on(T.round_decision(3)), BRIDGE_WAIT, "the marker")
    seen = [x for x in _seen(after) if x[0] != T.site_bridge(SITE)]
    # QoS 1 state, queued on the central broker, in order: the announcement set then cleared
    # (so the site retains no stale round), the receipt, the decision.
    assert [x for x in seen if x[0] != T.global_model] == [
        (T.site_receipt(1, SITE), b"receipt during the cut"),
        (T.round_start(2), b"round 2"),
        (T.round_start(2), b""),
        (T.round_decision(2), b"decision during the cut"),
        (T.round_decision(3), b"marker"),
    ]
    # The model (QoS 0, retained): the latest alone crosses, once, not the stale ones.
    assert [x for x in seen if x[0] == T.global_model] == [(T.global_model, b"model 3")]
