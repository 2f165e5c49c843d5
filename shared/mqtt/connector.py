"""Connectors: how a process's settings become the paho transport the services receive.

The service, the agent and the inference server take a :data:`~shared.mqtt.base.Connector`;
their command lines build it here, from the broker URL, credentials and TLS files.
"""

from __future__ import annotations

from shared.mqtt.base import Connector, Session
from shared.mqtt.options import BrokerAddress, BrokerSettings, ConnectOptions, refuse_plaintext
from shared.mqtt.reassembly import ReassemblyLimits
from shared.mqtt.transport import MqttTransport


def connector_for(
    settings: BrokerSettings,
    *,
    reassembly: ReassemblyLimits | None = None,
    unretained: tuple[str, ...] = (),
) -> Connector:
    """The paho connector for a process's settings: broker URL, credentials, TLS files,
    MQTT version and chunk size.

    ``reassembly`` bounds the chunked payloads it receives (default: ReassemblyLimits());
    ``unretained`` names subscriptions whose retained messages it clears (ConnectOptions).
    """
    options = ConnectOptions(
        username=settings.username,
        password=settings.password,
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
        mqtt_version=settings.mqtt_version,
        max_chunk_bytes=settings.max_chunk_bytes,
        reassembly=reassembly or ReassemblyLimits(),
        unretained=unretained,
        allow_plaintext=settings.allow_plaintext,
    )
    return mqtt_connector(settings.broker, options)


def mqtt_connector(url: str, options: ConnectOptions | None = None) -> Connector:
    """A :data:`~shared.mqtt.base.Connector` opening :class:`MqttTransport` sessions at ``url``.

    The broker URL (and that it does not send a password in clear text by mistake) is
    checked now, so a bad one fails at start-up, not at the first connect.
    """
    refuse_plaintext(BrokerAddress.parse(url), options or ConnectOptions())

    def connect(session: Session) -> MqttTransport:
        return MqttTransport(
            url,
            session.client_id,
            subscriptions=session.subscriptions,
            will=session.will,
            births=session.births,
            options=options,
        )

    return connect
