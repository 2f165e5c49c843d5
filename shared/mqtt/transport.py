"""The one place that talks to paho-mqtt (2.x, VERSION2 callbacks, MQTT 5 or 3.1.1).

Callbacks run on paho's network thread and do nothing but hand messages over to a queue; the
agent's trainer and the aggregator's worker consume the queue on their own thread. paho's
errors are translated here, once, into :class:`TransportError`.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt.base import Inbound, Outbound, TransportError
from shared.mqtt.chunk_receiver import ChunkReceiver
from shared.mqtt.chunking import ChunkPlanner, chunk_capacity
from shared.mqtt.connect_errors import describe_connect_error, describe_refusal
from shared.mqtt.inbox import FairInbox
from shared.mqtt.options import BrokerAddress, ConnectOptions, refuse_plaintext
from shared.mqtt.outbound import QueueFullDrops
from shared.mqtt.reconnect import JitteredClient
from shared.mqtt.subscriptions import Ack, PendingAcks, Send, with_chunk_subs
from shared.mqtt.versions import V5, ConnectAttempt, Outcome, VersionNegotiation, connack_outcome
from shared.protocol.topics import quota_key

log = logging.getLogger(__name__)


class MqttTransport:
    """A reconnecting MQTT client (5 or 3.1.1) whose inbound messages land in ``self.inbox``.

    On every (re)connect it subscribes to ``subscriptions`` and publishes ``births()``
    (Sparkplug-style: presence is re-announced after each reconnect).
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        subscriptions: Iterable[tuple[str, int]] = (),
        will: Outbound | None = None,
        births: Callable[[], list[Outbound]] | None = None,
        options: ConnectOptions | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.options = options or ConnectOptions()
        # Before anything is built: a password must not leave in clear text by mistake.
        refuse_plaintext(self.address, self.options)
        # Bounded per sender, never blocks the network thread (shared/mqtt/inbox.py).
        self._fair_inbox = FairInbox(client_id, self.options.inbox)
        self.inbox: queue.Queue[Inbound] = self._fair_inbox
        self._subs = list(subscriptions)
        self._births = births
        self.connected = threading.Event()
        self._refused: str | None = None
        self._closing = False
        # Incremented on every successful (re)connect: workers compare it to notice a
        # reconnect and re-send what the broker may have lost (outbox, retained state).
        self.connect_count = 0
        self.broker_max_packet: int | None = None
        opts = self.options
        self.chunks = ChunkReceiver(
            opts.reassembly,
            sender_of=quota_key,
            never_retained=self._never_retained,
            clear=self._clear_retained,
        )
        # Subscriptions whose retained flag we must see on live messages too (MQTT v5
        # retain-as-published), so a retained update is cleared as soon as it is published.
        unretained = with_chunk_subs((f, 0) for f in opts.unretained)
        self._retain_as_published = frozenset(t for t, _ in unretained)
        # What carries each payload, and the retained chunks to clear (shared/mqtt/chunking.py).
        self._chunks_out = ChunkPlanner()
        self._acks = PendingAcks()
        # paho's outbound queue is bounded: what a full one refuses (shared/mqtt/outbound.py).
        self._drops = QueueFullDrops(client_id, self.options.max_queued_messages)
        self._will = will
        self.negotiation = VersionNegotiation(self.options.mqtt_version)
        self._attempt = ConnectAttempt()
        self._client = self._make_client(will)

    def _make_client(self, will: Outbound | None) -> mqtt.Client:
        v5 = self.negotiation.version == V5
        client = JitteredClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1's clean session = MQTT 5's clean start with session expiry 0 (paho's v5
            # default): no broker-side session either way; receipts + outbox carry reliability.
            clean_session=None if v5 else True,
        )
        opts = self.options
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        if self.address.tls:
            client.tls_set(
                ca_certs=opts.ca_file,
                certfile=opts.cert_file,
                keyfile=opts.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.reconnect_delay_set(
            min_delay=max(1, int(opts.reconnect_min_s)), max_delay=int(opts.reconnect_max_s)
        )
        # Counted in messages, whatever their size; a refused publish: _publish_one.
        client.max_queued_messages_set(opts.max_queued_messages)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = client.on_unsubscribe = self._on_ack
        return client

    # --- paho callbacks: network thread, hand over only -------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        outcome = connack_outcome(reason_code.value)
        self._attempt.settle(outcome)
        if reason_code.is_failure:
            self._refused = describe_refusal(reason_code, self.negotiation.version)
            if outcome is Outcome.VERSION_REFUSED and not self.negotiation.settled:
                return  # auto: start() tries the other version and says so
            # paho retries with backoff (reconnect_delay_set): one line per attempt, no trace.
            log.error("broker %s refused %s: %s", self.address, self.client_id, self._refused)
            return
        self._refused = None
        # MQTT 5 only: 3.1.1 has no CONNACK properties, so chunk_capacity() falls back to
        # options.max_chunk_bytes alone.
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.broker_max_packet = int(max_packet) if max_packet else None
        if self._subs:
            subs = with_chunk_subs(self._subs)
            # Not awaited (this is the network thread): a refusal is still logged.
            send = _subscribe_call(client, subs, self._retain_as_published)
            self._acks.send([t for t, _ in subs], send, awaited=False)
        for msg in self._births() if self._births else []:
            info = client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # re-published at the next reconnect
                self._drops.dropped(msg.topic)
        self.connect_count += 1
        self.connected.set()
        speaks = self.negotiation.describe(self.chunk_capacity())
        log.info("%s connected to %s with %s", self.client_id, self.address, speaks)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._acks.connection_lost()
        self._attempt.settle(Outcome.CLOSED)
        # A connection that never got its CONNACK was not "lost": start() reports it.
        if was_connected and not self._closing:
            log.warning("%s lost the broker (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        handed = self.chunks.receive(msg.topic, bytes(msg.payload), bool(msg.retain))
        if handed is not None:
            self.inbox.put(Inbound(handed[0], handed[1], bool(msg.retain)))

    def _never_retained(self, topic: str) -> bool:
        return any(mqtt.topic_matches_sub(f, topic) for f in self.options.unretained)

    def _clear_retained(self, topic: str) -> None:
        # On paho's network thread: queued, not awaited (a lost clearance is redone when
        # the retained message comes back at the next subscription).
        if self._client.publish(topic, b"", qos=1, retain=True).rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._drops.dropped(topic)

    def _on_ack(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        """SUBACK and UNSUBACK alike: wake the waiter, or report a refusal nobody waits for."""
        failures = [str(rc) if rc.is_failure else None for rc in reason_codes]
        ack = self._acks.acknowledged(mid, failures)
        if ack is not None and ack.refused:  # the subscriptions made on (re)connect
            self._log_refused(ack)

    def _log_refused(self, ack: Ack) -> None:
        # An ACL denial, typically: the device will never receive these topics.
        log.error("broker refused %s: %s", self.client_id, "; ".join(ack.refused))

    def chunk_capacity(self) -> int:
        """Largest payload sent as one message; larger ones are chunked."""
        return chunk_capacity(self.options.max_chunk_bytes, self.broker_max_packet)

    @property
    def dropped_full_queue(self) -> int:
        """Publishes (``wait=False``) dropped because the outbound queue was full."""
        return self._drops.count

    # --- API for the worker thread -----------------------------------------------------
    def start(self, timeout: float = 30.0) -> MqttTransport:
        """Connect (retrying with backoff) and start the network thread; wait for CONNACK.

        Every failed attempt (refused, TLS, bad credentials) is one log line; after
        ``timeout`` a TransportError names the last reason.
        """
        deadline = time.monotonic() + timeout
        while self._first_connack(deadline):  # auto: no answer in this version, a new client
            self._client.disconnect()
            self._client.loop_stop()
            self._client = self._make_client(self._will)
        self.chunks.start(self.client_id)
        if not self.wait_connected(max(0.0, deadline - time.monotonic())):
            self._client.loop_stop()
            self.chunks.stop()
            raise TransportError(
                f"could not connect to {self.address} as {self.client_id!r} "
                f"within {timeout:.0f}s ({self.negotiation.failure(self._refused)})"
            )
        return self

    def _first_connack(self, deadline: float) -> bool:
        """Send CONNECT; True when (auto) the broker did not answer and the other version is next.

        A settled version waits no further here: paho retries refusals, start() waits.
        """
        self._attempt = ConnectAttempt()
        self._open_connection(deadline)
        self._client.loop_start()
        if self.negotiation.settled:
            return False
        probe = min(self.options.version_probe_s, deadline - time.monotonic())
        if not self.negotiation.record(self._attempt.wait(probe)):
            return False
        why, version = self.negotiation.fallback_reason, self.negotiation.version
        log.warning("%s: broker %s %s; trying MQTT %s", self.client_id, self.address, why, version)
        return time.monotonic() < deadline

    def _open_connection(self, deadline: float) -> None:
        """Open the socket (and TLS session) and send CONNECT, retrying with backoff."""
        delay = max(0.1, self.options.reconnect_min_s)
        while True:
            try:
                self._client.connect(
                    self.address.host, self.address.port, keepalive=self.options.keepalive
                )
                return
            except OSError as exc:  # ssl.SSLError and socket errors are OSErrors
                why = describe_connect_error(exc, str(self.address))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"{self.client_id!r} could not connect: {why}")
            log.warning("%s; retrying in %.1fs", why, min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, max(delay, self.options.reconnect_max_s))

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout``; True when connected."""
        return self.connected.wait(timeout)

    def is_connected(self) -> bool:
        """True while connected (between CONNACK and the connection's loss)."""
        return self.connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and after every reconnect.

        Connected, return once the broker has confirmed it (SUBACK; at most
        ``options.ack_timeout_s``): the topic's retained messages are then on their way.
        Disconnected, only update the list subscribed to on reconnect.
        """
        self._subs.append((topic, qos))
        subs = with_chunk_subs([(topic, qos)])
        send = _subscribe_call(self._client, subs, self._retain_as_published)
        self._confirmed("subscribed to", topic, subs, send)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (and its chunk subscription) now and for later reconnects.

        Connected, return once the broker has confirmed it (UNSUBACK; at most
        ``options.ack_timeout_s``): nothing published after that reaches us on ``topic``.
        Disconnected, only update the list subscribed to on reconnect.
        """
        self._subs = [(t, q) for t, q in self._subs if t != topic]
        subs = with_chunk_subs([(topic, 0)])
        names = [t for t, _ in subs]
        self._confirmed("unsubscribed from", topic, subs, lambda: self._client.unsubscribe(names))

    def _confirmed(self, done: str, topic: str, subs: list[tuple[str, int]], send: Send) -> None:
        """Send a subscription change and wait for the broker's acknowledgement."""
        if not self.connected.is_set():
            return  # the reconnect subscribes from the list
        mid = self._acks.send([t for t, _ in subs], send)
        ack = self._acks.wait(mid, self.options.ack_timeout_s) if mid is not None else None
        if ack is None:
            # Lost the connection meanwhile (the reconnect applies the list), or no answer.
            if self.connected.is_set():
                why = f"no answer within {self.options.ack_timeout_s:g}s"
                log.warning("%s %s %s? %s", self.client_id, done, topic, why)
            return
        if ack.refused:
            self._log_refused(ack)
        else:
            log.info("%s %s %s", self.client_id, done, topic)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 60.0,
        wait: bool = True,
    ) -> None:
        """Publish and, for QoS ≥ 1 and ``wait``, wait for the broker's acknowledgement.

        With ``wait=False`` the message is queued in paho (sent on reconnect if need be), or
        dropped and counted when paho's queue is full (``options.max_queued_messages``); with
        ``wait`` a full queue raises TransportError (shared/mqtt/outbound.py).
        A payload over :meth:`chunk_capacity` is sent as chunk messages (shared/mqtt/chunking.py).
        """
        self._drops.flush()
        parts = self._chunks_out.plan(topic, payload, retain, self.chunk_capacity())
        for i, (part_topic, part) in enumerate(parts):
            if not self._publish_one(
                part_topic, part, qos=qos, retain=retain, timeout=timeout, wait=wait
            ):
                # The rest of a chunked payload would only fill the queue with a transfer
                # its receiver cannot complete: dropped with it.
                self._drops.dropped(topic, len(parts) - i)
                return

    def _publish_one(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout: float, wait: bool
    ) -> bool:
        """Publish one message; False when (``wait=False``) the full queue refused it."""
        if not wait:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                return False
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            return True
        deadline = time.monotonic() + timeout
        if not self.wait_connected(timeout):
            raise TransportError(f"not connected to {self.address}; cannot publish to {topic}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise self._drops.refusal(topic)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return True
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish to {topic} failed: {exc}") from exc
        # A publish queued while disconnected (NO_CONN) is sent by paho on reconnect.
        while not info.is_published():
            if time.monotonic() > deadline:
                raise TransportError(f"broker did not acknowledge {topic} within {timeout:.0f}s")
            time.sleep(0.01)
        return True

    def stop(self, final: Iterable[Outbound] = ()) -> None:
        """Publish ``final`` messages (e.g. an offline status), then disconnect cleanly."""
        self._closing = True
        for msg in final:
            try:
                self.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, timeout=5)
            except TransportError as exc:
                log.warning("could not publish final message to %s: %s", msg.topic, exc)
        self._client.disconnect()
        self._client.loop_stop()
        self.chunks.stop()
        self._fair_inbox.close()
        self._drops.close()


def _subscribe_call(
    client: mqtt.Client, subs: list[tuple[str, int]], retain_as_published: frozenset[str]
) -> Send:
    """paho's subscribe for ``subs``, as one SUBSCRIBE packet (one SUBACK).

    paho takes SubscribeOptions only under MQTT 5, plain QoS only under 3.1.1 (whose SUBACK
    refuses with 0x80 and no reason: paho's "Unspecified error"; and which has no
    retain-as-published: a retained message arrives flagged retained either way).
    """
    if client.protocol != mqtt.MQTTv5:
        return lambda: client.subscribe(list(subs))
    opts = [
        (t, mqtt.SubscribeOptions(q, retainAsPublished=t in retain_as_published)) for t, q in subs
    ]
    return lambda: client.subscribe(opts)
