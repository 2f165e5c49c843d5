"""The agent in the asynchronous mode (docs/async.md), against a scripted aggregator over the
in-memory broker: it trains without being selected, keeps one update in flight, re-sends a
held update when asked ("busy") at the next version, when its timer runs out or to a restarted
aggregator, and lets go of it once it is too stale to count."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edge_agent.availability import OnlineSpells
from shared.runtime.models import build_model
from shared.runtime.training import TrainConfig, train_local
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES, make_dataset
from tests.unit.inprocess import Federation, wait_for
from tests.unit.test_agent import ScriptedAggregator

ASYNC: dict[str, Any] = {"mode": "async", "max_staleness": 2}


@pytest.fixture
def agg(fed: Federation) -> ScriptedAggregator:
    return ScriptedAggregator(fed)


def test_every_agent_trains_on_an_async_announcement_without_being_selected(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)

    agg.announce(1, **ASYNC)  # nobody selected

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    assert agent.rounds_trained == 1


def test_an_unanswered_update_blocks_training_and_is_resent_by_its_timer_not_per_version(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, **ASYNC)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    agg.announce(2, **ASYNC)  # its receipt may be on the way: no copy per new version
    wait_for(lambda: agent.announcement is not None and agent.announcement.round == 2, "v2")
    agg.announce(3, **ASYNC)
    wait_for(lambda: agent.announcement is not None and agent.announcement.round == 3, "v3")
    assert len(fed.updates(1, "pi-0")) == 1
    fed.clock.advance(agent.cfg.resend_after_s)  # no receipt for that long: lost, sent again

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the timer's re-send")
    assert fed.updates(3, "pi-0") == [] and agent.rounds_trained == 1  # one in flight
    agg.receipt(1, "pi-0")
    wait_for(lambda: len(fed.updates(3, "pi-0")) == 1, "training on the newest version")
    assert agent.rounds_trained == 2


def test_a_restarted_aggregators_live_reannouncement_gets_every_held_update_again(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)
    agg.announce(1, **ASYNC)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    agg.announce(2, **ASYNC)

    agg.announce(2, **ASYNC)  # the same version again, live: the aggregator restarted

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send to the restarted aggregator")


def test_a_busy_update_is_kept_and_sent_again_after_the_next_version(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, **ASYNC)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    agg.receipt(1, "pi-0", code="busy")
    agg.announce(2, **ASYNC)

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the busy update sent again")
    assert agent.outbox.rounds() == [1]
    first, again = fed.updates(1, "pi-0")
    assert first == again  # the same bytes: never trained twice
    agg.receipt(1, "pi-0")
    wait_for(lambda: agent.outbox.rounds() in ([], [2]), "the outbox let go of round 1")


def test_an_update_staler_than_the_bound_is_dropped_and_the_agent_trains_again(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, mode="async", max_staleness=1)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    agg.announce(3, mode="async", max_staleness=1)  # round 1 can no longer count

    wait_for(lambda: len(fed.updates(3, "pi-0")) == 1, "training on round 3")
    assert len(fed.updates(1, "pi-0")) == 1 and 1 not in agent.outbox.rounds()


# --- heterogeneous devices: --slowdown and --online ----------------------------------------
def test_online_spells_have_the_configured_fraction_in_the_long_run() -> None:
    spells = OnlineSpells(0.6, 10.0, "pi-3", start=0.0)

    samples = [spells.at(t * 0.5) for t in range(200_000)]  # 100,000 s, ~5,000 spells

    assert sum(samples) / len(samples) == pytest.approx(0.6, abs=0.03)
    assert samples[0] is True  # a device starts on-line


def test_the_same_device_has_the_same_spells_in_every_run() -> None:
    a, b = OnlineSpells(0.5, 5.0, "pi-1", 0.0), OnlineSpells(0.5, 5.0, "pi-1", 0.0)
    other = OnlineSpells(0.5, 5.0, "pi-2", 0.0)

    pattern = [a.at(t) for t in range(500)]

    assert pattern == [b.at(t) for t in range(500)]
    assert pattern != [other.at(t) for t in range(500)]


def test_slowdown_adds_real_wall_time_after_each_batch() -> None:
    data = make_dataset(256, seed=1)
    results = {}
    for slowdown in (1.0, 3.0):
        torch.manual_seed(0)  # the same initial weights
        model = build_model("mlp", INPUT_SHAPE, NUM_CLASSES)
        cfg = TrainConfig(batch_size=16, lr=0.05, seed=3, slowdown=slowdown)
        results[slowdown] = train_local(model, data, cfg)

    assert results[1.0].slowed_s == 0.0
    slowed = results[3.0]
    # 2× each batch's own time slept after it: the batches took slowed_s / 2 besides.
    assert slowed.slowed_s > 0
    assert slowed.train_time_s >= 1.5 * slowed.slowed_s
    assert slowed.train_loss == results[1.0].train_loss  # the same training, only slower


def test_a_minimum_batch_time_paces_every_batch() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", INPUT_SHAPE, NUM_CLASSES)
    cfg = TrainConfig(batch_size=64, lr=0.05, seed=3, slowdown=2.0, min_batch_s=0.05)

    result = train_local(model, make_dataset(256, seed=1), cfg)

    # 4 batches, each lasting at least 2 × 50 ms: slept at least what the batches did not take.
    assert result.steps == 4
    assert result.train_time_s >= 4 * 0.1 and result.slowed_s > 0


def test_a_part_time_agent_goes_offline_keeps_its_update_and_resends_it_back_online(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1, online=0.5, online_spell_s=1000.0)
    agg.announce(1, **ASYNC)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    assert agent.spells is not None
    off_at = agent.spells.until

    fed.clock.advance(off_at - fed.clock.monotonic() + 0.01)  # its off-line spell begins
    wait_for(lambda: agent.offline_spells == 1, "pi-0 off-line")
    wait_for(lambda: "pi-0" not in fed.broker.connected(), "pi-0 disconnected")
    fed.clock.advance(agent.spells.until - fed.clock.monotonic() + 0.01)  # and ends

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the held update re-sent on-line")
    assert agent.outbox.rounds() == [1] and agent.rounds_trained == 1
