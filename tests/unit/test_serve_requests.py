"""``fedmq-agent serve`` answers every request, or replies with an error, and never dies.

The real :class:`InferenceServer` over the in-memory broker, with a manual clock; each test
feeds the server's inbox to :meth:`InferenceServer.handle` and reads the requester's inbox.
"""

from __future__ import annotations

import io
import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from aggregator.onnx_export import export_verified
from edge_agent.serve import InferenceServer, ServeConfig
from shared.clock import ManualClock
from shared.mqtt.base import Session, Transport
from shared.mqtt.memory import MemoryBroker
from shared.protocol.messages import ModelSpec
from shared.protocol.topics import Topics

SPEC = ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=4)
FED = "fed"
DEVICE = "pi-1"
T = Topics(FED)


@pytest.fixture(scope="module")
def onnx_frame() -> bytes:
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(0)
    params = get_params(build_model(SPEC.arch, SPEC.input_shape, SPEC.num_classes))
    batch = np.random.default_rng(0).uniform(0, 1, size=(8, 1, 8, 8)).astype(np.float32)
    return export_verified(SPEC, params, federation=FED, round_id=3, batch=batch).frame


@dataclass
class Bench:
    """A server, its broker and clock, and a way to ask it as a given requester."""

    server: InferenceServer
    broker: MemoryBroker
    clock: ManualClock
    requesters: dict[str, Transport]

    def ask(self, payload: bytes, requester: str = "app") -> dict[str, Any] | None:
        """Publish a request, let the server handle its inbox, return the reply (or None)."""
        client = self._requester(requester)
        client.publish(T.infer_request(DEVICE, requester), payload)
        self.drain()
        try:
            return dict(json.loads(client.inbox.get_nowait().payload))
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Handle everything queued for the server."""
        while True:
            try:
                item = self.server.transport.inbox.get_nowait()
            except queue.Empty:
                return
            self.server.handle(item)

    def _requester(self, name: str) -> Transport:
        if name not in self.requesters:
            subs = ((T.infer_response(DEVICE, name), 1),)
            self.requesters[name] = self.broker.connector(Session(name, subs)).start()
        return self.requesters[name]


def _bench(frame: bytes | None, **cfg: Any) -> Bench:
    clock = ManualClock()
    broker = MemoryBroker(clock)
    server = InferenceServer(
        ServeConfig(federation=FED, client_id=DEVICE, **cfg), broker.connector, clock
    )
    server.transport.start()
    bench = Bench(server, broker, clock, {})
    if frame is not None:
        server.on_model(frame)
    return bench


@pytest.fixture
def bench(onnx_frame: bytes) -> Iterator[Bench]:
    yield _bench(onnx_frame)


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good(request_id: object = "ok") -> bytes:
    return json.dumps({"id": request_id, "x": np.full((2, 1, 8, 8), 0.5).tolist()}).encode()


def test_valid_request_is_answered_with_its_id_and_the_model_round(bench: Bench) -> None:
    reply = bench.ask(_good("req-1"))

    assert reply is not None
    assert reply["id"] == "req-1" and reply["round"] == 3 and len(reply["predictions"]) == 2


@pytest.mark.parametrize(
    ("payload", "request_id", "reason"),
    [
        pytest.param(
            b'{"id": "deep", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            "deep",
            "$.x[0][0][0][0]",
            id="deeply-nested-json",
        ),
        pytest.param(
            _npz(x=np.zeros((1, 1, 8, 8), np.float32), id=np.array(1 + 2j)),
            None,
            "npz 'id'",
            id="complex-id",
        ),
        pytest.param(
            _npz(x=np.full((2, 1, 8, 8), "a"), id=np.array("str-x")),
            "str-x",
            "x has dtype '<U1'",
            id="string-x",
        ),
    ],
)
def test_malformed_request_gets_an_error_reply_and_the_server_keeps_answering(
    bench: Bench, payload: bytes, request_id: object, reason: str
) -> None:
    error = bench.ask(payload)
    after = bench.ask(_good("after"))

    assert error is not None and error["id"] == request_id and reason in error["error"]
    assert after is not None and after["id"] == "after" and "predictions" in after


def test_request_before_any_model_gets_an_error_reply_with_its_id(onnx_frame: bytes) -> None:
    bench = _bench(None)

    reply = bench.ask(_good("early"))

    assert reply is not None and reply["id"] == "early" and "no model yet" in reply["error"]


def test_unexpected_failure_is_answered_as_an_internal_error(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("a bug")

    assert bench.server.model is not None
    monkeypatch.setattr(bench.server.model, "predict", broken)

    reply = bench.ask(_good())

    assert reply == {"id": None, "error": "internal error: RuntimeError"}


def test_requester_over_budget_is_told_once_then_counted(onnx_frame: bytes) -> None:
    bench = _bench(onnx_frame, requests_per_s=1.0, burst_requests=2)

    replies = [bench.ask(_good(i)) for i in range(4)]

    assert [r and r.get("id") for r in replies[:2]] == [0, 1]
    refusal = replies[2]
    assert refusal is not None and refusal["id"] == 2 and "over budget" in refusal["error"]
    assert replies[3] is None


def test_other_requesters_are_answered_while_one_is_over_budget(onnx_frame: bytes) -> None:
    bench = _bench(onnx_frame, requests_per_s=1.0, burst_requests=2)
    for i in range(5):
        bench.ask(_good(i), requester="flooder")

    reply = bench.ask(_good("mine"), requester="app")

    assert reply is not None and reply["id"] == "mine" and "predictions" in reply


def test_budget_refills_with_the_clock(onnx_frame: bytes) -> None:
    bench = _bench(onnx_frame, requests_per_s=1.0, burst_requests=1)
    bench.ask(_good(0))
    bench.ask(_good(1))  # refused

    bench.clock.advance(1.0)
    reply = bench.ask(_good(2))

    assert reply is not None and reply["id"] == 2 and "predictions" in reply


def test_refusals_are_reported_in_one_log_line_per_period(onnx_frame: bytes) -> None:
    bench = _bench(onnx_frame, requests_per_s=1.0, burst_requests=1)
    for i in range(6):
        bench.ask(_good(i), requester="flooder")

    bench.clock.advance(10.0)
    lines = bench.server.budgets.report(bench.clock.monotonic())

    assert len(lines) == 1 and "'flooder'" in lines[0] and "5 refused over budget" in lines[0]


def test_custom_input_topic_is_answered_on_the_output_topic(onnx_frame: bytes) -> None:
    bench = _bench(onnx_frame, input_topic="plant/cam/+/frame", output_topic="plant/predictions")
    app = bench.broker.connector(Session("app", (("plant/predictions", 1),))).start()

    app.publish("plant/cam/7/frame", _good("cam-7"))
    bench.drain()

    assert json.loads(app.inbox.get_nowait().payload)["id"] == "cam-7"


def test_input_topic_without_output_topic_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="set both or neither"):
        ServeConfig(client_id=DEVICE, input_topic="plant/cam/+/frame")


def test_a_flooding_requester_keeps_its_inbox_share_and_others_are_served_in_turn(
    onnx_frame: bytes,
) -> None:
    bench = _bench(onnx_frame)
    flood = bench._requester("flood")
    for i in range(150):  # the server is busy: nothing is handled meanwhile
        flood.publish(T.infer_request(DEVICE, "flood"), _good(i))
    bench._requester("app").publish(T.infer_request(DEVICE, "app"), _good("app"))

    inbox = bench.server.transport.inbox
    waiting = inbox.qsize()
    served = [inbox.get_nowait().topic for _ in range(2)]

    assert waiting == 100 + 1  # the flooder's share (InboxLimits.per_sender_messages) + app
    assert served == [T.infer_request(DEVICE, "flood"), T.infer_request(DEVICE, "app")]


def test_the_server_connects_as_its_own_identity_not_its_devices(bench: Bench) -> None:
    # Beside the training agent (client id DEVICE): on a provisioned broker, one login has
    # one connection, so the two must never share an id.
    assert bench.broker.connected() == [f"{DEVICE}-infer"]
    assert bench.server.request_subscription == f"{T.root}/infer/{DEVICE}-infer/request/+"


def test_serve_refuses_to_log_in_as_its_device() -> None:
    with pytest.raises(ValueError, match="the device's own login"):
        ServeConfig(client_id=DEVICE, username=DEVICE)


def test_serve_refuses_a_server_id_as_the_device_id() -> None:
    with pytest.raises(ValueError, match="inference servers"):
        ServeConfig(client_id=f"{DEVICE}-infer")


def test_requests_naming_no_valid_requester_are_counted_in_the_periodic_report(
    bench: Bench,
) -> None:
    client = bench.broker.connector(Session("odd")).start()
    for _ in range(3):
        client.publish(f"{T.root}/infer/{DEVICE}-infer/request/bad name", _good())
    bench.drain()

    bench.clock.advance(10.0)
    lines = bench.server.budgets.report(bench.clock.monotonic())

    assert lines == [
        "3 messages in the last 10s on request topics naming no valid requester "
        "([A-Za-z0-9_.-]): not answered"
    ]
