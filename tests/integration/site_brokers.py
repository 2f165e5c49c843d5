"""Two real Mosquittos for the sites tests: a central one and a site one bridged to it, both
configured by `fedmq broker init` (the site's with --site/--upstream/--uplink) and `fedmq broker
add-site`, the bridge through a TCP proxy the tests can cut (the site's WAN)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
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


def bridged_sites(
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


def connect(
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
