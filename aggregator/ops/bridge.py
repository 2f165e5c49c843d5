"""Sites: the site broker's bridge to the central broker, and the ACL lines of both brokers.

Pure text rendering (no files, no processes): :mod:`aggregator.ops.provision` writes what
this returns. Every topic comes from :class:`shared.protocol.topics.Topics`, so the bridge's
topic lines and both ACLs are built from one list and cannot disagree (docs/sites.md).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.ops.broker_templates import ACL, BRIDGE_CONF_TEMPLATE
from shared.protocol.topics import Topics, validate_name

# Reconnect backoff of the bridge (Mosquitto's "decorrelated jitter"): first retry after
# about BASE seconds, growing to at most CAP; a site's uplink may be down for hours, and
# 60 s keeps the retries cheap for the central broker while bounding the catch-up delay.
DEFAULT_RESTART_TIMEOUT = (5, 60)
QOS = 1
LATEST_ONLY_QOS = 0  # the global model's retained frames: see topic_lines
# Hostnames as RFC 1123 allows them (letters, digits, '-', dots), which is also all that
# can appear in a Mosquitto config line without quoting.
_HOST_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

# The central aggregator's block of acl.conf: a site's broker replaces it (site_acl).
_CENTRAL_AGGREGATOR_RULES = "user aggregator\ntopic readwrite fl/v1/#\n"


@dataclass(frozen=True)
class Upstream:
    """Where a site's bridge connects: the central broker's TLS listener."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """Mosquitto's ``address`` value (an IPv6 address without brackets, port last)."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else self.address


SITES_DIR = "sites"  # central DIR/sites/NAME/: the bundle of site NAME's bridge
UPLINK_DIR = "uplink"  # site DIR/uplink/: its copy, read by the bridge
UPLINK_FILE = "uplink.json"  # in the bundle: site name, federation, central host:port
UPLINK_FILES = ("password", "client.crt", "client.key", "ca.crt", "model-signing.pub")


@dataclass(frozen=True)
class SiteUplink:
    """What makes ``broker init`` write a site broker: its name, the central broker's TLS
    listener, the bundle ``fedmq broker add-site NAME`` wrote for it there (copied to the
    site) and the bridge's reconnect backoff (base, cap seconds)."""

    name: str
    upstream: Upstream
    bundle: Path
    restart_timeout: tuple[int, int] = DEFAULT_RESTART_TIMEOUT


def uplink_info(site: SiteUplink, federation: str | None) -> dict[str, Any]:
    """The bundle's uplink.json, checked against the site's name, ``federation`` and the
    names the central broker's certificate gives it (the bridge verifies the upstream host)."""
    validate_name("site name", site.name)
    missing = [n for n in (UPLINK_FILE, *UPLINK_FILES) if not (site.bundle / n).is_file()]
    if missing:
        raise ValueError(
            f"{site.bundle} is not a site bundle (missing {', '.join(missing)}): run "
            f"`fedmq broker add-site {site.name} --dir CENTRAL_DIR` on the central broker "
            f"and copy CENTRAL_DIR/{SITES_DIR}/{site.name} here"
        )
    info: dict[str, Any] = json.loads((site.bundle / UPLINK_FILE).read_text())
    if info.get("site") != site.name:
        owner = info.get("site")
        raise ValueError(f"{site.bundle} is site {owner!r}'s bundle, not {site.name!r}'s")
    if federation is not None and federation != info["federation"]:
        raise ValueError(
            f"--federation {federation} contradicts the site's bundle ({info['federation']})"
        )
    names = [str(n) for n in info.get("server_names", [])]
    if names and not any(_same_host(n, site.upstream.host) for n in names):
        raise ValueError(
            f"bad --upstream {site.upstream}: the central broker's certificate names "
            f"{', '.join(names)}, not {site.upstream.host!r}, so the bridge's TLS check would "
            "fail; use one of those (the central `fedmq broker init --host` adds a name)"
        )
    return info


def _same_host(name: str, host: str) -> bool:
    """Whether certificate name ``name`` is ``host`` (DNS case-insensitively, IPs by value)."""
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    except ValueError:
        return name.lower() == host.lower()


def parse_upstream(text: str) -> Upstream:
    """``HOST:PORT`` (``[IPv6]:PORT``) of the central broker; ValueError naming what is wrong."""
    hint = "expected HOST:PORT of the central broker's TLS listener, e.g. central.lan:8883"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"bad --upstream {text!r}: {hint}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad --upstream {text!r}: {host!r} is not an IPv6 address") from None
    elif not _HOST_RE.fullmatch(host):
        raise ValueError(f"bad --upstream {text!r}: {host!r} is not a host name or address; {hint}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad --upstream {text!r}: port must be in 1..65535; {hint}")
    return Upstream(host, int(port_text))


def bridge_local_clientid(site: str) -> str:
    """The bridge's client id on the site broker: a ':' no provisioned login can hold."""
    return f"fedmq:bridge:{validate_name('site name', site)}"


def topic_lines(federation: str, site: str) -> list[str]:
    """The bridge's ``topic`` lines: the downlink ``in``, the uplink ``out``.

    QoS 1, except the global model's frames (full, delta, ONNX, and chunks): QoS 0, so the
    central broker queues none of them for a disconnected site. Each is retained and
    superseded by the next; the bridge subscribes again at every connect, which brings the
    latest retained copy, and fedmq clients at the site use clean sessions and subscribe
    again after every reconnect too. At QoS 1 every stale model of an outage crossed the
    uplink after it, then the latest once more (docs/sites.md, measured).
    """
    topics = Topics(federation)
    latest_only = set(topics.global_payloads)
    down = [
        f"topic {t} in {LATEST_ONLY_QOS if t in latest_only else QOS}"
        for t in topics.site_downlink(site)
    ]
    up = [f"topic {t} out {QOS}" for t in topics.site_uplink(site)]
    return down + up


def render_bridge_conf(
    root: Path,
    federation: str,
    site: str,
    upstream: Upstream,
    remote_password: str,
    restart_timeout: tuple[int, int] = DEFAULT_RESTART_TIMEOUT,
) -> str:
    """The bridge section of a site broker's ``mosquitto.conf`` (appended last)."""
    validate_name("site name", site)
    base, cap = restart_timeout
    if not 0 < base < cap:
        raise ValueError(f"bridge restart timeout needs 0 < base < cap, got {base} {cap}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", remote_password):
        # Mosquitto reads the rest of the line; a provisioned password is URL-safe base64.
        raise ValueError("the site's uplink password must be [A-Za-z0-9_-] (a provisioned one)")
    values = {
        "{site}": site,
        "{address}": upstream.address,
        "{dir}": str(root),
        "{remote_password}": remote_password,
        "{local_clientid}": bridge_local_clientid(site),
        "{notification_topic}": Topics(federation).site_bridge(site),
        "{restart_timeout}": f"{base} {cap}",
        "{topics}": "\n".join(topic_lines(federation, site)),
    }
    text = BRIDGE_CONF_TEMPLATE
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def central_site_acl(federation: str, site: str) -> str:
    """The central broker's ACL block for one site's login (``fedmq broker add-site``).

    It reads the downlink and writes the uplink and its bridge's state, all of its own
    site only. The deny lines come first and cancel, for this login, the device patterns of
    acl.conf (a site writes no update, no agent status and no inference traffic, not even
    under its own name); Mosquitto checks a user's own lines before the patterns.
    """
    topics = Topics(federation)
    lines = [
        f"# Site {site}: its bridge logs in as {site} (fedmq broker add-site); docs/sites.md.",
        f"user {validate_name('site name', site)}",
        "topic deny fl/v1/+/round/+/update/#",
        "topic deny fl/v1/+/agents/#",
        "topic deny fl/v1/+/infer/#",
        *[f"topic read {t}" for t in topics.site_downlink(site)],
        *[f"topic write {t}" for t in topics.site_uplink(site)],
        f"topic write {topics.site_bridge(site)}",
    ]
    return "\n".join(lines) + "\n"


def site_acl(federation: str, site: str) -> str:
    """A site broker's acl.conf: acl.conf with the aggregator's block made the site's.

    Devices keep every rule they have on a central broker. The site aggregator reads
    everything and writes only its devices' receipts, the updates it clears (retained ones,
    as the central aggregator does) and its site's own topics: what the central aggregator
    publishes (models, rounds, decisions, its status) reaches the site through the bridge
    alone, so nothing on the site can shadow it for the site's devices.
    """
    rules = "\n".join(
        [
            "user aggregator",
            "topic read fl/v1/#",
            "topic write fl/v1/+/round/+/receipt/+",
            "topic write fl/v1/+/round/+/update/+",
            "topic write fl/v1/+/round/+/update/+/chunk/+",
            *[f"topic write {t}" for t in Topics(federation).site_uplink(site)],
        ]
    )
    if _CENTRAL_AGGREGATOR_RULES not in ACL:
        raise AssertionError("acl.conf no longer holds the aggregator's block site_acl replaces")
    note = f"# At site {site} the aggregator is the site's (docs/sites.md).\n"
    return ACL.replace(_CENTRAL_AGGREGATOR_RULES, note + rules + "\n")
