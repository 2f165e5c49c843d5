"""One compromised device against a real federation: Mosquitto, an aggregator, three agents.

The attacker holds a device login (here: the dev broker) and plays by the protocol: it says it
is online, is selected for round 2, and sends one poisoned update on the round's base model,
then goes offline. Each test is a finding of the adversarial review:

- finding 2: finite fp32 values of 3e38 (a 684-byte frame) made the global model non-finite,
  every agent crashed in the next round and the federation ended;
- finding 3: an update within the norm bound claiming 2⁴⁰−1 samples outweighed everyone;
- finding 5: with the default settings (no norm bound) one random update of norm 4,460
  destroyed the model.

``-s`` prints the test accuracy of every round (round 2 is the attack round).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.local_broker import LocalBroker
from aggregator.update_bounds import update_l2_norm
from shared.protocol import messages as msg
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame
from shared.protocol.topics import Topics
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
HONEST = ("pi-0", "pi-1", "pi-2")
HONEST_SAMPLES = 270  # 300 per device, 10 % held out for validation
ATTACK_ROUND = 2
Tensors = dict[str, np.ndarray]


@dataclass
class Attacker:
    """A device login used against the federation, over plain paho."""

    client: mqtt.Client
    inbox: fed.Inbox
    client_id: str

    def status(self, state: str, declared: int = HONEST_SAMPLES) -> None:
        """Publish this device's retained status, declaring ``declared`` samples."""
        body = msg.AgentStatus(client_id=self.client_id, state=state, num_samples=declared)  # type: ignore[arg-type]
        self.client.publish(
            T.agent_status(self.client_id), body.to_json(), qos=1, retain=True
        ).wait_for_publish(fed.BROKER_WAIT)

    def round_and_model(self, round_id: int, timeout: float) -> tuple[msg.RoundStart, Tensors]:
        """Round ``round_id``'s announcement and the global model it trains."""
        model: Tensors = {}

        def announced(m: mqtt.MQTTMessage) -> bool:
            if m.topic == T.global_model and m.payload:
                model.update(decode_frame(m.payload).tensors)
            return m.topic == T.round_start(round_id) and bool(m.payload)

        got = fed.until(self.inbox, announced, timeout, f"round {round_id}'s announcement")
        return msg.decode(got[-1].payload, msg.RoundStart), model

    def send(self, ann: msg.RoundStart, delta: Tensors, num_samples: int) -> dict[str, Any]:
        """Publish ``delta`` as this device's update of ``ann``'s round; return the receipt."""
        header = FrameHeader(
            kind="update",
            federation=fed.FEDERATION,
            round=ann.round,
            client_id=self.client_id,
            base_hash=ann.base_hash,
            codec="fp32",
            num_samples=num_samples,
        )
        payload = encode_frame(header, delta).payload
        self.client.publish(T.update(ann.round, self.client_id), payload, qos=1)
        receipt = fed.next_on(self.inbox, T.receipt(ann.round, self.client_id), 60)
        return dict(json.loads(receipt.payload))


@pytest.fixture
def attacker(broker: LocalBroker, mqtt_client: Any) -> Iterator[Attacker]:
    client = mqtt_client(broker.url, client_id="pi-x")
    inbox = fed.collect(client, T.global_model, T.round_start_any, T.receipt_any_round("pi-x"))
    yield Attacker(client, inbox, "pi-x")


def _federation(
    broker: LocalBroker, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """Three honest agents; rounds close at their deadline (20 s) without a refused attacker."""
    data = fed.write_client_data(tmp_path / "data", len(HONEST))
    agg = fed.start_aggregator(
        broker.url,
        tmp_path,
        "--round-timeout",
        "20",
        "--max-extensions",
        "0",
        *extra,
        rounds=3,
        min_clients=3,
    )
    agents = [fed.start_agent(broker.url, n, data[i], tmp_path) for i, n in enumerate(HONEST)]
    return agg, agents


def _attack(
    attacker: Attacker, make_delta: Any, num_samples: int, declared: int = HONEST_SAMPLES
) -> dict[str, Any]:
    """Join after round 1 starts, send the poisoned update of round 2, leave; its receipt."""
    attacker.round_and_model(1, timeout=90)
    attacker.status("online", declared)
    ann, model = attacker.round_and_model(ATTACK_ROUND, timeout=90)
    assert attacker.client_id in ann.selected, "the attacker must be selected for round 2"
    receipt = attacker.send(ann, make_delta(model), num_samples)
    attacker.status("offline", declared)
    return receipt


def _finish(
    agg: subprocess.Popen[bytes], agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """Exit codes of the aggregator and the agents, and the applied rounds' metrics."""
    code = fed.wait_exit(agg, 150, tmp_path / "aggregator.log")
    agent_codes = fed.wait_agents(agents, list(HONEST), tmp_path, timeout=60)
    rounds = fed.metrics(tmp_path)
    print("test accuracy by round:", [(r["round"], r["test_accuracy"]) for r in rounds])
    return code, agent_codes, rounds


def _huge(model: Tensors) -> Tensors:
    """Finding 2: every value 3e38 — finite fp32, a 684-byte frame for the review's LeNet-5."""
    return {n: np.full(v.shape, 3.0e38, np.float32) for n, v in model.items()}


def _random(norm: float) -> Any:
    """Finding 5: a random direction of L2 norm ``norm``."""

    def make(model: Tensors) -> Tensors:
        rng = np.random.default_rng(5)
        delta = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in model.items()}
        scale = norm / update_l2_norm(delta)
        return {n: (d * scale).astype(np.float32) for n, d in delta.items()}

    return make


def _flip_output(norm: float) -> Any:
    """Finding 3: a delta within the bound that negates the output layer (the MLP's ``5.*``)."""

    def make(model: Tensors) -> Tensors:
        out = {n: v for n, v in model.items() if n.startswith("5.")}
        scale = norm / update_l2_norm(out)
        assert scale >= 2, "the flip must at least negate the output layer"
        delta = {n: np.zeros_like(v) for n, v in model.items()}
        delta.update({n: (-scale * v).astype(np.float32) for n, v in out.items()})
        return delta

    return make


def test_finding2_a_3e38_update_is_refused_by_the_default_norm_bound(
    broker: LocalBroker, tmp_path: Path, attacker: Attacker
) -> None:
    agg, agents = _federation(broker, tmp_path)
    try:
        receipt = _attack(attacker, _huge, HONEST_SAMPLES)
        code, agent_codes, rounds = _finish(agg, agents, tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert (receipt["status"], receipt["code"]) == ("rejected", "over-norm")
    assert code == 0 and agent_codes == [0, 0, 0]
    assert [r["participants"] for r in rounds] == [list(HONEST)] * 3
    assert rounds[-1]["test_accuracy"] > 0.9  # 4 classes: chance is 0.25


def test_finding2_without_a_norm_bound_the_broken_round_is_discarded_and_agents_carry_on(
    broker: LocalBroker, tmp_path: Path, attacker: Attacker
) -> None:
    # No norm bound and no clipping (the default clips round 2 at round 1's median norm, which
    # would shorten this update to an honest length): the last line, the probe, must hold.
    agg, agents = _federation(broker, tmp_path, "--max-update-norm", "inf", "--clip", "none")
    try:
        receipt = _attack(attacker, _huge, HONEST_SAMPLES)
        code, agent_codes, rounds = _finish(agg, agents, tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert receipt["status"] == "accepted"  # below the fp32 headroom: the last line holds
    assert code == 0 and agent_codes == [0, 0, 0]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["model_hash"] == rounds[0]["model_hash"]  # round 2 left the model as it was
    assert all(math.isfinite(r["test_loss"]) for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.9
    log = (tmp_path / "aggregator.log").read_text()
    assert "round 2 discarded: result not usable (its outputs on 64 probe samples" in log


def test_finding3_an_inflated_sample_count_is_refused(
    broker: LocalBroker, tmp_path: Path, attacker: Attacker
) -> None:
    # As in the review: --max-update-norm 10, an update of norm 9.9 claiming 2^40 − 1 samples,
    # and a consistent liar: its status declares as many.
    agg, agents = _federation(broker, tmp_path, "--max-update-norm", "10")
    try:
        receipt = _attack(attacker, _flip_output(9.9), 2**40 - 1, declared=2**40 - 1)
        code, agent_codes, rounds = _finish(agg, agents, tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert (receipt["status"], receipt["code"]) == ("rejected", "too-many-samples")
    assert receipt["reason"] == f"too many samples: {2**40 - 1} claimed, the maximum is 1000000"
    assert code == 0 and agent_codes == [0, 0, 0]
    assert rounds[1]["test_accuracy"] >= rounds[0]["test_accuracy"] - 0.02


def test_finding5_a_huge_random_update_is_refused_with_the_default_settings(
    broker: LocalBroker, tmp_path: Path, attacker: Attacker
) -> None:
    agg, agents = _federation(broker, tmp_path)
    try:
        receipt = _attack(attacker, _random(4460.0), HONEST_SAMPLES)
        code, agent_codes, rounds = _finish(agg, agents, tmp_path)
    finally:
        fed.stop([agg, *agents])

    assert (receipt["status"], receipt["code"]) == ("rejected", "over-norm")
    assert receipt["reason"] == "update L2 norm 4460 exceeds the bound 20"
    assert code == 0 and agent_codes == [0, 0, 0]
    assert rounds[1]["test_accuracy"] >= rounds[0]["test_accuracy"] - 0.02
