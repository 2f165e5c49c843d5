"""``fedmq-agent serve`` survives hostile requests: real Mosquitto, a real serve process.

Each malformed request gets an error reply naming the problem (and the request's id when it
is readable), and the process answers the next good request. A 4 MB npz that would inflate
to 4.2 GB is refused from its ``.npy`` header, before its data is read: the process's peak
RSS (``VmHWM`` in ``/proc/<pid>/status``) barely moves. Figures print with ``-s``.

The broker refuses packets over 2,000,000 bytes (``max_packet_size``), so the 4 MB bomb
travels as a fedmq client sends any payload over its chunk size: as chunks on
``<request topic>/chunk/<i>`` (``shared/mqtt/chunking.py``), which serve's transport
reassembles (within its per-sender bounds: the request topic names the requester) before
the request is parsed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.local_broker import LocalBroker
from shared.mqtt.chunking import DEFAULT_MAX_CHUNK_BYTES, split
from shared.protocol.topics import Topics, chunk_topic
from tests.conftest import MqttClientFactory
from tests.integration import federation as fed
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
DEVICE = "pi-0"
REQUESTER = "tester"
BOMB_SAMPLES = 66_000_000  # × 64 bytes of uint8 zeros = 4.2 GB inflated, ~4.1 MB deflated
# Peak RSS growth allowed while the bomb is refused: the request itself (4 MB, held by paho
# and the inbox) and the parser's buffers; the inflated data would be 4,224 MB.
BOMB_RSS_GROWTH_MB = 64


def _request_topic() -> str:
    return T.infer_request(DEVICE, REQUESTER)


def _response_topic() -> str:
    return T.infer_response(DEVICE, REQUESTER)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX frame of the synthetic task's MLP (what the aggregator would publish)."""
    import torch

    from aggregator.onnx_export import export_verified
    from shared.protocol.messages import ModelSpec
    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(0)
    spec = ModelSpec(arch="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
    params = get_params(build_model(spec.arch, spec.input_shape, spec.num_classes))
    batch = fed.make_dataset(16, seed=3).x.astype(np.float32) / 255
    exported = export_verified(spec, params, federation=fed.FEDERATION, round_id=1, batch=batch)
    path = tmp_path_factory.mktemp("model") / "model.fmx"
    path.write_bytes(exported.frame)
    return path


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """``x`` of 4.2 GB of zeros, deflated (written in slices: never held inflated here)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("id.npy", _npy_bytes(np.array("bomb")))
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            shape = (BOMB_SAMPLES, *INPUT_SHAPE)
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fh, header)
            chunk = bytes(64 * 1024 * 1024)
            left = int(np.prod(shape))
            while left:
                fh.write(chunk if left >= len(chunk) else chunk[:left])
                left -= min(left, len(chunk))
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass
class Served:
    """The serve process, its log and a requester connected to the broker."""

    proc: subprocess.Popen[bytes]
    log: Path
    client: mqtt.Client
    inbox: fed.Inbox

    def ask(self, payload: bytes, timeout: float = 30.0) -> dict[str, Any]:
        """Publish a request and return the reply (fails after ``timeout``).

        A payload over the chunk size goes as chunks, as ``MqttTransport.publish`` sends it.
        """
        parts = [(_request_topic(), payload)]
        if len(payload) > DEFAULT_MAX_CHUNK_BYTES:
            chunks = split(payload, DEFAULT_MAX_CHUNK_BYTES)
            parts = [(chunk_topic(_request_topic(), i), c) for i, c in enumerate(chunks)]
        for topic, part in parts:
            self.client.publish(topic, part, qos=1).wait_for_publish(5)
        reply = fed.next_on(self.inbox, _response_topic(), timeout)
        return dict(json.loads(reply.payload))

    def peak_rss_mb(self) -> float:
        """VmHWM: the process's peak resident set so far."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def served(
    broker: LocalBroker, tmp_path: Path, model_file: Path, mqtt_client: MqttClientFactory
) -> Iterator[Served]:
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "edge_agent.cli", "serve", "--broker", broker.url]
    cmd += ["--federation", fed.FEDERATION, "--client-id", DEVICE, "--model", str(model_file)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=fed._env(tmp_path), cwd=fed.REPO
        )
    try:
        fed.wait_for(fed.logged(log, "serving predictions on"), 60, "serve to subscribe")
        client = mqtt_client(broker.url)
        inbox = fed.collect(client, _response_topic())
        yield Served(proc, log, client, inbox)
    finally:
        fed.stop([proc])


def _good(request_id: str) -> bytes:
    x = fed.make_dataset(2, seed=5).x.astype(np.float32) / 255
    return json.dumps({"id": request_id, "x": x.tolist()}).encode()


@pytest.mark.parametrize(
    ("payload", "request_id", "reason"),
    [
        pytest.param(
            b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "deep",
            "Expected `float`, got `array` - at `$.x[0][0][0][0]`",
            id="deeply-nested-json",
        ),
        pytest.param(
            _npz(x=np.zeros((1, *INPUT_SHAPE), np.float32), id=np.array(1 + 2j)),
            None,
            "npz 'id': dtype '<c16'",
            id="complex-npz-id",
        ),
        pytest.param(
            _npz(x=np.full((2, *INPUT_SHAPE), "a"), id=np.array("str-x")),
            "str-x",
            "x has dtype '<U1'",
            id="string-npz-x",
        ),
    ],
)
def test_malformed_request_gets_an_error_reply_and_serve_answers_the_next(
    served: Served, payload: bytes, request_id: str | None, reason: str
) -> None:
    error = served.ask(payload)
    answer = served.ask(_good("after"))

    assert served.proc.poll() is None, served.log.read_text(errors="replace")[-2000:]
    assert error["id"] == request_id and reason in error["error"]
    assert answer["id"] == "after" and len(answer["predictions"]) == 2


def test_npz_memory_bomb_is_refused_from_its_header_with_bounded_rss(
    served: Served, bomb: bytes
) -> None:
    served.ask(_good("warm-up"))  # onnxruntime's buffers are part of the baseline
    before = served.peak_rss_mb()

    t0 = time.monotonic()
    error = served.ask(bomb, timeout=60)
    elapsed = time.monotonic() - t0
    peak = served.peak_rss_mb()
    answer = served.ask(_good("after"))

    print(
        f"\nnpz bomb of {len(bomb) / 1e6:.2f} MB ({BOMB_SAMPLES * 64 / 1e9:.1f} GB inflated): "
        f"serve peak RSS {before:.0f} MB before, {peak:.0f} MB after; reply in {elapsed:.2f} s"
    )
    assert error["id"] == "bomb" and f"batch of {BOMB_SAMPLES} exceeds 4096" in error["error"]
    assert peak - before < BOMB_RSS_GROWTH_MB
    assert answer["id"] == "after" and served.proc.poll() is None
