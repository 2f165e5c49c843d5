"""Signed control data and runs, attacked over a real Mosquitto with real processes.

- A forged retained round announcement (``lr`` 1e30; and a signed one relabelled to another
  round) and a forged live ``finished``, published by someone the broker lets write the
  aggregator's topics (stolen aggregator credentials, a compromised broker): pinned agents
  refuse all three and keep training the genuine rounds (before: every agent crashed on the
  first).
- A signed ONNX model relabelled with another input shape, and the same model in the old
  frame version whose header was unsigned: a pinned ``serve`` refuses both and keeps
  answering with the genuine model (before: it swapped to the relabelled one).
- A persistent broker holding run A's retained round-2 model, loaded by run B's fresh agents
  before run B's aggregator starts, and run A's model replayed during run B: run B completes
  (before: the agents refused run B's round-0 model as older and the aggregator exited 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.ops.local_broker import LocalBroker
from shared.protocol.onnx_frame import decode_onnx_frame, encode_onnx_frame
from shared.protocol.signing import generate_keypair, private_pem, public_pem
from shared.protocol.topics import Topics
from tests.conftest import MqttClientFactory, require_mosquitto
from tests.integration import federation as fed
from tests.integration.test_security import (  # noqa: F401 - the fixture is used by name
    DEVICES,
    SecureBroker,
    _client,
    _first,
    _publish,
    _start_signed_federation,
    secure,
)
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)


# --- finding 7: forged round announcements --------------------------------------------------
def test_pinned_agents_refuse_forged_announcements_and_keep_training(
    secure: SecureBroker,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The attacker may publish on the aggregator's topics but lacks the signing key.

    It logs in as ``intruder``, an identity the ACL grants ``fl/v1/#`` like the aggregator:
    a broker that lets someone else publish there. Not as ``aggregator`` itself: the broker
    uses the username as client id, so that login would only take over the real aggregator's
    connection (and the two would keep closing each other's), which is another attack.
    """
    attacker = _client(secure, "intruder")
    inbox = fed.collect(attacker, T.round_start_any, T.update_any)
    agg, agents = _start_signed_federation(secure, tmp_path)
    try:
        genuine = json.loads(_first(inbox, T.round_start(1), 90))
        # Round 1 stays open while the forgeries land: agents hold the round-0 model they
        # name, so following them means training at once.
        fed.pause([agg])
        absurd = {**genuine, "round": 50, "train": {**genuine["train"], "lr": 1e30}}
        relabelled = {**genuine, "round": 51}  # the genuine signature (if any) kept
        for forged in (absurd, relabelled):
            body = json.dumps(forged).encode()
            _publish(attacker, T.round_start(forged["round"]), body, retain=True)
        finished = {"federation": fed.FEDERATION, "state": "finished", "round": 3}
        _publish(attacker, T.aggregator_status, json.dumps(finished).encode())  # live
        for name in DEVICES:
            seen = fed.logged(tmp_path / f"{name}.log", "'finished' of run")
            fed.wait_for(seen, 30, f"{name} handling the forgeries")
        fed.resume([agg])
        assert fed.wait_exit(agg, 120, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(agents, list(DEVICES), tmp_path)
        got = fed.until(inbox, fed.on(T.round_start(3)), 10, "everything up to round 3")
    finally:
        fed.resume([agg])
        fed.stop([agg, *agents])

    assert codes == [0, 0, 0]
    rounds = fed.metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == list(DEVICES) for r in rounds)
    updates = [m.topic for m in got if "/update/" in m.topic]
    assert {t.split("/")[4] for t in updates} == {"1", "2"}  # rounds 50 and 51: none
    for name in DEVICES:
        log = (tmp_path / f"{name}.log").read_text()
        assert "Expected `float` <= 10.0 - at `$.train.lr`" in log, name
        assert "round 51 announcement" in log and "refused: bad signature" in log, name
        assert "ignored: status is not signed" in log, name


# --- finding 7: a relabelled ONNX header ----------------------------------------------------
def _serve(url: str, workdir: Path, public_key: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "edge_agent.cli", "serve", "--broker", url]
    cmd += ["--federation", fed.FEDERATION, "--client-id", "pi-0"]
    cmd += ["--model-public-key", str(public_key)]
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=fed._env(workdir), cwd=fed.REPO
    )


def _signed_onnx_frame(key: Ed25519PrivateKey) -> bytes:
    """What a signing aggregator publishes on global/onnx after round 1."""
    import torch

    from aggregator.onnx_export import export_verified
    from shared.protocol.messages import ModelSpec
    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    spec = ModelSpec(arch="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
    torch.manual_seed(1)
    params = get_params(build_model(spec.arch, spec.input_shape, spec.num_classes))
    batch = np.random.default_rng(0).uniform(0, 1, size=(8, *INPUT_SHAPE)).astype(np.float32)
    done = export_verified(
        spec, params, federation=fed.FEDERATION, round_id=1, batch=batch, signing_key=key
    )
    return done.frame


def test_pinned_serve_refuses_a_relabelled_onnx_header_and_the_unsigned_header_form(
    broker: LocalBroker, tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    key = generate_keypair()
    (tmp_path / "model.pub").write_bytes(public_pem(key))
    genuine = _signed_onnx_frame(key)
    frame = decode_onnx_frame(genuine)
    relabelled = encode_onnx_frame(replace(frame.header, input_shape=(1, 4, 16)), frame.onnx)
    old_form = b"FMX\x01" + genuine[4:]  # the frame version whose header was not signed
    # The dev broker has no ACL: the requester level is the name the client writes there.
    attacker = mqtt_client(broker.url)
    app = mqtt_client(broker.url, client_id="app")
    responses = fed.collect(app, T.infer_response("pi-0", "app"))
    serve = _serve(broker.url, tmp_path, tmp_path / "model.pub")
    log = tmp_path / "serve.log"
    try:
        fed.wait_for(fed.logged(log, "serving predictions on"), 30, "serve connected")
        _publish(attacker, T.global_onnx, genuine, retain=True)
        fed.wait_for(fed.logged(log, "now serving round 1"), 30, "the genuine model served")
        _publish(attacker, T.global_onnx, relabelled, retain=True)
        fed.wait_for(fed.logged(log, "bad signature for the ONNX header"), 30, "relabel refused")
        _publish(attacker, T.global_onnx, old_form, retain=True)
        fed.wait_for(fed.logged(log, "has an unsigned header"), 30, "version 1 refused")
        # Only now ask: serve reads each sender's messages in turn (a fair inbox), so a request
        # sent at once could be answered before the forged frames were even read.
        sample = fed.make_dataset(4, seed=5)
        request = {"id": "after", "x": (sample.x.astype(float) / 255).tolist()}
        _publish(app, T.infer_request("pi-0", "app"), json.dumps(request).encode())
        response = json.loads(fed.next_on(responses, T.infer_response("pi-0", "app"), 30).payload)
    finally:
        fed.stop([serve])

    text = log.read_text()
    assert response.get("error") is None and len(response["predictions"]) == 4, response
    assert response["onnx_sha256"] == frame.header.onnx_sha256
    assert text.count("now serving round 1") == 1
    refused = [line for line in text.splitlines() if "rejected ONNX model" in line]
    assert any("bad signature" in line for line in refused), text
    assert any("ONNX frame version 1 has an unsigned header" in line for line in refused), text


# --- finding 8: a retained model of an earlier run ------------------------------------------
def _keys(directory: Path) -> tuple[Path, Path]:
    key = generate_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.key").write_bytes(private_pem(key))
    (directory / "model.pub").write_bytes(public_pem(key))
    return directory / "model.key", directory / "model.pub"


def _agents(url: str, workdir: Path, public: Path) -> list[subprocess.Popen[bytes]]:
    data = fed.write_client_data(workdir / "data", len(DEVICES))
    pin = ("--model-public-key", str(public))
    return [fed.start_agent(url, n, data[i], workdir, *pin) for i, n in enumerate(DEVICES)]


def test_a_new_run_completes_on_a_persistent_broker_holding_an_old_runs_model(
    tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    require_mosquitto()
    private, public = _keys(tmp_path / "keys")
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    persistence = (fed.REPO / "broker_config" / "mosquitto-persistence.conf").read_text()
    # Full models only: agents follow global/model every round, so the replay reaches them.
    sign = ("--signing-key", str(private), "--no-onnx", "--download-codec", "none")
    procs: list[subprocess.Popen[bytes]] = []
    with LocalBroker(tmp_path / "broker", extra_config=persistence) as b:
        # Run A: a signed two-round federation; the broker keeps its round-2 model.
        agents = _agents(b.url, run_a, public)
        agg = fed.start_aggregator(b.url, run_a, *sign, rounds=2)
        procs = [agg, *agents]
        try:
            assert fed.wait_exit(agg, 120, run_a / "aggregator.log") == 0
            assert fed.wait_agents(agents, list(DEVICES), run_a) == [0, 0, 0]
            b.stop()  # a clean stop saves mosquitto.db
            b.start()
            watcher = mqtt_client(b.url)
            inbox = fed.collect(watcher, T.global_model, T.round_start_any)
            old_model = fed.next_on(inbox, T.global_model, 10)
            assert old_model.retain  # run A's model survived the restart
            # Run B: fresh agents load run A's retained model before run B's aggregator
            # publishes anything. A round that starves fails fast (no extension).
            agents = _agents(b.url, run_b, public)
            procs = list(agents)
            for name in DEVICES:
                held = fed.logged(run_b / f"{name}.log", "global model of round 2")
                fed.wait_for(held, 60, f"{name} holding run A's round-2 model")
            starve_fast = ("--round-timeout", "30", "--max-extensions", "0")
            agg = fed.start_aggregator(b.url, run_b, *sign, *starve_fast, rounds=2)
            procs.insert(0, agg)
            fed.next_on(inbox, T.round_start(1), 60)
            fed.pause([agg])  # anyone with write access replays run A's signed model
            _publish(watcher, T.global_model, bytes(old_model.payload), retain=True)
            fed.resume([agg])
            code = fed.wait_exit(agg, 150, run_b / "aggregator.log")
            codes = fed.wait_agents(agents, list(DEVICES), run_b)
        finally:
            fed.resume(procs)
            fed.stop(procs)

    assert code == 0
    assert codes == [0, 0, 0]
    rounds = fed.metrics(run_b)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == list(DEVICES) for r in rounds)
    for name in DEVICES:
        log = (run_b / f"{name}.log").read_text()
        assert "global model of round 0" in log, name  # run B's initial model, taken
        assert "model of an older run refused" in log, name
