"""Sites: two real Mosquittos, a central one and a site one bridged to it, both configured by
`fedmq broker init` (the site's with --site/--upstream/--uplink) and `fedmq broker add-site`.

TLS everywhere (the generated configs have no plain listener), each client with its own
provisioned login. Nothing is asserted after a fixed sleep: a message that must not cross is
shown absent by waiting for a marker published after it (:func:`fed.until`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.ops import provision
from aggregator.ops.bridge import SiteUplink, Upstream, central_site_acl
from aggregator.ops.local_broker import LocalBroker, free_port
from aggregator.ops.netproxy import NetProxy
from aggregator.ops.sites import site_add
from shared.protocol.topics import Topics
from tests.conftest import require_mosquitto
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

FED = fed.FEDERATION
SITE = "factory-1"
OTHER_SITE = "factory-2"
T = Topics(FED)
# The bridge's first reconnect after a broker comes back: decorrelated jitter from 1 s,
# capped at 2 s (the generated default is 5 s to 60 s), plus the TLS handshake.
BRIDGE_WAIT = 30.0


@dataclass
class Tier:
    """A provisioned directory and the broker running from its mosquitto.conf."""

    root: Path
    broker: LocalBroker

    def identity(self, user: str) -> Path:
        """The directory of ``user``'s password and client certificate."""
        for sub in ("identities", "devices", "sites"):
            if (self.root / sub / user / "password").exists():
                return self.root / sub / user
        raise AssertionError(f"no login {user} in {self.root}")


@dataclass
class Sites:
    central: Tier
    site: Tier
    uplink: NetProxy  # the site's WAN: the bridge reaches the central broker through it


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    """The central broker (sites factory-1 and factory-2 added, device pi-c) and factory-1's
    broker (device pi-0), both started; the bridge reconnects within 1-2 s."""
    yield from _sites(tmp_path, open_central_acl=False)


@pytest.fixture(params=[False, True], ids=["generated-acl", "central-acl-open-to-the-site"])
def either_acl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sites]:
    """As ``sites``, and once more with the central ACL granting the site's login every fedmq
    topic: then only the bridge's own topic lines keep device traffic on the site."""
    yield from _sites(tmp_path, open_central_acl=request.param)


@pytest.fixture(params=[False, True], ids=["password", "mutual-tls"])
def either_tls(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sites]:
    """As ``sites``, and once more with a central broker that requires client certificates
    (`broker init --require-certificate`): the bridge presents the site's."""
    yield from _sites(tmp_path, require_certificate=request.param)


def _sites(
    tmp_path: Path, *, open_central_acl: bool = False, require_certificate: bool = False
) -> Iterator[Sites]:
    require_mosquitto()
    central_root, site_root = tmp_path / "central", tmp_path / "site"
    cport, sport = free_port(), free_port()
    provision.broker_init(
        central_root,
        port=cport,
        bind="127.0.0.1",
        federation=FED,
        require_certificate=require_certificate,
    )
    provision.device_add(central_root, "pi-c")
    for name in (SITE, OTHER_SITE):
        site_add(central_root, name)
    if open_central_acl:
        acl = (central_root / "acl.conf").read_text()
        block = central_site_acl(FED, SITE)
        assert block in acl
        opened = f"user {SITE}\ntopic readwrite fl/v1/#\n"
        (central_root / "acl.conf").write_text(acl.replace(block, opened))
    wan = NetProxy("127.0.0.1", cport)
    uplink = SiteUplink(
        SITE, Upstream("localhost", wan.port), central_root / "sites" / SITE, restart_timeout=(1, 2)
    )
    provision.broker_init(site_root, port=sport, bind="127.0.0.1", site=uplink)
    provision.device_add(site_root, "pi-0")
    conf = "mosquitto.conf"
    central = LocalBroker(tmp_path / "run-central", port=cport, template=central_root / conf)
    site = LocalBroker(tmp_path / "run-site", port=sport, template=site_root / conf)
    central.start()
    try:
        site.start()
        yield Sites(Tier(central_root, central), Tier(site_root, site), wan)
    finally:
        site.stop()
        central.stop()
        wan.close()


def _connect(
    tier: Tier,
    user: str,
    *,
    persistent: bool = False,
    inbox: fed.Inbox | None = None,
) -> mqtt.Client:
    """A TLS client logged in as ``user`` with its provisioned password and client
    certificate, loop running; ``persistent``: a session that outlives the connection;
    ``inbox`` receives its messages from the start (a persistent session's queued ones)."""
    ident = tier.identity(user)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(tier.root / "ca.crt"),
        certfile=str(ident / "client.crt"),
        keyfile=str(ident / "client.key"),
    )
    client.username_pw_set(user, (ident / "password").read_text().strip())
    if inbox is not None:
        client.on_message = lambda _c, _u, m: inbox.put(m)
    done = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        result.append(rc)
        done.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    client.connect("localhost", tier.broker.port, clean_start=not persistent, properties=props)
    client.loop_start()
    assert done.wait(fed.BROKER_WAIT), f"no CONNACK for {user}"
    assert not result[0].is_failure, f"{user} refused: {result[0]}"
    return client


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
    agg = _connect(sites.central, "aggregator")
    _bridge_up(agg)
    site_agg = _connect(sites.site, "aggregator")
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
    device = _connect(sites.site, "pi-0")  # joins later: the site broker retained it all
    joined = fed.collect(device, T.global_meta, T.global_model, T.round_start_any)
    got = fed.until(joined, fed.on(T.round_start(1)), fed.BROKER_WAIT, "retained round 1")
    assert all(m.retain for m in got)
    assert {m.topic for m in got} >= {T.global_meta, T.global_model, T.round_start(1)}


def test_the_sites_partial_and_status_reach_central(either_tls: Sites) -> None:
    sites = either_tls
    agg = _connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = _connect(sites.site, "aggregator")

    _publish(site_agg, T.site_status(SITE), b'{"state": "running"}', retain=True)
    _publish(site_agg, T.site_partial(1, SITE) + "/chunk/0", b"partial chunk")
    _publish(site_agg, T.site_partial(1, SITE), b"partial of round 1")

    got = fed.until(central_seen, fed.on(T.site_partial(1, SITE)), BRIDGE_WAIT, "the partial")
    assert _seen(got) == [
        (T.site_status(SITE), b'{"state": "running"}'),
        (T.site_partial(1, SITE) + "/chunk/0", b"partial chunk"),
        (T.site_partial(1, SITE), b"partial of round 1"),
    ]
    monitor = _connect(sites.central, "monitor")  # subscribes later: gets the retained status
    retained = fed.collect(monitor, T.site_status(SITE))
    got = fed.until(retained, fed.on(T.site_status(SITE)), fed.BROKER_WAIT, "retained status")
    assert got[-1].retain  # try_private: the retain flag crossed the bridge


def test_nothing_a_device_publishes_crosses_the_bridge(either_acl: Sites) -> None:
    sites = either_acl
    agg = _connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = _connect(sites.site, "aggregator")
    site_seen = fed.collect(site_agg, "fl/v1/#")
    device = _connect(sites.site, "pi-0")
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
    agg = _connect(sites.central, "aggregator")
    central_seen = fed.collect(agg, "fl/v1/#")
    intruder = _connect(sites.central, SITE)
    intruder_seen = fed.collect(intruder, "fl/v1/#", T.update_any, T.site_root(OTHER_SITE) + "/#")
    device = _connect(sites.central, "pi-c")
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
    agg = _connect(sites.central, "aggregator", persistent=True)
    central_seen = fed.collect(agg, T.site_root(SITE) + "/#")
    site_agg = _connect(sites.site, "aggregator", persistent=True)
    site_seen = fed.collect(site_agg, T.site_receipt_any(SITE), T.round_decision_any)
    fed.until(central_seen, _bridge_state(b"1"), BRIDGE_WAIT, "the bridge up")

    # Down: the site broker stops; the central aggregator answers a partial and decides.
    site_agg.disconnect()
    site_agg.loop_stop()
    sites.site.broker.stop()
    _publish(agg, T.site_receipt(1, SITE), b"receipt while the site was down")
    _publish(agg, T.round_decision(1), b"decision while the site was down")
    sites.site.broker.restart()
    site_agg = _connect(sites.site, "aggregator", persistent=True, inbox=site_seen)
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
    agg = _connect(sites.central, "aggregator", persistent=True, inbox=central_seen)
    got = fed.until(central_seen, fed.on(T.site_partial(2, SITE)), BRIDGE_WAIT, "the partial")
    assert (T.site_partial(2, SITE), b"partial while central was down") in _seen(got)


def test_an_uplink_cut_and_healed_delivers_what_waited_on_both_sides(sites: Sites) -> None:
    agg = _connect(sites.central, "aggregator")
    central_seen = _bridge_up(agg)
    site_agg = _connect(sites.site, "aggregator")
    site_seen = fed.collect(site_agg, "fl/v1/#")
    device = _connect(sites.site, "pi-0")
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


def _held_model(log: Path) -> str:
    """The ``round: hash`` an agent logged holding when it stopped."""
    found = re.search(r"holding the global model of round (\S+): (\w+)", log.read_text())
    assert found, f"no final model line in {log}"
    return f"{found[1]}: {found[2]}"


def test_a_pinned_device_at_the_site_follows_the_central_aggregators_signed_run(
    sites: Sites, tmp_path: Path
) -> None:
    # A real signing aggregator and a device (pi-c) on the central broker; pi-0 at the site,
    # pinned to the central key (its bundle's model-signing.pub). No site aggregator exists
    # yet, so pi-0 is not selected: it must get the signed model, its deltas and the signed
    # `finished` through the bridge, and its presence must not reach the central aggregator.
    data = fed.write_client_data(tmp_path / "data", 2)
    central_url = f"mqtts://localhost:{sites.central.broker.port}"
    site_url = f"mqtts://localhost:{sites.site.broker.port}"
    agg_toml = sites.central.root / "identities" / "aggregator" / "aggregator.toml"
    procs = [
        fed.start_aggregator(
            central_url, tmp_path, "--config", str(agg_toml), rounds=2, min_clients=1
        )
    ]
    for name, tier, url, path in (
        ("pi-c", sites.central, central_url, data[0]),
        ("pi-0", sites.site, site_url, data[1]),
    ):
        toml = tier.root / "devices" / name / "agent.toml"
        procs.append(fed.start_agent(url, name, path, tmp_path, "--config", str(toml)))
    try:
        assert fed.wait_exit(procs[0], 180, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(procs[1:], ["pi-c", "pi-0"], tmp_path)
    finally:
        fed.stop(procs)

    assert codes == [0, 0]  # pi-0 too: the central's signed `finished` crossed the bridge
    assert [r["participants"] for r in fed.metrics(tmp_path)] == [["pi-c"], ["pi-c"]]
    site_log = (tmp_path / "pi-0.log").read_text()
    assert "global model of round 0" in site_log  # the signed full model, verified
    assert "refused" not in site_log and "rejected" not in site_log
    assert _held_model(tmp_path / "pi-0.log") == _held_model(tmp_path / "pi-c.log")
    assert _held_model(tmp_path / "pi-0.log").startswith("2: ")
    assert "pi-0" not in (tmp_path / "aggregator.log").read_text()
