"""Secure-by-default broker: real Mosquitto with the config rendered by `fedmq broker init`.

TLS on a free loopback port, per-identity passwords, the ACL from broker_config/acl.conf,
and a signed federation whose agents pin the model-signing key.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.ops import provision
from aggregator.ops.local_broker import LocalBroker, free_port
from shared.mqtt.base import TransportError
from shared.mqtt.options import ConnectOptions
from shared.mqtt.transport import MqttTransport
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame, tensors_hash
from shared.protocol.global_delta import apply_delta
from shared.protocol.topics import Topics
from tests.conftest import require_mosquitto
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
DEVICES = ("pi-0", "pi-1", "pi-2")
# Logins with the aggregator's topic rights (stolen broker credentials that can write
# global/#) but their own client ids: the broker uses the username as client id, so an
# attacker logged in as "aggregator" would only take over the aggregator's connection.
INTRUDERS = ("intruder", "replayer")


@dataclass
class SecureBroker:
    """A provisioned directory and the TLS broker running from its mosquitto.conf."""

    root: Path
    broker: LocalBroker

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"

    def password(self, user: str) -> str:
        sub = "identities" if user in provision.RESERVED else "devices"
        return (self.root / sub / user / "password").read_text().strip()


def add_identity(root: Path, name: str, *acl_rules: str) -> None:
    """Provision ``name`` as a device login and grant it ``acl_rules`` (``topic read …``) too.

    For test clients that need rights of their own (an intruder with stolen write rights, a
    watcher reading updates): the broker uses the username as client id, so a client logged in
    as an identity a process already uses (the aggregator's, say) takes over that process's
    session. Call it before the broker starts (Mosquitto reads the ACL at start).
    """
    provision.device_add(root, name)
    with (root / "acl.conf").open("a") as acl:
        acl.write(f"\nuser {name}\n" + "".join(f"{rule}\n" for rule in acl_rules))


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    require_mosquitto()
    root = tmp_path / "pki"
    port = free_port()
    provision.broker_init(root, port=port, bind="127.0.0.1", federation=fed.FEDERATION)
    for name in DEVICES:
        provision.device_add(root, name)
    for name in INTRUDERS:
        add_identity(root, name, "topic readwrite fl/v1/#")
    broker = LocalBroker(tmp_path / "run", port=port, template=root / "mosquitto.conf")
    broker.start()
    try:
        yield SecureBroker(root, broker)
    finally:
        broker.stop()


def _connect(
    sb: SecureBroker, user: str | None, password: str | None = None, client_id: str = ""
) -> tuple[mqtt.Client, Any]:
    """A TLS client; returns it (loop running) and its CONNACK reason code."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(sb.root / "ca.crt"))
    if user is not None:
        client.username_pw_set(user, password if password is not None else sb.password(user))
    done = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        result.append(rc)
        done.set()

    client.on_connect = on_connect
    client.connect("localhost", sb.broker.port)
    client.loop_start()
    assert done.wait(fed.BROKER_WAIT), "no CONNACK"
    return client, result[0]


def _client(sb: SecureBroker, user: str, client_id: str = "") -> mqtt.Client:
    client, rc = _connect(sb, user, client_id=client_id)
    assert not rc.is_failure, rc
    return client


def _seen(messages: list[mqtt.MQTTMessage]) -> list[tuple[str, bytes]]:
    return [(m.topic, bytes(m.payload)) for m in messages]


def _publish(client: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def test_anonymous_and_wrong_password_clients_are_refused(secure: SecureBroker) -> None:
    anon, anon_rc = _connect(secure, None)
    wrong, wrong_rc = _connect(secure, "pi-0", "not-the-password")
    good, good_rc = _connect(secure, "pi-0")
    for c in (anon, wrong, good):
        c.loop_stop()
        c.disconnect()

    assert anon_rc.is_failure and wrong_rc.is_failure
    assert not good_rc.is_failure


def test_transport_reports_bad_password_in_one_clear_line(secure: SecureBroker) -> None:
    transport = MqttTransport(
        secure.url,
        "pi-0",
        options=ConnectOptions(
            username="pi-0", password="wrong", ca_file=str(secure.root / "ca.crt")
        ),
    )
    with pytest.raises(TransportError, match="check --username/--password") as err:
        transport.start(timeout=3)
    assert "\n" not in str(err.value)


def test_transport_reports_an_unknown_ca_in_one_clear_line(
    secure: SecureBroker, tmp_path: Path
) -> None:
    other = provision.broker_init(tmp_path / "other", port=1)  # a different CA
    assert other.of((tmp_path / "other" / "ca.crt").resolve()) == "created"
    transport = MqttTransport(
        secure.url,
        "pi-0",
        options=ConnectOptions(
            username="pi-0",
            password=secure.password("pi-0"),
            ca_file=str(tmp_path / "other" / "ca.crt"),
            reconnect_min_s=0.2,
        ),
    )
    with pytest.raises(TransportError, match="not trusted") as err:
        transport.start(timeout=1.5)
    assert "\n" not in str(err.value)


def test_transport_reports_a_refused_connection(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    transport = MqttTransport(url, "pi-0", options=ConnectOptions(reconnect_min_s=0.2))

    with pytest.raises(TransportError, match="refused: is the broker running"):
        transport.start(timeout=1.0)


def test_device_cannot_forge_updates_models_or_rounds(secure: SecureBroker) -> None:
    aggregator = _client(secure, "aggregator", "agg-watch")
    seen = fed.collect(aggregator, "fl/v1/#")
    device_a = _client(secure, "pi-0")

    _publish(device_a, T.update(1, "pi-0"), b"own update")
    _publish(device_a, T.update(1, "pi-1"), b"forged update for pi-1")
    _publish(device_a, T.global_model, b"forged model", retain=True)
    _publish(device_a, T.global_delta, b"forged delta", retain=True)
    _publish(device_a, T.global_meta, b"forged meta", retain=True)
    _publish(device_a, T.round_start(7), b"forged round", retain=True)
    _publish(device_a, T.agent_status("pi-1"), b"forged status", retain=True)
    _publish(device_a, T.update(2, "pi-0"), b"marker")  # allowed, and routed after the rest

    got = fed.until(seen, fed.on(T.update(2, "pi-0")), fed.BROKER_WAIT, "pi-0's marker")
    assert _seen(got) == [(T.update(1, "pi-0"), b"own update"), (T.update(2, "pi-0"), b"marker")]


def test_device_cannot_read_other_devices_updates(secure: SecureBroker) -> None:
    aggregator = _client(secure, "aggregator", "agg-watch")
    agg_seen = fed.collect(aggregator, T.update_any)
    device_a = _client(secure, "pi-0")
    a_seen = fed.collect(device_a, T.update_any, "fl/v1/#", T.global_meta)
    device_b = _client(secure, "pi-1")

    _publish(device_b, T.update(1, "pi-1"), b"private delta of pi-1")
    _publish(aggregator, T.global_meta, b"marker")  # pi-0 may read it; routed after the update

    got = fed.until(agg_seen, fed.on(T.update(1, "pi-1")), fed.BROKER_WAIT, "pi-1's update")
    assert _seen(got) == [(T.update(1, "pi-1"), b"private delta of pi-1")]
    got = fed.until(a_seen, fed.on(T.global_meta), fed.BROKER_WAIT, "the marker")
    assert _seen(got) == [(T.global_meta, b"marker")]


def test_monitor_reads_but_cannot_publish_and_never_sees_updates(secure: SecureBroker) -> None:
    monitor = _client(secure, "monitor", "mon")
    mon_seen = fed.collect(monitor, "fl/#")
    aggregator = _client(secure, "aggregator", "agg")
    agg_seen = fed.collect(aggregator, "fl/v1/#")
    device = _client(secure, "pi-2")

    _publish(device, T.agent_status("pi-2"), b"online")
    _publish(device, T.update(1, "pi-2"), b"delta")
    _publish(monitor, T.global_model, b"monitor model")
    _publish(monitor, T.update(1, "monitor"), b"monitor update")
    _publish(monitor, T.agent_status("monitor"), b"monitor status")
    _publish(aggregator, T.global_meta, b"marker")  # routed after everything above

    marker = (T.global_meta, b"marker")
    got = fed.until(mon_seen, fed.on(T.global_meta), fed.BROKER_WAIT, "the marker")
    assert _seen(got) == [(T.agent_status("pi-2"), b"online"), marker]
    got = fed.until(agg_seen, fed.on(T.global_meta), fed.BROKER_WAIT, "the marker")
    assert sorted(_seen(got)) == [
        (T.agent_status("pi-2"), b"online"),
        marker,
        (T.update(1, "pi-2"), b"delta"),
    ]


def _first(inbox: fed.Inbox, topic: str, timeout: float) -> bytes:
    return bytes(fed.next_on(inbox, topic, timeout).payload)


def _forged_models(genuine: bytes) -> tuple[bytes, bytes]:
    """An unsigned 'newer' model and a tampered copy of a genuine signed one."""
    frame = decode_frame(genuine)
    weights = {n: v + 1.0 for n, v in frame.tensors.items()}
    unsigned = FrameHeader(
        kind="model",
        federation=fed.FEDERATION,
        round=50,
        codec="fp32",
        meta={"model_hash": tensors_hash(weights)},
    )
    # Tampered: new weights and their hash, but the genuine signature of round 50's claim.
    tampered = FrameHeader(
        **{
            **frame.header.__dict__,
            "round": 60,
            "meta": {**frame.header.meta, "model_hash": tensors_hash(weights)},
        }
    )
    return encode_frame(unsigned, weights).payload, encode_frame(tampered, weights).payload


def _start_signed_federation(
    secure: SecureBroker, tmp_path: Path, *extra: str
) -> tuple[Any, list[Any]]:
    clients = fed.write_client_data(tmp_path / "data", 3)
    agg_toml = secure.root / "identities" / "aggregator" / "aggregator.toml"
    agg = fed.start_aggregator(secure.url, tmp_path, "--config", str(agg_toml), *extra, rounds=3)
    agents = [
        fed.start_agent(
            secure.url,
            name,
            clients[i],
            tmp_path,
            "--config",
            str(secure.root / "devices" / name / "agent.toml"),
        )
        for i, name in enumerate(DEVICES)
    ]
    return agg, agents


def test_signed_federation_rejects_forged_and_rolled_back_models_and_replays(
    secure: SecureBroker, tmp_path: Path
) -> None:
    # The attacker holds a broker login with write access to global/# (INTRUDERS: stolen
    # credentials, a compromised broker) but not the model-signing key.
    attacker = _client(secure, "intruder")
    inbox = fed.collect(attacker, T.global_model, T.global_meta, T.round_start_any, T.update_any)
    replayer = _client(secure, "replayer")
    receipts = fed.collect(replayer, T.receipt_any_round("pi-0"))
    # Full models only (no global deltas): agents follow global/model every round, so the
    # forged full models reach them. The delta path is attacked in the next test.
    agg, agents = _start_signed_federation(secure, tmp_path, "--download-codec", "none")
    try:
        genuine0 = _first(inbox, T.global_model, 60)
        meta0 = json.loads(_first(inbox, T.global_meta, 10))
        _first(inbox, T.round_start(1), 90)
        unsigned, tampered = _forged_models(genuine0)
        _publish(attacker, T.global_model, unsigned, retain=True)
        _publish(attacker, T.global_model, tampered, retain=True)
        update1 = _first(inbox, T.update(1, "pi-0"), 60)
        _first(inbox, T.round_start(2), 60)
        _publish(attacker, T.global_model, genuine0, retain=True)  # rollback to round 0
        genuine_receipt = json.loads(_first(receipts, T.receipt(1, "pi-0"), 30))
        _publish(replayer, T.update(1, "pi-0"), update1)  # replay of round 1's update
        replay_receipt = json.loads(_first(receipts, T.receipt(1, "pi-0"), 30))
        assert fed.wait_exit(agg, 120, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(agents, list(DEVICES), tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert meta0["signature"] and meta0["round"] == 0
    assert codes == [0, 0, 0]
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == list(DEVICES) for r in rounds)
    assert genuine_receipt["status"] == "accepted"
    assert replay_receipt["status"] == "rejected"
    assert replay_receipt["reason"] in ("late: round 1 is closed", "no round is open")
    for name in DEVICES:
        log = (tmp_path / f"{name}.log").read_text()
        assert "model is not signed" in log, name
        assert "bad signature" in log, name
        assert "older model refused (round 0 < " in log, name


def _forged_deltas(genuine0: bytes) -> tuple[bytes, bytes]:
    """An unsigned 'round 50' delta on the round-0 model, and one carrying round 0's signature."""
    model0 = decode_frame(genuine0)
    step = {n: np.full(v.shape, 0.01, np.float32) for n, v in model0.tensors.items()}
    forged_hash = tensors_hash(apply_delta(model0.tensors, step))

    def delta(round_id: int, signature: str) -> bytes:
        head = FrameHeader(
            kind="global_delta",
            federation=fed.FEDERATION,
            round=round_id,
            codec="fp32",
            base_hash=model0.header.meta["model_hash"],
            meta={
                "model_hash": forged_hash,
                "base_round": 0,
                "run": model0.header.meta.get("run", 0),
                "signature_v2": signature,
            },
        )
        return encode_frame(head, step).payload

    return delta(50, ""), delta(60, model0.header.meta["signature_v2"])


def test_signed_federation_with_global_deltas_rejects_forged_and_replayed_deltas(
    secure: SecureBroker, tmp_path: Path
) -> None:
    # The attacker again holds a login that can write global/#, not the signing key. Agents
    # always follow global/delta; the forged deltas are published while the aggregator is
    # paused in round 1, so they reach every agent before round 1's genuine delta, and each
    # agent checks them against the model it holds (round 0).
    attacker = _client(secure, "intruder")
    inbox = fed.collect(attacker, T.global_model, T.global_delta, T.round_start_any)
    agg, agents = _start_signed_federation(secure, tmp_path)  # default: int8 deltas
    try:
        genuine0 = _first(inbox, T.global_model, 60)
        _first(inbox, T.round_start(1), 90)
        fed.pause([agg])
        for forged in _forged_deltas(genuine0):
            _publish(attacker, T.global_delta, forged)
        fed.resume([agg])
        delta1 = _first(inbox, T.global_delta, 90)
        while decode_frame(delta1).header.round != 1:  # skip the attacker's own forgeries
            delta1 = _first(inbox, T.global_delta, 90)
        _first(inbox, T.round_start(3), 90)
        _publish(attacker, T.global_delta, delta1)  # replayed while agents hold round 2
        assert fed.wait_exit(agg, 120, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(agents, list(DEVICES), tmp_path)
    finally:
        fed.resume([agg])
        fed.stop([agg, *agents])

    assert codes == [0, 0, 0]
    assert decode_frame(delta1).header.meta["signature"]  # the genuine, signed delta
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == list(DEVICES) for r in rounds)
    assert all(r["delta_bytes"] > 0 for r in rounds)
    for name in DEVICES:
        log = (tmp_path / f"{name}.log").read_text()
        refused = [line for line in log.splitlines() if f"on {T.global_delta}:" in line]
        assert any("round 50 model refused: model is not signed" in x for x in refused), name
        assert any("bad signature" in x for x in refused), name
        # (< 3 if round 3 closed before the replay reached the agent)
        assert any(re.search(r"older model refused \(round 1 < [23]\)", x) for x in refused), name
        # The genuine deltas verified against the pinned key and were applied (round 1's
        # may come in full instead: the agent re-fetched it after the refused forgeries),
        # and the final model is the aggregator's.
        assert log.count("(delta, int8,") >= 2, name
        assert {"1", "2", "3"} <= set(re.findall(r"global model of round (\d+):", log)), name
        assert f"holding the global model of round 3: {rounds[-1]['model_hash']}" in log, name
