"""One device against the federation, in one process: the real service and agents.

A selected device (the silent device of tests/unit/inprocess.py) sends what a compromised one
would: more samples than it declared, values that wreck the model. The federation goes on.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from shared.mqtt.base import Outbound, Session
from shared.protocol import messages as msg
from shared.protocol.frames import FrameHeader, encode_frame
from tests.unit.inprocess import FED, Federation, T, update_frame, wait_for


def _counted(fed: Federation, round_id: int) -> int:
    return sum(
        r.status == "accepted"
        for m in fed.broker.messages(T.receipt_any)
        if (r := msg.decode(m.payload, msg.Receipt)).round == round_id
    )


def _decisions(fed: Federation, round_id: int) -> list[str]:
    return [
        msg.decode(m.payload, msg.RoundDecision).decision
        for m in fed.broker.messages(T.round_decision(round_id))
    ]


def _huge_update(fed: Federation, round_id: int, client: str) -> bytes:
    """Finite fp32 values of 3e38 (the review's finding 2), on the service's current model."""
    assert fed.service is not None
    header = FrameHeader(
        kind="update",
        federation=FED,
        round=round_id,
        client_id=client,
        base_hash=fed.service.model_hash,
        codec="fp32",
        num_samples=50,
    )
    tensors = {n: np.full(s, 3.0e38, np.float32) for n, s in fed.service.shapes.items()}
    return encode_frame(header, tensors).payload


def _start(fed: Federation, declared: int = 50, **overrides: object) -> None:
    """A silent device declaring ``declared`` samples and two agents, all three selected."""
    status = msg.AgentStatus(client_id="pi-x", state="online", num_samples=declared).to_json()
    birth = Outbound(T.agent_status("pi-x"), status, retain=True)
    fed.broker.connector(Session("pi-x", births=lambda: [birth])).start()
    fed.start_agent("pi-0", seed=1)
    fed.start_agent("pi-1", seed=2)
    fed.wait_online("pi-x", "pi-0", "pi-1")
    fed.start_aggregator(min_clients=2, round_timeout=60.0, **overrides)
    wait_for(lambda: _counted(fed, 1) == 2, "the two agents' updates of round 1")


def test_an_update_claiming_more_samples_than_declared_is_refused(fed: Federation) -> None:
    _start(fed, rounds=1)
    assert fed.service is not None
    attacker = fed.broker.connector(Session("pi-x-attacker")).start()

    attacker.publish(T.update(1, "pi-x"), update_frame(fed.service, 1, "pi-x", num_samples=51))
    wait_for(lambda: len(fed.receipts(1, "pi-x")) == 1, "the receipt of pi-x")
    fed.clock.advance(61.0)
    codes = fed.finish()

    (receipt,) = fed.receipts(1, "pi-x")
    assert (receipt.status, receipt.code) == ("rejected", "too-many-samples")
    assert receipt.reason == "too many samples: 51 claimed, the device declared 50"
    assert codes["aggregator"] == 0
    (applied,) = fed.rounds()
    assert applied["participants"] == ["pi-0", "pi-1"]


def test_with_default_bounds_a_3e38_update_is_refused_over_the_norm(fed: Federation) -> None:
    _start(fed, rounds=1)
    attacker = fed.broker.connector(Session("pi-x-attacker")).start()

    attacker.publish(T.update(1, "pi-x"), _huge_update(fed, 1, "pi-x"))
    wait_for(lambda: len(fed.receipts(1, "pi-x")) == 1, "the receipt of pi-x")
    fed.clock.advance(61.0)
    codes = fed.finish()

    (receipt,) = fed.receipts(1, "pi-x")
    assert (receipt.status, receipt.code) == ("rejected", "over-norm")
    assert codes["aggregator"] == 0 and _decisions(fed, 1) == ["applied"]


def test_without_a_norm_bound_or_clipping_a_round_whose_model_would_be_unusable_is_discarded(
    fed: Federation,
) -> None:
    # No clipping either: the default would shorten the update to the round's median norm.
    _start(fed, rounds=2, max_update_norm=math.inf, clip="none")
    assert fed.service is not None
    initial = fed.service.model_hash
    attacker = fed.broker.connector(Session("pi-x-attacker")).start()

    attacker.publish(T.update(1, "pi-x"), _huge_update(fed, 1, "pi-x"))  # completes round 1
    wait_for(lambda: _decisions(fed, 1) == ["discarded"], "round 1 discarded")
    attacker.publish(
        T.agent_status("pi-x"), msg.AgentStatus(client_id="pi-x", state="offline").to_json()
    )
    wait_for(lambda: _counted(fed, 2) == 2, "the two agents' updates of round 2")
    fed.clock.advance(61.0)  # in case pi-x was selected for round 2 too
    codes = fed.finish()

    assert codes == {"aggregator": 0, "pi-0": 0, "pi-1": 0}
    discarded, applied = fed.rounds()
    assert discarded["model_hash"] == initial  # round 1 left the model as it was
    assert applied["model_hash"] != initial and math.isfinite(applied["test_loss"])
    assert applied["test_accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_the_aggregator_logs_why_an_agent_skipped_a_round(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedmq.aggregator")
    _start(fed, rounds=1)
    device = fed.broker.connector(Session("pi-x-device")).start()
    skipped = msg.AgentStatus(
        client_id="pi-x", state="online", num_samples=50, round=1, skipped="training diverged"
    )

    device.publish(T.agent_status("pi-x"), skipped.to_json(), retain=True)
    wait_for(
        lambda: "pi-x skipped round 1: training diverged" in caplog.messages,
        "the aggregator's log line",
    )
    device.stop([Outbound(T.agent_status("pi-x"), b"", retain=True)])
    fed.clock.advance(61.0)
    assert fed.finish()["aggregator"] == 0


def test_a_device_within_the_bounds_gets_no_more_than_its_share_of_the_weight(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedmq.aggregator")
    _start(fed, declared=10_000, rounds=1, max_weight_share=0.5)
    assert fed.service is not None
    device = fed.broker.connector(Session("pi-x-device")).start()

    device.publish(T.update(1, "pi-x"), update_frame(fed.service, 1, "pi-x", num_samples=10_000))
    codes = fed.finish()

    assert codes == {"aggregator": 0, "pi-0": 0, "pi-1": 0}
    assert [r.code for r in fed.receipts(1, "pi-x")] == ["accepted"]
    # The two agents hold 2 × 120 samples: pi-x may weigh as much as both together, no more.
    assert "round 1: weight of pi-x capped from 10000 to 240 samples (max share 0.5)" in (
        caplog.messages
    )


def test_with_the_default_clipping_a_huge_update_counts_as_one_of_median_length(
    fed: Federation,
) -> None:
    _start(fed, rounds=1, max_update_norm=math.inf)
    attacker = fed.broker.connector(Session("pi-x-attacker")).start()

    attacker.publish(T.update(1, "pi-x"), _huge_update(fed, 1, "pi-x"))
    wait_for(lambda: len(fed.receipts(1, "pi-x")) == 1, "the receipt of pi-x")
    fed.clock.advance(61.0)
    codes = fed.finish()

    assert codes["aggregator"] == 0 and _decisions(fed, 1) == ["applied"]
    (applied,) = fed.rounds()
    assert applied["clipped"] >= 1 and applied["test_accuracy"] > 0.5


def test_a_devices_inference_server_identity_gets_no_vote(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    # `fedmq device add pi-0` also provisions pi-0-infer (its inference server's login),
    # which the ACL's device patterns let publish on its own update and status topics.
    caplog.set_level(logging.WARNING)
    server = fed.broker.connector(Session("pi-0-infer")).start()
    status = msg.AgentStatus(client_id="pi-0-infer", state="online", num_samples=50).to_json()
    server.publish(f"{T.root}/agents/pi-0-infer/status", status, retain=True)
    fed.start_agent("pi-0", seed=1)
    fed.start_agent("pi-1", seed=2)
    fed.wait_online("pi-0", "pi-1")
    service = fed.start_aggregator(rounds=1, min_clients=2)
    wait_for(lambda: fed.open_round() == 1, "round 1 announced")

    server.publish(f"{T.root}/round/1/update/pi-0-infer", update_frame(service, 1, "pi-0-infer"))
    wait_for(lambda: "round/1/update/pi-0-infer" in caplog.text, "the update ignored")
    codes = fed.finish()

    assert codes == {"aggregator": 0, "pi-0": 0, "pi-1": 0}
    (announcement,) = [m for m in fed.broker.messages(T.round_start(1)) if m.payload]
    assert msg.decode(announcement.payload, msg.RoundStart).selected == ["pi-0", "pi-1"]
    (applied,) = fed.rounds()
    assert applied["participants"] == ["pi-0", "pi-1"]
    assert fed.broker.messages(f"{T.root}/round/+/receipt/pi-0-infer") == []
    assert "inference servers, which never train" in caplog.text
