"""The devices' learning-rate schedule: the formula on fixed values, its flags and range
checks, and the announcements that carry it (over the in-memory broker)."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest

from aggregator.config import AggregatorConfig, add_arguments, from_args
from aggregator.strategy_config import scheduled_lr
from shared.protocol import messages as msg
from tests.unit.inprocess import Federation, T


def test_constant_announces_lr_in_every_round() -> None:
    cfg = AggregatorConfig(lr=0.05, rounds=20)

    assert [scheduled_lr(cfg, r) for r in (1, 10, 20, 25)] == [0.05] * 4


def test_cosine_goes_from_lr_to_its_floor_over_the_rounds() -> None:
    cfg = AggregatorConfig(lr=0.1, rounds=4, lr_schedule="cosine", lr_final=0.1)

    # λ(t) = f + (1 − f)·½(1 + cos(π(t − 1)/T)), T = 4, f = 0.1: by hand.
    expected = [0.1, 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))), 0.1 * 0.55,
                0.1 * (0.1 + 0.9 * 0.5 * (1 - math.sqrt(0.5))), 0.01, 0.01]  # fmt: skip
    got = [scheduled_lr(cfg, r) for r in range(1, 7)]

    assert got == pytest.approx(expected, rel=1e-12)
    assert all(a > b for a, b in itertools.pairwise(got[:5]))  # falls until round T + 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"lr_schedule": "step"}, "lr-schedule must be one of"), ({"lr_final": 0.0}, "lr-final")],
)
def test_a_schedule_it_cannot_follow_is_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregatorConfig(**overrides)  # type: ignore[arg-type]


def _announced_lr(fed: Federation) -> dict[int, float]:
    starts = [
        msg.decode(m.payload, msg.RoundStart)
        for m in fed.broker.messages(T.round_start_any)
        if m.payload
    ]
    return {s.round: s.train.lr for s in starts}


def test_the_announcements_carry_the_scheduled_lr(fed: Federation) -> None:
    fed.start_aggregator(rounds=3, min_clients=1, lr=0.04, lr_schedule="cosine", lr_final=0.25)
    fed.start_agent("pi-0", seed=1)

    assert set(fed.finish().values()) == {0}
    cfg = AggregatorConfig(rounds=3, lr=0.04, lr_schedule="cosine", lr_final=0.25)
    assert _announced_lr(fed) == {r: pytest.approx(scheduled_lr(cfg, r)) for r in (1, 2, 3)}
    assert _announced_lr(fed)[3] < _announced_lr(fed)[1] == pytest.approx(0.04)


def test_its_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--lr-schedule", "cosine", "--lr-final", "0.1"]))

    assert (cfg.lr_schedule, cfg.lr_final) == ("cosine", 0.1)
