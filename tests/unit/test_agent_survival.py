"""The agent survives a round it cannot send (edge_agent/agent.py, local_training.py).

A real EdgeAgent on the in-memory broker, the test playing the aggregator: a global model whose
training diverges, and a delta the round's codec cannot carry. The agent logs, says why in its
status, sends nothing for that round, and trains the next one. Also: each client encodes with
its own random stream.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_agent.local_training import LocalRound, encoder_rng
from shared.protocol import messages as msg
from shared.protocol.frames import tensors_hash
from tests.unit.inprocess import FED, Federation, T, wait_for
from tests.unit.test_agent import SPEC, ScriptedAggregator


@pytest.fixture
def agg(fed: Federation) -> ScriptedAggregator:
    return ScriptedAggregator(fed)


def _status(fed: Federation) -> msg.AgentStatus:
    raw = fed.broker.retained(T.agent_status("pi-0"))
    if raw is None:  # not connected yet
        return msg.AgentStatus(client_id="pi-0", state="offline")
    return msg.decode(raw, msg.AgentStatus)


def _set_model(agg: ScriptedAggregator, params: dict[str, np.ndarray], round_id: int) -> None:
    agg.params = params
    agg.model_hash = tensors_hash(params)
    agg.publish_model(round_id)


def _announce(agg: ScriptedAggregator, round_id: int, codec: str) -> None:
    now = agg.fed.clock.time()
    ann = msg.RoundStart(
        ts=now,
        federation=FED,
        round=round_id,
        base_hash=agg.model_hash,
        deadline=now + 60.0,
        selected=["pi-0"],
        model=SPEC,
        train=msg.TrainParams(lr=0.05, seed=round_id),
        codec=codec,
        download_codec="none",
    )
    agg.link.publish(T.round_start(round_id), ann.to_json(), retain=True)


def test_a_diverging_training_skips_the_round_and_the_agent_trains_the_next(
    fed: Federation, agg: ScriptedAggregator, caplog: pytest.LogCaptureFixture
) -> None:
    sane = dict(agg.params)
    _set_model(agg, {n: np.full_like(v, 1.0e30) for n, v in sane.items()}, 0)
    agent = fed.start_agent("pi-0", seed=1)
    caplog.set_level(logging.ERROR, logger="fedmq.agent")

    _announce(agg, 1, "int8")
    wait_for(lambda: _status(fed).skipped != "", "pi-0's status saying it skipped round 1")

    assert _status(fed).round == 1 and _status(fed).state == "online"
    assert _status(fed).skipped.startswith("training diverged:")
    assert fed.updates(1, "pi-0") == [] and agent.outbox.rounds() == []
    assert any("round 1 skipped, no update sent: training diverged" in m for m in caplog.messages)
    _set_model(agg, sane, 1)
    _announce(agg, 2, "int8")
    wait_for(lambda: len(fed.updates(2, "pi-0")) == 1, "pi-0's update of round 2")
    assert not fed.workers["pi-0"].done and agent.rounds_trained == 1


def test_an_unencodable_delta_skips_the_round_without_crashing(
    fed: Federation, agg: ScriptedAggregator, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    # A delta beyond fp16's range (65504): the fp16 codec cannot carry it.
    too_big = LocalRound({n: np.full_like(v, 1.0e6) for n, v in agg.params.items()}, 120, {})
    monkeypatch.setattr(agent.trainer, "train", lambda *_a, **_k: too_big)

    _announce(agg, 1, "fp16")
    wait_for(lambda: _status(fed).skipped != "", "pi-0's status saying it skipped round 1")

    assert "exceeds the fp16 range" in _status(fed).skipped
    assert fed.updates(1, "pi-0") == [] and not fed.workers["pi-0"].done


# --- the encoder's random stream -----------------------------------------------------------
def test_each_client_encodes_with_its_own_random_stream() -> None:
    a, b = encoder_rng(7, "pi-0").random(4), encoder_rng(7, "pi-1").random(4)

    assert not np.allclose(a, b)


def test_a_clients_stream_differs_between_rounds_and_repeats_within_one() -> None:
    assert not np.allclose(encoder_rng(7, "pi-0").random(4), encoder_rng(8, "pi-0").random(4))
    assert np.array_equal(encoder_rng(7, "pi-0").random(4), encoder_rng(7, "pi-0").random(4))
