"""``fedmq-agent serve``: answer prediction requests with the federation's latest ONNX model.

Subscribes to the retained ``global/onnx`` topic and hot-swaps to every new model whose frame
verifies (SHA-256 of the ONNX bytes, federation, newer run and round; with a pinned key, a
signed header); answers each requester's requests, published on
``fl/v1/{fed}/infer/{cid}-infer/request/{requester}`` (JSON ``{"id": .., "x": [[...]]}`` or
``.npz`` bytes with an ``x`` array), with JSON on ``.../infer/{cid}-infer/response/{requester}``.
No torch: see :mod:`edge_agent.inference`.

The server is a client of its own, ``{cid}-infer`` (:func:`shared.protocol.topics.
inference_server_id`), never its device's training agent: on a provisioned broker (one
connection per login) it logs in with the inference identity `fedmq device add` provisions.

Every request gets an answer or an error reply (with its id when readable), never a crash:
parsing is bounded (:mod:`edge_agent.infer_request`), and each requester has a budget
(:mod:`edge_agent.requester_budget`).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_agent.infer_request import (
    RequestError,
    RequestLimits,
    parse_request,
    read_request_id,
)
from edge_agent.inference import MAX_BATCH, InferenceError, OnnxModel
from edge_agent.requester_budget import BudgetLimits, Outcome, RequesterBudgets, Verdict
from shared.clock import Clock, SystemClock
from shared.mqtt.base import Connector, Inbound, Session, TransportError
from shared.mqtt.chunking import DEFAULT_MAX_CHUNK_BYTES
from shared.mqtt.options import (
    add_plaintext_argument,
    add_protocol_arguments,
    check_protocol_settings,
)
from shared.mqtt.versions import AUTO
from shared.protocol import topics
from shared.protocol.claims import verify_onnx_frame
from shared.protocol.onnx_frame import OnnxFrameError, decode_onnx_frame
from shared.protocol.signing import SignatureError, load_public_key
from shared.settings import load_settings

log = logging.getLogger("fedmq.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the inference server (TOML ``[inference]``, ``FEDMQ_INFERENCE_*``)."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    client_id: str = ""  # the device's; the server connects as {client_id}-infer
    # Both or neither; empty: each requester on its own topics, infer/{cid}-infer/request/{req}
    input_topic: str = ""  # one request topic (may hold wildcards): one shared budget
    output_topic: str = ""  # where requests on input_topic are answered
    model: str = ""  # optional ONNX file/frame to serve until the broker's model arrives
    threads: int = 1
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_version: str = AUTO  # "5", "3.1.1" or "auto" (5, else 3.1.1): docs/brokers.md
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False
    connect_timeout: float = 60.0
    max_model_bytes: int = 256 * 1024 * 1024
    model_public_key: str | None = None  # pin the aggregator's key: serve signed models only
    max_batch: int = MAX_BATCH
    # Each requester's budget (token buckets); over it, requests are refused and counted.
    requests_per_s: float = 20.0
    burst_requests: int = 40
    request_bytes_per_s: float = 8 * 1024 * 1024
    burst_request_bytes: int = 32 * 1024 * 1024
    max_requesters: int = 1024

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client-id is required")
        server_id = self.server_id  # refuses a client id that leaves no room for the suffix
        if self.username == self.client_id:
            # With use_username_as_clientid the broker would name this connection after the
            # device and close its training agent's (and the ACL grants it no infer/ topic).
            raise ValueError(
                f"username {self.username!r} is the device's own login, which its training "
                f"agent uses: serve logs in as {server_id!r}, the inference identity "
                "`fedmq device add` provisions (re-run it to get one)"
            )
        topics.validate_name("federation", self.federation)
        check_protocol_settings(self.mqtt_version, self.max_chunk_bytes)
        if bool(self.input_topic) != bool(self.output_topic):
            raise ValueError("input-topic and output-topic go together: set both or neither")
        if any(c in self.output_topic for c in "+#"):
            raise ValueError(f"output-topic {self.output_topic!r} must not hold wildcards")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ValueError(f"max-batch must be in 1..{MAX_BATCH}")
        self.budget()  # range checks of the budget settings

    @property
    def server_id(self) -> str:
        """The server's client id (and provisioned login): ``{client_id}-infer``."""
        return topics.inference_server_id(self.client_id)

    def budget(self) -> BudgetLimits:
        """Each requester's allowance."""
        return BudgetLimits(
            requests_per_s=self.requests_per_s,
            burst_requests=self.burst_requests,
            bytes_per_s=self.request_bytes_per_s,
            burst_bytes=self.burst_request_bytes,
            max_requesters=self.max_requesters,
        )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq-agent serve`` (unset flags do not override file or environment)."""
    parser.add_argument("--config", help="TOML file ([inference] table)")
    parser.add_argument("--broker")
    parser.add_argument("--federation")
    parser.add_argument("--client-id", help="the device's id; serve connects as <id>-infer")
    parser.add_argument(
        "--input-topic",
        help="one request topic instead of .../infer/{cid}-infer/request/{requester}",
    )
    parser.add_argument("--output-topic", help="where requests on --input-topic are answered")
    parser.add_argument("--model", help="ONNX file to serve until the federation's model arrives")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--ca-file", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--cert-file", help="client certificate (brokers requiring one)")
    parser.add_argument("--key-file", help="private key of --cert-file")
    add_protocol_arguments(parser)
    add_plaintext_argument(parser)
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument(
        "--model-public-key",
        help="aggregator's model-signing public key (PEM): unsigned or "
        "tampered ONNX models are refused",
    )
    parser.add_argument("--max-batch", type=int, help=f"samples per request (≤ {MAX_BATCH})")
    parser.add_argument("--requests-per-s", type=float, help="each requester's request rate")
    parser.add_argument("--burst-requests", type=int, help="each requester's request burst")
    parser.add_argument("--request-bytes-per-s", type=float, help="each requester's byte rate")
    parser.add_argument("--burst-request-bytes", type=int, help="each requester's byte burst")
    parser.add_argument("--max-requesters", type=int, help="requesters tracked at once")
    parser.add_argument("--max-model-bytes", type=int, help="largest ONNX frame accepted")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Defaults < TOML ``[inference]`` < ``FEDMQ_INFERENCE_*`` < flags."""
    return load_settings(ServeConfig, args, "inference", "FEDMQ_INFERENCE_")


# The one requester of a custom --input-topic: its requests share one budget.
SHARED_REQUESTER = "input-topic"


class InferenceServer:
    """Follows the federation's ONNX model and answers requests; work runs on :meth:`run`."""

    def __init__(self, cfg: ServeConfig, connect: Connector, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.topics = topics.Topics(cfg.federation)
        self.request_subscription = cfg.input_topic or self.topics.infer_request_any(cfg.client_id)
        self.model: OnnxModel | None = None
        self.swaps = 0
        self.budgets = RequesterBudgets(cfg.budget())
        self.stop_event = threading.Event()
        self.model_key = load_public_key(cfg.model_public_key) if cfg.model_public_key else None
        if self.model_key is None:
            log.warning("no --model-public-key: unsigned ONNX models are served")
        if cfg.model:
            with open(cfg.model, "rb") as fh:
                self.model = OnnxModel.from_bytes(fh.read(), cfg.threads)
        self.transport = connect(
            Session(
                cfg.server_id,
                subscriptions=((self.topics.global_onnx, 1), (self.request_subscription, 1)),
            )
        )

    def run(self) -> int:
        """Serve until :meth:`stop`; return the exit code."""
        self.transport.start(timeout=self.cfg.connect_timeout)
        log.info("serving predictions on %s", self.request_subscription)
        while not self.stop_event.is_set():
            try:
                item = self.transport.inbox.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is not None:
                self.handle(item)
            for line in self.budgets.report(self.clock.monotonic()):
                log.warning("%s", line)
        self.transport.stop()
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self.stop_event.set()

    def handle(self, item: Inbound) -> None:
        """Dispatch one inbound message (model or request); never raises for a request."""
        if item.topic == self.topics.global_onnx:
            self.on_model(item.payload)
            return
        route = self.route(item.topic)
        if route is None:  # counted, and reported once per period (a flood must not log)
            log.debug("ignored a message on %s: names no valid requester", item.topic)
            self.budgets.note_unroutable(self.clock.monotonic())
            return
        requester, reply_topic = route
        try:
            self.on_request(requester, reply_topic, item.payload)
        except Exception as exc:  # the last line of defence: no request may end the server
            log.exception("internal error answering %s", item.topic)
            self.reply(reply_topic, {"id": None, "error": f"internal error: {type(exc).__name__}"})

    def route(self, topic: str) -> tuple[str, str] | None:
        """(requester, reply topic) of a request on ``topic``; None when it is not one."""
        if self.cfg.input_topic:
            return SHARED_REQUESTER, self.cfg.output_topic
        try:
            parsed = topics.parse(topic)
        except topics.TopicError:
            return None
        requester = parsed.requester
        mine = parsed.kind == "infer_request" and parsed.client_id == self.cfg.client_id
        if not mine or not requester:
            return None
        return requester, self.topics.infer_response(self.cfg.client_id, requester)

    def on_request(self, requester: str, reply_topic: str, payload: bytes) -> None:
        """Answer one request within ``requester``'s budget (refusals: one reply per period)."""
        verdict = self.budgets.admit(requester, len(payload), self.clock.monotonic())
        if verdict is Verdict.REFUSE:
            return
        if verdict is Verdict.REFUSE_AND_REPLY:
            limits = self.budgets.limits
            reason = (
                f"over budget: at most {limits.requests_per_s:g} requests/s and "
                f"{limits.bytes_per_s:g} bytes/s per requester; further refusals this period "
                "are not answered"
            )
            # Once per period per requester, so reading the id here costs little.
            self.reply(reply_topic, {"id": read_request_id(payload), "error": reason})
            return
        response = self.answer(payload)
        outcome = Outcome.ERROR if "error" in response else Outcome.ANSWERED
        self.budgets.record(requester, outcome)
        self.reply(reply_topic, response)

    def reply(self, topic: str, response: dict[str, Any]) -> None:
        """Publish ``response``; a transport failure is logged, never raised."""
        try:
            self.transport.publish(topic, json.dumps(response).encode(), wait=False)
        except TransportError as exc:
            log.warning("could not answer on %s: %s", topic, exc)

    def on_model(self, payload: bytes) -> None:
        """Verify a new ONNX frame and swap to it; keep the current model on any problem."""
        if not payload:
            return
        try:
            frame = decode_onnx_frame(
                payload, max_bytes=self.cfg.max_model_bytes, federation=self.cfg.federation
            )
            head = frame.header
            if self.model_key is not None:  # the whole header: input shape, classes, ...
                verify_onnx_frame(self.model_key, frame)
            current = self.model.header if self.model else None
            if current is not None and (head.run, head.round) < (current.run, current.round):
                raise OnnxFrameError(
                    f"older model (run {head.run} round {head.round} < "
                    f"run {current.run} round {current.round})"
                )
            model = OnnxModel(frame.onnx, frame.header, self.cfg.threads)
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
        model = self.model  # one read: a swap during this request does not mix models
        try:
            if model is None:
                raise RequestError(
                    "no model yet: waiting for the federation's ONNX model",
                    read_request_id(payload),
                )
            request = parse_request(payload, RequestLimits(model.input_shape, self.cfg.max_batch))
            t0 = time.perf_counter()
            try:
                pred = model.predict(request.x)
            except InferenceError as exc:
                raise RequestError(str(exc), request.id) from exc
        except RequestError as exc:
            log.debug("bad inference request: %s", exc)
            return {"id": exc.request_id, "error": str(exc)}
        return {
            "id": request.id,
            **model.describe(),
            **pred.as_json(),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }
