"""The agent follows only control data it may: signed, affordable, in (run, round) order.

A real EdgeAgent over the in-memory broker; the test plays the aggregator (see test_agent.py).
Each refused announcement is followed by a genuine one: the agent handles its inbox in order,
so once the genuine round's update is out, the refused one was handled (and logged) before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.protocol import messages as msg
from shared.protocol.frames import read_header
from tests.unit.inprocess import Federation, wait_for
from tests.unit.test_agent import ScriptedAggregator, _pinned


def _trained(fed: Federation, round_id: int, n: int = 1) -> None:
    wait_for(lambda: len(fed.updates(round_id, "pi-0")) == n, f"pi-0's update of round {round_id}")


def _bases(fed: Federation, round_id: int) -> list[str]:
    return [read_header(p).base_hash for p in fed.updates(round_id, "pi-0")]


def test_a_pinned_agent_refuses_an_unsigned_announcement_and_trains_the_signed_one(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, pem = _pinned(fed, tmp_path)
    agg = ScriptedAggregator(fed, key)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1, model_public_key=pem)

    agg.announce(1, "pi-0", sign=False)
    agg.announce(2, "pi-0")
    _trained(fed, 2)

    assert fed.updates(1, "pi-0") == []
    assert "round 1 announcement (run 0) refused: announcement is not signed" in caplog.text


def test_a_pinned_agent_refuses_a_signed_announcement_altered_in_any_field(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, pem = _pinned(fed, tmp_path)
    agg = ScriptedAggregator(fed, key)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1, model_public_key=pem)
    agg.announce(1, "pi-0")
    _trained(fed, 1)
    (genuine,) = fed.broker.messages("fl/v1/unit/round/1/start")
    ann = msg.decode(genuine.payload, msg.RoundStart)
    forged = msg.RoundStart(**{**msg.to_builtins(ann), "round": 3, "train": ann.train})

    agg.link.publish("fl/v1/unit/round/3/start", forged.to_json(), retain=True)
    agg.announce(4, "pi-0")
    _trained(fed, 4)

    assert fed.updates(3, "pi-0") == []
    assert "round 3 announcement (run 0) refused: bad signature" in caplog.text


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "dev-mode"])
def test_an_absurd_learning_rate_is_refused_signed_or_not_and_the_agent_trains_on(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture, pinned: bool
) -> None:
    key, pem = _pinned(fed, tmp_path)
    agg = ScriptedAggregator(fed, key)  # a stolen key signs the forgery too
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1, model_public_key=pem if pinned else None)

    agg.announce(1, "pi-0", train=msg.TrainParams(lr=1e30, seed=1))
    agg.announce(2, "pi-0")
    _trained(fed, 2)

    assert fed.updates(1, "pi-0") == [] and agent.rounds_trained == 1
    assert not fed.workers["pi-0"].done
    assert "Expected `float` <= 10.0 - at `$.train.lr`" in caplog.text


@pytest.mark.parametrize(
    ("train", "refusal"),
    [
        (msg.TrainParams(local_epochs=50), "50 local epochs exceed this device's limit of 20"),
        (msg.TrainParams(batch_size=4096), "batch size 4096 exceeds this device's limit of 1024"),
    ],
    ids=["epochs", "batch-size"],
)
def test_an_announcement_beyond_what_the_device_affords_is_refused(
    fed: Federation,
    caplog: pytest.LogCaptureFixture,
    train: msg.TrainParams,
    refusal: str,
) -> None:
    agg = ScriptedAggregator(fed)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)

    agg.announce(1, "pi-0", train=train)
    agg.announce(2, "pi-0")
    _trained(fed, 2)

    assert fed.updates(1, "pi-0") == []
    assert refusal in caplog.text


def test_an_announcement_with_a_codec_the_agent_cannot_use_is_refused(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = ScriptedAggregator(fed)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)

    agg.announce(1, "pi-0", codec="zip9")
    agg.announce(2, "pi-0")
    _trained(fed, 2)

    assert fed.updates(1, "pi-0") == []
    assert "update codec: unknown codec 'zip9'" in caplog.text


def test_an_announcement_older_than_the_round_followed_is_refused(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = ScriptedAggregator(fed)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)
    agg.announce(3, "pi-9")
    wait_for(lambda: "pi-0" in fed.agents and fed.agents["pi-0"].announcement is not None, "3")

    agg.announce(2, "pi-0")  # a replay of an earlier round
    agg.announce(4, "pi-0")
    _trained(fed, 4)

    assert fed.updates(2, "pi-0") == []
    assert "older than round 3 of run 0, which it follows" in caplog.text


def test_a_pinned_agent_holding_a_later_model_of_an_old_run_trains_the_new_run(
    fed: Federation, tmp_path: Path
) -> None:
    key, pem = _pinned(fed, tmp_path)
    run_a = ScriptedAggregator(fed, key, run=5)
    run_a.publish_model(round_id=2)  # e.g. retained by a persistent broker
    agent = fed.start_agent("pi-0", seed=1, model_public_key=pem)
    wait_for(lambda: agent.sync.model is not None, "run A's round-2 model")
    run_b = ScriptedAggregator(fed, key, run=6, seed=7)

    run_b.publish_model(round_id=0)
    run_b.announce(1, "pi-0")
    _trained(fed, 1)

    assert _bases(fed, 1) == [run_b.model_hash] != [run_a.model_hash]
    assert agent.sync.model is not None and (agent.sync.model.run, agent.sync.model.round_id) == (
        6,
        0,
    )


def test_an_agent_that_trained_a_round_of_the_old_run_trains_it_again_in_the_new_run(
    fed: Federation,
) -> None:
    run_a = ScriptedAggregator(fed, run=5)
    run_a.publish_model()
    fed.start_agent("pi-0", seed=1)
    run_a.announce(1, "pi-0")
    _trained(fed, 1)
    run_a.receipt(1, "pi-0")
    run_b = ScriptedAggregator(fed, run=6, seed=7)

    run_b.publish_model()
    run_b.announce(1, "pi-0")
    _trained(fed, 1, n=2)

    assert _bases(fed, 1) == [run_a.model_hash, run_b.model_hash]


def test_a_replayed_signed_announcement_of_an_older_run_is_refused(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, pem = _pinned(fed, tmp_path)
    run_a, run_b = ScriptedAggregator(fed, key, run=5), ScriptedAggregator(fed, key, run=6)
    run_b.publish_model()
    fed.start_agent("pi-0", seed=1, model_public_key=pem)
    run_b.announce(1, "pi-0")
    _trained(fed, 1)

    run_a.announce(7, "pi-0")  # signed, fresh deadline, on the model held: but run 5
    run_b.announce(2, "pi-0")
    _trained(fed, 2)

    assert fed.updates(7, "pi-0") == []
    assert "round 7 announcement (run 5) refused: older than round 1 of run 6" in caplog.text


def test_a_pinned_agent_ignores_an_unsigned_finished_and_ends_on_the_signed_one(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, pem = _pinned(fed, tmp_path)
    agg = ScriptedAggregator(fed, key)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1, model_public_key=pem)
    agg.announce(1, "pi-0")
    _trained(fed, 1)

    agg.status("finished", retain=False, sign=False)
    agg.announce(2, "pi-0")
    _trained(fed, 2)
    agg.status("finished", retain=False)

    assert fed.workers["pi-0"].join() == 0
    assert "'finished' of run 0 ignored: status is not signed" in caplog.text


def test_a_finished_of_an_earlier_run_does_not_end_an_agent_following_a_new_run(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    run_a, run_b = ScriptedAggregator(fed, run=5), ScriptedAggregator(fed, run=6)
    run_b.publish_model()
    fed.start_agent("pi-0", seed=1)
    run_b.announce(1, "pi-0")
    _trained(fed, 1)

    run_a.status("finished", retain=False)  # replayed live
    run_b.announce(2, "pi-0")
    _trained(fed, 2)

    assert not fed.workers["pi-0"].done
    assert "'finished' of run 5 ignored: the agent follows run 6" in caplog.text
