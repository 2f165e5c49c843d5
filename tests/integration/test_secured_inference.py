"""On-device inference and the monitor on a provisioned broker, with passwords and with mTLS.

Everything runs from the files `fedmq broker init` and `fedmq device add` write, unchanged:
the aggregator from ``aggregator.toml`` (it signs the ONNX models), the agents and
``fedmq-agent serve`` from the device's ``agent.toml`` (``[agent]`` and ``[inference]``
tables: the pinned model key and the client certificate), ``fedmq monitor`` from
``monitor.toml`` and ``mosquitto_sub`` from the monitor's defaults file (no password on a
command line). The module runs twice: password authentication over TLS, and mutual TLS
(``--require-certificate``), where every process also presents its provisioned certificate.

The broker gives each login one connection (``use_username_as_clientid``): the device's
agent logs in as ``pi-0``, its inference server as ``pi-0-infer``, and each test client as
an identity of its own, once; the tests check that the broker never closed a connection
for another with the same login.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
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
from shared.protocol.onnx_frame import decode_onnx_frame
from shared.protocol.topics import Topics
from tests.conftest import CONNECT_TIMEOUT, require_mosquitto
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
DEVICES = ("pi-0", "pi-1")
ROUNDS = 2
MARKER = b"marker"


@dataclass
class Secured:
    """A provisioned directory, its running broker, and a finished signed federation."""

    root: Path
    broker: LocalBroker
    workdir: Path
    serve_log: Path

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"

    def identity(self, user: str) -> Path:
        """The directory of ``user``'s password and certificate."""
        if user in provision.RESERVED:
            return self.root / "identities" / user
        device = user.removesuffix("-infer")  # an inference server: the device's infer/
        directory = self.root / "devices" / device
        return directory if device == user else directory / provision.INFER_DIR

    def password(self, user: str) -> str:
        return (self.identity(user) / "password").read_text().strip()


def _start_serve(root: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``fedmq-agent serve --config agent.toml``: nothing but the provisioned file."""
    log = workdir / "serve.log"
    toml = root / "devices" / "pi-0" / "agent.toml"
    cmd = [sys.executable, "-m", "edge_agent.cli", "serve", "--config", str(toml)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=fed._env(workdir), cwd=fed.REPO
        )
    return proc, log


@pytest.fixture(scope="module", params=[False, True], ids=["passwords", "mutual-tls"])
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    require_mosquitto()
    work = tmp_path_factory.mktemp("secured")
    root, port = work / "pki", free_port()
    provision.broker_init(
        root,
        port=port,
        bind="127.0.0.1",
        federation=fed.FEDERATION,
        require_certificate=request.param,
    )
    for name in DEVICES:
        provision.device_add(root, name)
    broker = LocalBroker(work / "run", port=port, template=root / "mosquitto.conf").start()
    sb = Secured(root, broker, work, work / "serve.log")
    clients = fed.write_client_data(work / "data", len(DEVICES))
    serve, _ = _start_serve(root, work)
    agg_toml = root / "identities" / "aggregator" / "aggregator.toml"
    agg = fed.start_aggregator(
        sb.url, work, "--config", str(agg_toml), rounds=ROUNDS, min_clients=2
    )
    agents = [
        fed.start_agent(sb.url, n, clients[i], work, "--config", str(sb.identity(n) / "agent.toml"))
        for i, n in enumerate(DEVICES)
    ]
    try:
        assert fed.wait_exit(agg, 180, work / "aggregator.log") == 0
        assert fed.wait_agents(agents, list(DEVICES), work) == [0, 0]
        fed.wait_for(fed.logged(sb.serve_log, f"now serving round {ROUNDS}"), 60, "serve swap")
        assert _takeovers(sb) == []  # serve beside pi-0's agent: two logins
        yield sb
    finally:
        fed.stop([agg, *agents, serve])
        broker.stop()


Connect = Callable[[str], mqtt.Client]


@pytest.fixture
def connect(secured: Secured) -> Iterator[Connect]:
    """``connect(user)``: ``user``'s one connection (made once), disconnected at the end.

    The broker names a connection after its login and closes the older of two with the
    same login, so a test never opens a second one: it reuses the first.
    """
    made: dict[str, mqtt.Client] = {}

    def make(user: str) -> mqtt.Client:
        if user not in made:
            made[user] = _client(secured, user)
        return made[user]

    yield make
    for client in made.values():
        client.disconnect()
        client.loop_stop()


def _takeovers(sb: Secured) -> list[str]:
    """Broker log lines where a login's new connection closed its older one."""
    log = sb.broker.out_path.read_text(errors="replace")
    return [line for line in log.splitlines() if "already connected" in line]


def _client(sb: Secured, user: str) -> mqtt.Client:
    """A TLS client with ``user``'s password and provisioned certificate (loop running)."""
    ident = sb.identity(user)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(sb.root / "ca.crt"),
        certfile=str(ident / "client.crt"),
        keyfile=str(ident / "client.key"),
    )
    client.username_pw_set(user, sb.password(user))
    connected: list[Any] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.append(rc)
    client.connect("localhost", sb.broker.port)
    client.loop_start()
    fed.wait_for(lambda: bool(connected), CONNECT_TIMEOUT, f"CONNACK for {user}")
    assert not connected[0].is_failure, connected[0]
    return client


def _request(request_id: str, n: int = 8) -> tuple[bytes, np.ndarray]:
    sample = fed.make_dataset(n, seed=5)
    body = {"id": request_id, "x": (sample.x.astype(np.float32) / 255).tolist()}
    return json.dumps(body).encode(), sample.y


def _ask_as_pi0(inbox: fed.Inbox, client: mqtt.Client, rid: str) -> dict[str, Any]:
    payload, _ = _request(rid)
    client.publish(T.infer_request("pi-0", "pi-0"), payload, qos=1).wait_for_publish(5)
    return dict(json.loads(fed.next_on(inbox, T.infer_response("pi-0", "pi-0"), 30).payload))


def _marker_from_aggregator(connect: Connect) -> None:
    """Publish a non-retained marker on global/meta (every identity may read it)."""
    agg = connect("aggregator")  # the test's aggregator connection, if it has one already
    agg.publish(T.global_meta, MARKER, qos=1).wait_for_publish(5)


def _is_marker(m: mqtt.MQTTMessage) -> bool:
    return m.topic == T.global_meta and bytes(m.payload) == MARKER


def test_pinned_serve_answers_its_device_with_the_signed_model(
    secured: Secured, connect: Connect
) -> None:
    app = connect("pi-0")  # the device's own login: its agent has finished
    inbox = fed.collect(app, T.infer_response("pi-0", "pi-0"), T.global_onnx)
    onnx = decode_onnx_frame(bytes(fed.next_on(inbox, T.global_onnx, 10).payload))
    payload, labels = _request("req-1")

    app.publish(T.infer_request("pi-0", "pi-0"), payload, qos=1).wait_for_publish(5)
    reply = json.loads(fed.next_on(inbox, T.infer_response("pi-0", "pi-0"), 30).payload)

    log = secured.serve_log.read_text()
    assert onnx.header.signature and onnx.header.round == ROUNDS
    assert "no --model-public-key" not in log and "rejected ONNX model" not in log
    assert reply["id"] == "req-1" and reply["round"] == ROUNDS
    assert reply["onnx_sha256"] == onnx.header.onnx_sha256
    assert np.mean(np.array(reply["predictions"]) == labels) > 0.5  # chance is 0.25
    assert _takeovers(secured) == []


def test_device_cannot_read_or_forge_another_devices_inference(
    secured: Secured, connect: Connect
) -> None:
    watcher = connect("aggregator")
    all_infer = fed.collect(watcher, "fl/v1/+/infer/#")
    snoop = connect("pi-1")
    snooped = fed.collect(snoop, "fl/v1/+/infer/#", T.infer_request_any("pi-0"), T.global_meta)
    other_server = connect("pi-1-infer")  # pi-1's inference server identity
    server_snooped = fed.collect(other_server, "fl/v1/+/infer/#", T.global_meta)
    app = connect("pi-0")
    answers = fed.collect(app, T.infer_response("pi-0", "pi-0"))
    forged, _ = _request("forged")

    for client in (snoop, other_server):
        for topic in (
            T.infer_request("pi-0", "pi-1"),  # asking pi-0's server
            T.infer_request("pi-0", "pi-0"),  # posing as pi-0
            T.infer_request("pi-0", "pi-1-infer"),  # asking as pi-1's server
            T.infer_response("pi-0", "pi-0"),  # forging pi-0's server's answer
        ):
            client.publish(topic, forged, qos=1).wait_for_publish(5)
    reply = _ask_as_pi0(answers, app, "genuine")
    _marker_from_aggregator(connect)

    seen = fed.until(all_infer, fed.on(T.infer_response("pi-0", "pi-0")), 30, "the answer")
    assert [(m.topic, json.loads(m.payload)["id"]) for m in seen] == [
        (T.infer_request("pi-0", "pi-0"), "genuine"),
        (T.infer_response("pi-0", "pi-0"), "genuine"),
    ]
    assert reply["id"] == "genuine" and answers.empty()
    for inbox in (snooped, server_snooped):
        got = fed.until(inbox, _is_marker, fed.BROKER_WAIT, "the marker")
        assert [m.topic for m in got if "/infer/" in m.topic] == []
    assert _takeovers(secured) == []


def test_monitor_never_sees_inference_traffic(secured: Secured, connect: Connect) -> None:
    monitor = connect("monitor")
    seen = fed.collect(monitor, "fl/#")
    app = connect("pi-0")
    answers = fed.collect(app, T.infer_response("pi-0", "pi-0"))

    reply = _ask_as_pi0(answers, app, "private")
    _marker_from_aggregator(connect)

    got = fed.until(seen, _is_marker, fed.BROKER_WAIT, "the marker")
    assert reply["id"] == "private"
    assert [m.topic for m in got if "/infer/" in m.topic] == []
    assert any(m.topic == T.global_onnx for m in got)  # it does read everything else
    assert _takeovers(secured) == []


def test_fedmq_monitor_runs_from_its_provisioned_config(secured: Secured) -> None:
    toml = secured.identity("monitor") / "monitor.toml"
    cmd = [sys.executable, "-m", "aggregator.ops.cli", "monitor", "--config", str(toml)]
    cmd += ["--duration", "3"]

    env = dict(fed._env(), COLUMNS="160")  # rich wraps at 80 columns when not on a terminal
    done = subprocess.run(cmd, capture_output=True, env=env, cwd=fed.REPO, timeout=60)

    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert secured.password("monitor") not in " ".join(cmd)
    assert "aggregator finished" in out
    assert f"global model: round {ROUNDS}" in out and f"ONNX: round {ROUNDS}" in out


def test_mosquitto_sub_reads_as_monitor_with_the_provisioned_defaults(secured: Secured) -> None:
    env = dict(os.environ, XDG_CONFIG_HOME=str(secured.identity("monitor")))
    cmd = ["mosquitto_sub", "-v", "-t", T.aggregator_status, "-C", "1", "-W", "10"]

    done = subprocess.run(cmd, capture_output=True, env=env, timeout=30)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    topic, _, payload = done.stdout.decode().strip().partition(" ")
    assert topic == T.aggregator_status and json.loads(payload)["state"] == "finished"


# --- mutual TLS: who is refused -------------------------------------------------------------
@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[Secured]:
    require_mosquitto()
    root, port = tmp_path / "pki", free_port()
    provision.broker_init(root, port=port, bind="127.0.0.1", require_certificate=True)
    provision.device_add(root, "pi-0")
    broker = LocalBroker(tmp_path / "run", port=port, template=root / "mosquitto.conf").start()
    try:
        yield Secured(root, broker, tmp_path, tmp_path / "serve.log")
    finally:
        broker.stop()


def _transport(sb: Secured, cert_dir: Path | None) -> MqttTransport:
    """pi-0's password and the right CA; the client certificate from ``cert_dir`` (or none)."""
    options = ConnectOptions(
        username="pi-0",
        password=sb.password("pi-0"),
        ca_file=str(sb.root / "ca.crt"),
        cert_file=str(cert_dir / "client.crt") if cert_dir else None,
        key_file=str(cert_dir / "client.key") if cert_dir else None,
        reconnect_min_s=0.2,
    )
    return MqttTransport(sb.url, "pi-0-probe", options=options)


def test_mutual_tls_accepts_the_provisioned_certificate(mtls_broker: Secured) -> None:
    transport = _transport(mtls_broker, mtls_broker.identity("pi-0"))

    transport.start(timeout=10)
    transport.stop()

    assert transport.connect_count == 1


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_broker: Secured) -> None:
    transport = _transport(mtls_broker, None)

    with pytest.raises(TransportError):
        transport.start(timeout=2)
    out = mtls_broker.broker.out_path
    fed.wait_for(fed.logged(out, "peer did not return a certificate"), 10, "the broker's reason")


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_broker: Secured, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    provision.broker_init(other, port=1)
    provision.device_add(other, "pi-0")  # same name, signed by another CA
    transport = _transport(mtls_broker, other / "devices" / "pi-0")

    with pytest.raises(TransportError):
        transport.start(timeout=2)
    out = mtls_broker.broker.out_path
    fed.wait_for(fed.logged(out, "certificate verify failed"), 10, "the broker's reason")
