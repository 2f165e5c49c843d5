"""The per-client update budget in front of the intake (aggregator/update_budget.py)."""

from __future__ import annotations

import logging

import pytest

from aggregator.update_budget import IntakeGuard

LOG = logging.getLogger("test.budget")


def _guard(burst: int = 10, rate: float = 1.0) -> IntakeGuard:
    return IntakeGuard(LOG, 10.0, burst=burst, rate=rate)


def test_an_agent_resending_once_a_second_is_never_refused() -> None:
    # An honest agent re-sends at most once a second (edge_agent.resend.RESEND_GAP_S).
    guard = _guard()

    read = [guard.admit("pi-0", now=float(t))[0] for t in range(1000)]

    assert all(read)


def test_fast_rounds_never_drain_the_budget() -> None:
    guard = _guard(burst=3, rate=0.0)

    read = []
    for _ in range(100):  # a hundred rounds at one instant, one update and two re-sends each
        guard.new_round()
        read += [guard.admit("pi-0", now=0.0)[0] for _ in range(3)]

    assert all(read)


def test_a_flood_is_read_up_to_the_burst_then_answered_once_per_interval() -> None:
    guard = _guard(burst=10, rate=0.0)

    outcomes = [guard.admit("mallory", now=t / 1000) for t in range(5000)]

    assert [read for read, _ in outcomes].count(True) == 10
    answers = [verdict for _, verdict in outcomes if verdict is not None]
    assert [v.code for v in answers] == ["rate-limited"]


def test_the_refusal_is_answered_again_after_the_interval() -> None:
    guard = _guard(burst=1, rate=0.0)
    guard.admit("mallory", now=0.0)
    guard.admit("mallory", now=0.0)

    _, again = guard.admit("mallory", now=10.0)

    assert again is not None and again.code == "rate-limited"


def test_one_client_over_its_budget_leaves_the_others_theirs() -> None:
    guard = _guard(burst=2, rate=0.0)
    for _ in range(100):
        guard.admit("mallory", now=0.0)

    assert guard.admit("pi-0", now=0.0) == (True, None)


def test_a_flood_makes_one_log_line_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = _guard(burst=1, rate=0.0)
    for t in range(2000):
        guard.admit("mallory", now=t / 1000)

    guard.flush(now=20.0)

    lines = [r.getMessage() for r in caplog.records if r.name == LOG.name]
    assert len(lines) == 2
    assert lines[0].startswith("update from mallory dropped: rate limited: over 1 update")
    assert lines[1].startswith("mallory over budget: 1998 more like this within 10s")


def test_close_writes_the_counts_of_open_intervals(caplog: pytest.LogCaptureFixture) -> None:
    guard = _guard(burst=1, rate=0.0)
    for _ in range(5):
        guard.admit("mallory", now=0.0)

    guard.close()

    lines = [r.getMessage() for r in caplog.records if r.name == LOG.name]
    assert lines[-1].startswith("mallory over budget: 3 more like this within 10s")
