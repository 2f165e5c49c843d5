"""The aggregator publishes a verified ONNX model; a torch-free ``serve`` process uses it."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.protocol.onnx_frame import decode_onnx_frame
from shared.protocol.topics import Topics
from tests.conftest import MqttClientFactory
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)


def _start_serve(url: str, workdir: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "edge_agent.cli", "serve", "--broker", url]
    cmd += ["--federation", fed.FEDERATION, "--client-id", "pi-0", "--log-level", "DEBUG"]
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    env = fed._env(workdir)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=fed.REPO)


def test_served_model_is_the_published_onnx(
    broker: LocalBroker, tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    clients = fed.write_client_data(tmp_path / "data", 1)
    agg = fed.start_aggregator(broker.url, tmp_path, "--onnx", rounds=1, min_clients=1)
    agent = fed.start_agent(broker.url, "pi-0", clients[0], tmp_path)
    serve = _start_serve(broker.url, tmp_path)
    try:
        assert fed.wait_exit(agg, 120, tmp_path / "aggregator.log") == 0
        fed.wait_for(lambda: "now serving round 1" in _read(tmp_path / "serve.log"), 30, "swap")
        client = mqtt_client(broker.url)
        inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        client.on_message = lambda _c, _u, m: inbox.put(m)
        client.subscribe(T.global_onnx, qos=1)
        client.subscribe(T.infer_response("pi-0", "app"), qos=1)
        retained = inbox.get(timeout=10)
        sample = fed.make_dataset(8, seed=5)
        request = {"id": "req-1", "x": sample.x.astype(float).__truediv__(255).tolist()}
        ask = T.infer_request("pi-0", "app")
        client.publish(ask, json.dumps(request), qos=1).wait_for_publish(5)
        response = json.loads(inbox.get(timeout=15).payload)
    finally:
        fed.stop([agg, agent, serve])

    frame = decode_onnx_frame(retained.payload, federation=fed.FEDERATION)
    assert retained.retain and frame.header.round == 1
    assert response["id"] == "req-1" and response["round"] == 1
    assert response["onnx_sha256"] == frame.header.onnx_sha256
    assert len(response["predictions"]) == 8
    assert np.mean(np.array(response["predictions"]) == sample.y) > 0.5  # chance is 0.25
    assert (tmp_path / "global_model.fmq").exists() and (tmp_path / "global_model.onnx").exists()
    metrics = fed.metrics(tmp_path)
    assert metrics[-1]["onnx_export_s"] is not None


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
