"""``fedmq-agent serve``: answer prediction requests with the federation's latest ONNX model.

Subscribes to the retained ``global/onnx`` topic and hot-swaps to every new model whose frame
verifies (SHA-256 of the ONNX bytes, federation, newer round); answers requests published on
``fl/v1/{fed}/infer/{cid}/request`` (JSON ``{"id": .., "x": [[...]]}`` or ``.npz`` bytes with
an ``x`` array) with JSON on ``.../response``. No torch: see :mod:`edge_agent.inference`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import queue
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.inference import MAX_REQUEST_BYTES, InferenceError, OnnxClassifier
from shared.mqtt.base import Connector, Inbound, Session
from shared.mqtt.options import add_plaintext_argument
from shared.protocol import topics
from shared.protocol.onnx_frame import OnnxFrameError, decode_onnx_frame
from shared.protocol.signing import ONNX_CONTEXT, SignatureError, load_public_key, verify_model
from shared.settings import load_settings

log = logging.getLogger("fedmq.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the inference server (TOML ``[inference]``, ``FEDMQ_INFERENCE_*``)."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    client_id: str = ""
    input_topic: str = ""  # default: fl/v1/{fed}/infer/{cid}/request
    output_topic: str = ""  # default: fl/v1/{fed}/infer/{cid}/response
    model: str = ""  # optional ONNX file/frame to serve until the broker's model arrives
    threads: int = 1
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False
    connect_timeout: float = 60.0
    max_model_bytes: int = 256 * 1024 * 1024
    model_public_key: str | None = None  # pin the aggregator's key: serve signed models only

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client-id is required")
        topics.validate_name("client id", self.client_id)
        topics.validate_name("federation", self.federation)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq-agent serve`` (unset flags do not override file or environment)."""
    parser.add_argument("--config", help="TOML file ([inference] table)")
    parser.add_argument("--broker")
    parser.add_argument("--federation")
    parser.add_argument("--client-id")
    parser.add_argument("--input-topic", help="request topic (default .../infer/{cid}/request)")
    parser.add_argument("--output-topic", help="response topic (default .../infer/{cid}/response)")
    parser.add_argument("--model", help="ONNX file to serve until the federation's model arrives")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--ca-file", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--cert-file", help="client certificate (brokers requiring one)")
    parser.add_argument("--key-file", help="private key of --cert-file")
    add_plaintext_argument(parser)
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument(
        "--model-public-key",
        help="aggregator's model-signing public key (PEM): unsigned or "
        "tampered ONNX models are refused",
    )


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Defaults < TOML ``[inference]`` < ``FEDMQ_INFERENCE_*`` < flags."""
    return load_settings(ServeConfig, args, "inference", "FEDMQ_INFERENCE_")


class InferenceServer:
    """Follows the federation's ONNX model and answers requests; work runs on :meth:`run`."""

    def __init__(self, cfg: ServeConfig, connect: Connector) -> None:
        self.cfg = cfg
        self.topics = topics.Topics(cfg.federation)
        self.request_topic = cfg.input_topic or self.topics.infer_request(cfg.client_id)
        self.response_topic = cfg.output_topic or self.topics.infer_response(cfg.client_id)
        self.model: OnnxClassifier | None = None
        self.swaps = 0
        self.stop_event = threading.Event()
        self.model_key = load_public_key(cfg.model_public_key) if cfg.model_public_key else None
        if self.model_key is None:
            log.warning("no --model-public-key: unsigned ONNX models are served")
        if cfg.model:
            with open(cfg.model, "rb") as fh:
                self.model = OnnxClassifier.from_bytes(fh.read(), cfg.threads)
        self.transport = connect(
            Session(
                f"{cfg.client_id}-infer",
                subscriptions=((self.topics.global_onnx, 1), (self.request_topic, 1)),
            )
        )

    def run(self) -> int:
        """Serve until :meth:`stop`; return the exit code."""
        self.transport.start(timeout=self.cfg.connect_timeout)
        log.info("serving predictions on %s -> %s", self.request_topic, self.response_topic)
        while not self.stop_event.is_set():
            try:
                item = self.transport.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self.handle(item)
        self.transport.stop()
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self.stop_event.set()

    def handle(self, item: Inbound) -> None:
        """Dispatch one inbound message (model or request)."""
        if item.topic == self.topics.global_onnx:
            self.on_model(item.payload)
        elif item.topic == self.request_topic:
            response = self.answer(item.payload)
            self.transport.publish(self.response_topic, json.dumps(response).encode(), wait=False)

    def on_model(self, payload: bytes) -> None:
        """Verify a new ONNX frame and swap to it; keep the current model on any problem."""
        if not payload:
            return
        try:
            frame = decode_onnx_frame(
                payload, max_bytes=self.cfg.max_model_bytes, federation=self.cfg.federation
            )
            head = frame.header
            if self.model_key is not None:
                verify_model(
                    self.model_key,
                    head.federation,
                    head.round,
                    head.onnx_sha256,
                    head.signature,
                    ONNX_CONTEXT,
                )
            current = self.model.header if self.model else None
            if current is not None and head.round < current.round:
                raise OnnxFrameError(f"older model (round {head.round} < {current.round})")
            model = OnnxClassifier(frame.onnx, frame.header, self.cfg.threads)
        except (OnnxFrameError, InferenceError, SignatureError) as exc:
            log.warning("rejected ONNX model on %s: %s", self.topics.global_onnx, exc)
            return
        self.model = model  # one reference swap: requests never see half a model
        self.swaps += 1
        log.info(
            "now serving round %d (onnx %s)", frame.header.round, frame.header.onnx_sha256[:12]
        )

    def answer(self, payload: bytes) -> dict[str, Any]:
        """The JSON-able response to one request (an ``error`` field instead of predictions)."""
        request_id: Any = None
        try:
            request_id, x = parse_request(payload)
            if self.model is None:
                raise InferenceError("no model yet: waiting for the federation's ONNX model")
            t0 = time.perf_counter()
            pred, conf = self.model.predict(x)
            return {
                "id": request_id,
                **self.model.describe(),
                "predictions": [int(p) for p in pred],
                "confidence": [round(float(c), 6) for c in conf],
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            }
        except InferenceError as exc:
            log.warning("bad inference request: %s", exc)
            return {"id": request_id, "error": str(exc)}


def parse_request(payload: bytes) -> tuple[Any, np.ndarray]:
    """(id, x) from a JSON request ``{"id", "x"}`` or ``.npz`` bytes with ``x`` (and ``id``)."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise InferenceError(f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    if payload[:2] == b"PK":
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
                x = npz["x"]
                rid = npz["id"].item() if "id" in npz.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise InferenceError(f"bad npz request: {exc}") from exc
        return (rid.decode() if isinstance(rid, bytes) else rid), x
    try:
        body = json.loads(payload)
        x = np.asarray(body["x"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise InferenceError(f"bad JSON request (want {{'id': .., 'x': [...]}}): {exc}") from exc
    if not isinstance(body, dict):
        raise InferenceError("request is not a JSON object")
    return body.get("id"), x
