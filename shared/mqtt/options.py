"""How to reach a broker: its address, the connection options, the settings that name them.

No paho here: configs, tests and the transport share these value objects.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

from shared.mqtt.base import TransportError
from shared.mqtt.chunking import DEFAULT_MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from shared.mqtt.inbox import InboxLimits
from shared.mqtt.reassembly import ReassemblyLimits
from shared.mqtt.versions import AUTO, MQTT_VERSIONS, check_mqtt_version

# QoS ≥ 1 publishes a client keeps until the broker acknowledges them (see
# ConnectOptions.max_queued_messages and shared/mqtt/outbound.py).
DEFAULT_MAX_QUEUED_MESSAGES = 10_000


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, parsed from ``mqtt://host:port`` or ``mqtts://host:port``."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; a bare ``host[:port]`` means plain MQTT."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"unsupported broker scheme {parsed.scheme!r} in {url!r}")
        tls = parsed.scheme in ("mqtts", "ssl")
        if not parsed.hostname:
            raise TransportError(f"no host in broker URL {url!r}")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class ConnectOptions:
    """How to authenticate and secure the connection."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)
    # Payloads larger than this (or than the broker's advertised maximum packet size, less
    # room for headers) travel as chunks on <topic>/chunk/<i>: see shared/mqtt/chunking.py.
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    # Bounds on chunked payloads being reassembled, per sender and in all (see
    # shared/mqtt/reassembly.py): beyond them a transfer is refused or dropped, and the
    # sender's outbox re-sends. An aggregator uses ReassemblyLimits.one_update_per_sender.
    reassembly: ReassemblyLimits = field(default_factory=ReassemblyLimits)
    # Subscription filters whose messages must never be retained (a device's update): a
    # retained one is dropped and cleared from the broker (shared/mqtt/chunk_receiver.py).
    unretained: tuple[str, ...] = ()
    # How long subscribe/unsubscribe wait for the broker's SUBACK/UNSUBACK (loopback and
    # LAN answer in milliseconds; a longer silence means the connection is dying).
    ack_timeout_s: float = 10.0
    # "5", "3.1.1" or "auto" (5, and 3.1.1 when the broker does not answer 5): see
    # shared/mqtt/versions.py. A 3.1.1 broker advertises no packet limit, so max_chunk_bytes
    # alone bounds what one message carries there.
    mqtt_version: str = AUTO
    # auto: how long an MQTT 5 CONNECT may go unanswered before 3.1.1 is tried (a broker
    # answers in milliseconds on a LAN; amqtt never answers some MQTT 5 CONNECTs).
    version_probe_s: float = 3.0
    # Bounds on inbound messages waiting for the worker, per sender and in all.
    inbox: InboxLimits = field(default_factory=InboxLimits)
    # Connect in clear text although TLS files are configured, or a password is set for a
    # broker off this machine (see plaintext_refusal). Never the default.
    allow_plaintext: bool = False
    # QoS ≥ 1 publishes kept until the broker acknowledges them (paho's outbound queue, all of
    # them while disconnected). At the bound a publish is refused: dropped and counted without
    # ``wait``, TransportError with it (shared/mqtt/outbound.py says why dropping is safe).
    # Never reached in normal operation: an aggregator answering 1,000+ devices queues one
    # receipt per update, and a broker acknowledges them in milliseconds (20 in flight).
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES

    def __post_init__(self) -> None:
        if self.max_queued_messages < 1:
            raise ValueError(f"max_queued_messages must be ≥ 1 (got {self.max_queued_messages})")


def plaintext_refusal(address: BrokerAddress, options: ConnectOptions) -> str | None:
    """Why a plain MQTT connection to ``address`` would leak what ``options`` protect (or None).

    TLS files (``ca_file``, ``cert_file``, ``key_file``) say the broker is meant to be reached
    over TLS: an ``mqtt://`` URL beside them is a mistake (a stray environment variable, an
    edited URL) that would send the password in clear text. A password for a broker off this
    machine over plain MQTT leaks the same way. ``allow_plaintext`` is the explicit way out.
    """
    if address.tls or options.allow_plaintext:
        return None
    files = [n for n in ("ca_file", "cert_file", "key_file") if getattr(options, n)]
    if files:
        why = f"{', '.join(files)} configured for TLS"
    elif options.password is not None and not is_loopback(address.host):
        why = "a password set for a broker on another machine"
    else:
        return None
    return (
        f"refusing to connect to {address} in clear text with {why}: the password and "
        "every message would cross the network unencrypted; use mqtts://, or set "
        "allow_plaintext (--allow-plaintext) to connect anyway"
    )


def add_plaintext_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-plaintext``: the explicit way to send credentials over plain MQTT."""
    parser.add_argument(
        "--allow-plaintext",
        dest="allow_plaintext",
        action="store_const",
        const=True,
        help="connect over plain mqtt:// even with TLS files, or a password for a remote "
        "broker, configured (refused by default: the password would travel in clear text)",
    )


def refuse_plaintext(address: BrokerAddress, options: ConnectOptions) -> None:
    """Raise TransportError when :func:`plaintext_refusal` has a reason."""
    why = plaintext_refusal(address, options)
    if why is not None:
        raise TransportError(why)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (traffic that never leaves the machine)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BrokerSettings(Protocol):
    """The connection settings every fedmq process has (agent, aggregator, inference)."""

    @property
    def broker(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def cert_file(self) -> str | None: ...
    @property
    def key_file(self) -> str | None: ...
    @property
    def mqtt_version(self) -> str: ...
    @property
    def max_chunk_bytes(self) -> int: ...
    @property
    def allow_plaintext(self) -> bool: ...


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mqtt-version`` and ``--max-chunk-bytes`` (unset: the file or environment decides)."""
    parser.add_argument(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        help="MQTT protocol version: 5, 3.1.1, or auto (5, falling back to 3.1.1 when the "
        "broker does not answer 5; default auto)",
    )
    parser.add_argument(
        "--max-chunk-bytes",
        type=int,
        help=f"payloads over this many bytes travel as chunks (default {DEFAULT_MAX_CHUNK_BYTES}; "
        "MQTT 5 brokers may lower it with their Maximum Packet Size, 3.1.1 brokers cannot)",
    )


def check_protocol_settings(mqtt_version: str, max_chunk_bytes: int) -> None:
    """A config's range check of its ``mqtt_version`` and ``max_chunk_bytes`` (ValueError)."""
    check_mqtt_version(mqtt_version)
    if max_chunk_bytes < MIN_CHUNK_BYTES:
        raise ValueError(f"max-chunk-bytes must be ≥ {MIN_CHUNK_BYTES} (got {max_chunk_bytes})")
