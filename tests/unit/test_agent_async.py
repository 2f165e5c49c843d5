"""The agent in the asynchronous mode (docs/async.md), against a scripted aggregator over the
in-memory broker: it trains without being selected, keeps one update in flight, re-sends a
held update at each new version, and lets go of it once it is too stale to count."""

from __future__ import annotations

from typing import Any

import pytest

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


def test_an_unanswered_update_is_resent_at_the_next_version_and_blocks_training(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, **ASYNC)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    agg.announce(2, **ASYNC)

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send at the new version")
    assert fed.updates(2, "pi-0") == [] and agent.rounds_trained == 1  # one in flight
    agg.receipt(1, "pi-0")
    wait_for(lambda: len(fed.updates(2, "pi-0")) == 1, "training on the newest version")
    assert agent.rounds_trained == 2


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
